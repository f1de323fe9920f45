"""``CheckpointConfig``: a small frozen dataclass, validated on construction."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ASYNC_MODES = ("off", "thread", "process")
STAGING = ("sync", "overlap")
WHEN_BUSY = ("wait", "skip")
MODES = ("min", "max")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how checkpoints are written. Every field is checked in ``__post_init__``."""

    root_dir: str = "./experiments"
    """Base directory; the experiment lives in ``<root_dir>/<experiment_name>/``."""

    experiment_name: str = ""
    """Experiment directory name. Empty: ``{model_name}_{dataset_name}_{YYYYmmdd_HHMMSS}``,
    chosen once by rank 0."""

    model_name: str = "model"
    """Used only to build the default experiment name."""

    dataset_name: str = "data"
    """Used only to build the default experiment name."""

    monitor: str | None = None
    """Metric that ranks checkpoints (``load(which="best")``); None: no best."""

    mode: str = "min"
    """``"min"`` or ``"max"``: which direction of ``monitor`` is better."""

    async_mode: str = "process"
    """How shards are written: ``"off"`` (in-line; ``save`` returns once committed),
    ``"thread"`` (a background thread per rank writes a staged copy) or ``"process"`` (a
    persistent writer process per rank reads the staged copy from shared memory, so the
    write never holds the training's GIL). Scripts using ``"process"`` must guard their
    entry point with ``if __name__ == "__main__":`` (the writer is spawned)."""

    staging: str = "sync"
    """``"sync"``: ``save`` returns once the state is copied into the staging buffers.
    ``"overlap"``: ``save`` returns before the copy of parameters and optimizer state is
    done; the copy overlaps the next forward/backward and a step pre-hook on the
    optimizers of ``app_state`` waits for it. Parameters and optimizer state must then
    change only through those optimizers until their next step."""

    when_busy: str = "wait"
    """A ``save`` while the previous one is still writing: ``"wait"`` for it, or ``"skip"``
    this save (logged and counted in ``stats()``). Decided alike on every rank."""

    timeout_s: float = 600.0
    """Upper bound on every wait on another rank (barriers, gathers, the commit)."""

    capture_rng: bool = True
    """Save the torch (CPU and CUDA), numpy and python RNG states of every rank, and
    restore the calling rank's on load."""

    fsync: bool = True
    """fsync shards, the marker and the directories. Only tests of throughput turn it off;
    without it a crash may lose a checkpoint that was reported committed."""

    write_threads: int = 1
    """Threads per rank writing shard files (DCP ``FileSystemWriter.thread_count``)."""

    def __post_init__(self) -> None:
        if isinstance(self.root_dir, os.PathLike):
            object.__setattr__(self, "root_dir", os.fspath(self.root_dir))
        if not isinstance(self.root_dir, str) or not self.root_dir:
            raise ConfigError("root_dir", self.root_dir, "a non-empty path")
        _check_name("experiment_name", self.experiment_name, allow_empty=True)
        _check_name("model_name", self.model_name, allow_empty=False)
        _check_name("dataset_name", self.dataset_name, allow_empty=False)
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ConfigError("monitor", self.monitor, "a metric name or None")
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {MODES}")
        for name, allowed in (
            ("async_mode", ASYNC_MODES),
            ("staging", STAGING),
            ("when_busy", WHEN_BUSY),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"one of {allowed}")
        if self.staging == "overlap" and self.async_mode == "off":
            raise ConfigError("staging", self.staging, "'sync' when async_mode='off'")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise ConfigError("timeout_s", self.timeout_s, "a finite number of seconds > 0")
        for name in ("capture_rng", "fsync"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        if (
            isinstance(self.write_threads, bool)
            or not isinstance(self.write_threads, int)
            or self.write_threads < 1
        ):
            raise ConfigError("write_threads", self.write_threads, "an int >= 1")

    @property
    def root_path(self) -> Path:
        return Path(self.root_dir)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_name(field: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(field, value, "a non-empty string" if not allow_empty else "a string")
    if value in (".", "..") or "/" in value or os.sep in value or "\0" in value:
        raise ConfigError(field, value, "a single directory name (no '/', not '.' or '..')")
