"""dcp-engine: sharded, committed, indexed checkpoints for PyTorch on top of DCP."""

from .config import CheckpointConfig
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    NotACheckpointError,
    StateMismatchError,
)
from .index import CheckpointInfo
from .manager import CheckpointManager, SaveStats

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "IntegrityError",
    "NotACheckpointError",
    "SaveStats",
    "StateMismatchError",
    "__version__",
]
