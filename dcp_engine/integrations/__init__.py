"""Adapters of dcp-engine to training frameworks: ``lightning``, ``accelerate``,
``torchtitan``. One module each, imported on demand: the frameworks are optional extras."""
