"""dcp-engine: sharded, committed, indexed checkpoints for PyTorch on top of DCP."""

from .callbacks import AsyncCheckpointCallback, CheckpointCallback, TrainStart
from .config import CheckpointConfig
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    NotACheckpointError,
    StateMismatchError,
    UnknownKeyError,
)
from .index import CheckpointInfo, find_checkpoints
from .manager import CheckpointManager, SaveStats
from .retention import RetentionPolicy
from .weights import LoadResult, load_weights

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointCallback",
    "CheckpointCallback",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "IntegrityError",
    "LoadResult",
    "NotACheckpointError",
    "RetentionPolicy",
    "SaveStats",
    "StateMismatchError",
    "TrainStart",
    "UnknownKeyError",
    "__version__",
    "find_checkpoints",
    "load_weights",
]
