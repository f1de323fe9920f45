"""Adapters of dcp-engine to training frameworks: ``lightning`` (and its ``lightning_*``
helpers), ``accelerate``, ``torchtitan``. Imported on demand: the frameworks are optional
extras, and nothing here imports one until its adapter is used."""
