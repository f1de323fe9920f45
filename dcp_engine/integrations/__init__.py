"""Adapters that let training frameworks checkpoint through the engine.

Each lives in its own module and imports its framework only there, so that
``import dcp_engine.integrations`` costs nothing:

- ``dcp_engine.integrations.lightning``: PyTorch Lightning (``DcpEngineCheckpointIO``,
  ``DcpEngineDDPStrategy``, ``DcpEngineModelParallelStrategy``).
"""
