"""``save_checkpoint`` and ``load_checkpoint`` with the DINO guide's names: they live in
the package (``dcp_engine.dino``, also ``dcp_engine.save_checkpoint``); the launch
scripts import them from there."""

from dcp_engine.dino import CONFIG_KEY, load_checkpoint, save_checkpoint

__all__ = ["CONFIG_KEY", "load_checkpoint", "save_checkpoint"]
