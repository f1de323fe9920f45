"""``CheckpointInfo`` (one committed checkpoint) and ``index.json``, the experiment's
cache of the markers.

The markers are the truth; the index is rebuilt from them at start when it is missing,
unreadable or stale (``catalog.py``), and only the lease holder writes it. Only committed
checkpoints ever enter it (invariant 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .location import URL, Location
from .marker import Marker
from .storage import Storage, storage_of

log = logging.getLogger(__name__)

INDEX_FORMAT = "dcp-engine-index/1"


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float] = field(hash=False)
    path: Location
    bytes: int
    created: float
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """What the saver kept in the marker besides metrics (``save(extra=...)``)."""
    files: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    """Every file with its size and digest, as the marker lists them."""
    tiers: tuple[str, ...] = field(default=(), compare=False)
    """With a local tier (``local_dir``): where the checkpoint is, ``("local",)``,
    ``("remote",)`` or both; empty without one."""
    ranked_by: str | None = field(default=None, compare=False, repr=False)
    """The monitor of the listing that returned it (``find_checkpoints``), for ``metric``."""

    @property
    def metric(self) -> float | None:
        """The value of ``ranked_by`` in ``metrics`` (Dream Trainer's ``ckpt.metric``);
        None without one."""
        return None if self.ranked_by is None else self.metrics.get(self.ranked_by)

    @classmethod
    def from_marker(cls, path: Location, marker: Marker) -> CheckpointInfo:
        return cls(
            step=marker.step,
            epoch=marker.epoch,
            metrics=dict(marker.metrics),
            path=path,
            bytes=marker.total_bytes,
            created=marker.created,
            extra=dict(marker.extra),
            files={k: f.to_json() for k, f in marker.files.items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "path": f"{layout.CHECKPOINTS_DIR}/{self.path.name}",
            "bytes": self.bytes,
            "created": self.created,
            "extra": dict(self.extra),
            "files": dict(self.files),
            **({"tiers": list(self.tiers)} if self.tiers else {}),
        }

    @classmethod
    def from_json(cls, experiment_dir: Location, d: Mapping[str, Any]) -> CheckpointInfo:
        return cls(
            step=int(d["step"]),
            epoch=None if d["epoch"] is None else int(d["epoch"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            path=experiment_dir / str(d["path"]),
            bytes=int(d["bytes"]),
            created=float(d["created"]),
            extra=dict(d.get("extra") or {}),
            files=dict(d.get("files") or {}),
            tiers=tuple(str(t) for t in d.get("tiers") or ()),
        )


def read_index(exp: layout.ExperimentLayout) -> list[CheckpointInfo] | None:
    """The entries of ``index.json``, or None if it is missing or unreadable."""
    try:
        data = json.loads(storage_of(exp.root).read_bytes(exp.index_path))
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            return None
        return [CheckpointInfo.from_json(exp.root, d) for d in data["checkpoints"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s); it will be rebuilt from the markers", exp.index_path, e)
        return None


def write_index(
    exp: layout.ExperimentLayout,
    entries: Iterable[CheckpointInfo],
    storage: Storage,
    *,
    best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    fsync: bool = True,
) -> None:
    """Only the lease holder calls it (the catalog, ``dcp-engine gc``). ``monitor`` and
    ``mode``: what ranked ``best``, for readers that are not told."""
    entries = sorted(entries, key=lambda c: c.step)
    data = {
        "format": INDEX_FORMAT,
        "latest": entries[-1].step if entries else None,
        "best": best,
        "monitor": monitor,
        "mode": mode,
        "checkpoints": [e.to_json() for e in entries],
    }
    payload = json.dumps(data, indent=1, allow_nan=True).encode()
    storage.write_atomic(exp.index_path, payload, fsync=fsync)


def _recorded(exp: layout.ExperimentLayout) -> dict[str, Any]:
    try:
        data = json.loads(storage_of(exp.root).read_bytes(exp.index_path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_aliases(exp: layout.ExperimentLayout) -> dict[str, int]:
    """The steps the index says ``latest`` and ``best`` are (where the aliases themselves
    cannot be read: a web server answers a symlinked directory with a page)."""
    data = _recorded(exp)
    return {a: data[a] for a in layout.ALIASES if isinstance(data.get(a), int)}


def recorded_monitor(exp: layout.ExperimentLayout) -> tuple[str | None, str | None]:
    """The ``monitor`` and ``mode`` the index recorded (None, None if it has none)."""
    data = _recorded(exp)
    if not isinstance(data.get("monitor"), str):
        return None, None
    mode = data.get("mode")
    return data["monitor"], mode if mode in ("min", "max") else None


def same_entries(a: list[CheckpointInfo], b: list[CheckpointInfo]) -> bool:
    """Whether two entry lists say the same (NaN metrics compare equal)."""

    def key(c: CheckpointInfo) -> tuple[Any, ...]:
        metrics = tuple(sorted((k, "nan" if math.isnan(v) else v) for k, v in c.metrics.items()))
        extra = json.dumps(dict(c.extra), sort_keys=True, allow_nan=True)
        files = json.dumps(dict(c.files), sort_keys=True)
        return (c.step, c.epoch, metrics, c.path.name, c.bytes, c.created, extra, files)

    return [key(c) for c in a] == [key(c) for c in b]


Which = str | int | os.PathLike[str] | URL
