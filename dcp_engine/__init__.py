"""dcp-engine: sharded, committed, indexed checkpoints for PyTorch on top of DCP.

The public names are imported on first use (PEP 562): ``import dcp_engine`` stays cheap
for the writer process (``python -m dcp_engine.writer_process``) and the command line,
which need only a few of its modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adoption import adopt
    from .callbacks import AsyncCheckpointCallback, CheckpointCallback
    from .config import CheckpointConfig, CheckpointParameters
    from .config_keys import KEY_ALIASES
    from .data import ResumableDistributedSampler
    from .dino import load_checkpoint, save_checkpoint
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
        UnsupportedKeyError,
    )
    from .index import CheckpointInfo
    from .manager import CheckpointManager
    from .native import storage_writer
    from .native_reader import storage_reader
    from .position import LOOP_KEY, TrainStart, loop_position
    from .preemption import Preempted
    from .ranked import PerRank
    from .reader import CheckpointReader, open_checkpoint
    from .resolve import find_checkpoints
    from .retention import RetentionPolicy
    from .saving import SaveHandle, SaveStats
    from .storage import LocalStorage
    from .weights import LoadResult, load_weights

__version__ = "0.1.0"

_WHERE = {
    "adopt": "adoption",
    "AsyncCheckpointCallback": "callbacks",
    "CheckpointCallback": "callbacks",
    "LOOP_KEY": "position",
    "Preempted": "preemption",
    "TrainStart": "position",
    "loop_position": "position",
    "CheckpointConfig": "config",
    "CheckpointParameters": "config",
    "KEY_ALIASES": "config_keys",
    "ResumableDistributedSampler": "data",
    "CheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "ConfigError": "errors",
    "ExperimentLockedError": "errors",
    "IntegrityError": "errors",
    "NotACheckpointError": "errors",
    "StateMismatchError": "errors",
    "TimelineError": "errors",
    "UnknownKeyError": "errors",
    "UnsupportedKeyError": "errors",
    "load_checkpoint": "dino",
    "save_checkpoint": "dino",
    "CheckpointInfo": "index",
    "CheckpointManager": "manager",
    "storage_reader": "native_reader",
    "storage_writer": "native",
    "PerRank": "ranked",
    "CheckpointReader": "reader",
    "open_checkpoint": "reader",
    "find_checkpoints": "resolve",
    "RetentionPolicy": "retention",
    "SaveHandle": "saving",
    "SaveStats": "saving",
    "LocalStorage": "storage",
    "LoadResult": "weights",
    "load_weights": "weights",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dcp_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


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
    "CheckpointParameters",
    "CheckpointReader",
    "ConfigError",
    "ExperimentLockedError",
    "IntegrityError",
    "LoadResult",
    "LocalStorage",
    "NotACheckpointError",
    "PerRank",
    "Preempted",
    "ResumableDistributedSampler",
    "RetentionPolicy",
    "SaveHandle",
    "SaveStats",
    "StateMismatchError",
    "TimelineError",
    "TrainStart",
    "UnknownKeyError",
    "UnsupportedKeyError",
    "__version__",
    "adopt",
    "find_checkpoints",
    "load_checkpoint",
    "load_weights",
    "loop_position",
    "open_checkpoint",
    "save_checkpoint",
    "storage_reader",
    "storage_writer",
]
