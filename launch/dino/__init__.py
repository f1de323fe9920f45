"""A small, real DINO (Caron et al., 2021) for the dcp-engine demo: ``launch/train_dino.py``
trains it under torchrun, ``launch/eval_dino.py`` loads its teacher for features."""

from .checkpoint import load_checkpoint, save_checkpoint
from .loss import DINOLoss
from .model import DINOHead, DinoModel, VisionTransformer

__all__ = [
    "DINOHead",
    "DINOLoss",
    "DinoModel",
    "VisionTransformer",
    "load_checkpoint",
    "save_checkpoint",
]
