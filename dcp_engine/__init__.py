"""dcp-engine: sharded, committed, indexed checkpoints for PyTorch on top of DCP."""

from .callbacks import (
    LOOP_KEY,
    AsyncCheckpointCallback,
    CheckpointCallback,
    TrainStart,
    loop_position,
)
from .config import KEY_ALIASES, CheckpointConfig
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ExperimentLockedError,
    IntegrityError,
    NotACheckpointError,
    StateMismatchError,
    TimelineError,
    UnknownKeyError,
)
from .index import CheckpointInfo
from .manager import CheckpointManager
from .native import storage_reader, storage_writer
from .reader import CheckpointReader, open_checkpoint
from .resolve import find_checkpoints
from .retention import RetentionPolicy
from .saving import SaveHandle, SaveStats
from .storage import LocalStorage
from .weights import LoadResult, load_weights

__version__ = "0.1.0"

__all__ = [
    "KEY_ALIASES",
    "LOOP_KEY",
    "AsyncCheckpointCallback",
    "CheckpointCallback",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "ConfigError",
    "ExperimentLockedError",
    "IntegrityError",
    "LoadResult",
    "LocalStorage",
    "NotACheckpointError",
    "RetentionPolicy",
    "SaveHandle",
    "SaveStats",
    "StateMismatchError",
    "TimelineError",
    "TrainStart",
    "UnknownKeyError",
    "__version__",
    "find_checkpoints",
    "load_weights",
    "loop_position",
    "open_checkpoint",
    "storage_reader",
    "storage_writer",
]
