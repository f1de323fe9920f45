"""Adapters of dcp-engine to training frameworks (imported on demand, one module each)."""
