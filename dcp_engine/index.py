"""Rank 0's index of committed checkpoints: a cache of the markers, rebuilt from them.

The markers are the truth. At start the index is compared with a scan of the markers
and rewritten if it is missing, unreadable or stale; after each commit the new entry is
appended. Only committed checkpoints ever enter it (invariant 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import commit, layout, retention
from .errors import CheckpointError, CheckpointNotFoundError, NotACheckpointError

log = logging.getLogger(__name__)

INDEX_FORMAT = "dcp-engine-index/1"


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float] = field(hash=False)
    path: Path
    bytes: int
    created: float
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """What the saver kept in the marker besides metrics (``save(extra=...)``)."""
    files: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    """Every file with its size and digest, as the marker lists them."""

    @classmethod
    def from_marker(cls, path: Path, marker: Mapping[str, Any]) -> CheckpointInfo:
        extra = marker.get("extra")
        return cls(
            step=marker["step"],
            epoch=marker["epoch"],
            metrics=dict(marker["metrics"]),
            path=path,
            bytes=marker["bytes"],
            created=float(marker["created"]),
            extra=dict(extra) if isinstance(extra, dict) else {},
            files=dict(marker["files"]),
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
        }

    @classmethod
    def from_json(cls, experiment_dir: Path, d: Mapping[str, Any]) -> CheckpointInfo:
        return cls(
            step=int(d["step"]),
            epoch=None if d["epoch"] is None else int(d["epoch"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            path=experiment_dir / str(d["path"]),
            bytes=int(d["bytes"]),
            created=float(d["created"]),
            extra=dict(d.get("extra") or {}),
            files=dict(d.get("files") or {}),
        )


@dataclass(frozen=True)
class Scan:
    committed: list[CheckpointInfo]
    """Committed checkpoints, oldest (lowest step) first."""
    torn: list[tuple[Path, str]]
    """Directories with our names that are not committed checkpoints, and why."""


def inspect_checkpoint_dir(path: Path) -> CheckpointInfo:
    """The info of a committed checkpoint directory, or ``NotACheckpointError`` saying why not."""
    if not path.is_dir():
        raise NotACheckpointError(f"{path} is not a directory")
    if layout.parse_tmp_dirname(path.name) is not None:
        raise NotACheckpointError(f"{path} is in flight or torn (.tmp), never loaded")
    marker = commit.read_marker(path)
    if not layout.dcp_metadata_path(path).is_file():
        raise NotACheckpointError(f"{path} has a marker but no {layout.DCP_METADATA_FILE}")
    step = layout.parse_step_dirname(path.name)
    if step is not None and step != marker["step"]:
        raise NotACheckpointError(f"{path}: its marker says step {marker['step']}")
    return CheckpointInfo.from_marker(path, marker)


def checkpoint_dir_of(path: str | os.PathLike[str]) -> Path:
    """The committed checkpoint a path names: a checkpoint directory, an alias to one, or
    an experiment directory (its latest). Raises saying why there is none."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p} does not exist")
    p = p.resolve()
    if (p / layout.CHECKPOINTS_DIR).is_dir():  # an experiment: its latest checkpoint
        found = resolve(layout.ExperimentLayout(p), "latest", monitor=None, mode="min")
        if found is None:
            raise CheckpointNotFoundError(f"experiment {p} has no committed checkpoint")
        return found[0].resolve()
    return inspect_checkpoint_dir(p).path


def scan(exp: layout.ExperimentLayout) -> Scan:
    """Every checkpoint directory of ours under ``checkpoints/``; other names are ignored."""
    committed: list[CheckpointInfo] = []
    torn: list[tuple[Path, str]] = []
    try:
        children = sorted(exp.checkpoints_dir.iterdir())
    except FileNotFoundError:
        return Scan([], [])
    for child in children:
        if child.is_symlink():
            continue  # aliases
        if layout.parse_tmp_dirname(child.name) is not None:
            torn.append((child, "in flight or torn (.tmp)"))
        elif layout.parse_step_dirname(child.name) is not None:
            try:
                committed.append(inspect_checkpoint_dir(child))
            except NotACheckpointError as e:
                torn.append((child, str(e)))
    committed.sort(key=lambda c: c.step)
    return Scan(committed, torn)


def read_index(exp: layout.ExperimentLayout) -> list[CheckpointInfo] | None:
    """The entries of ``index.json``, or None if it is missing or unreadable."""
    try:
        data = json.loads(exp.index_path.read_bytes())
        if data.get("format") != INDEX_FORMAT:
            return None
        return [CheckpointInfo.from_json(exp.root, d) for d in data["checkpoints"]]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s); it will be rebuilt from the markers", exp.index_path, e)
        return None


def write_index(
    exp: layout.ExperimentLayout,
    entries: Iterable[CheckpointInfo],
    *,
    best: int | None = None,
    fsync: bool = True,
) -> None:
    entries = sorted(entries, key=lambda c: c.step)
    data = {
        "format": INDEX_FORMAT,
        "latest": entries[-1].step if entries else None,
        "best": best,
        "checkpoints": [e.to_json() for e in entries],
    }
    payload = json.dumps(data, indent=1, allow_nan=True).encode()
    commit.atomic_write_bytes(exp.index_path, payload, fsync=fsync)


def _same(a: list[CheckpointInfo], b: list[CheckpointInfo]) -> bool:
    def key(c: CheckpointInfo) -> tuple[Any, ...]:
        metrics = tuple(sorted((k, "nan" if math.isnan(v) else v) for k, v in c.metrics.items()))
        extra = json.dumps(dict(c.extra), sort_keys=True, allow_nan=True)
        files = json.dumps(dict(c.files), sort_keys=True)
        return (c.step, c.epoch, metrics, c.path.name, c.bytes, c.created, extra, files)

    return [key(c) for c in a] == [key(c) for c in b]


def reconcile(
    exp: layout.ExperimentLayout,
    *,
    monitor: str | None = None,
    mode: str = "min",
    fsync: bool = True,
) -> Scan:
    """Scan the markers and rewrite ``index.json`` if it does not say the same. Rank 0 only."""
    found = scan(exp)
    cached = read_index(exp)
    stale = cached is None or not _same(cached, found.committed)
    if stale and exp.checkpoints_dir.is_dir():
        if cached is not None or found.committed:  # not news in a new experiment
            reason = "missing or unreadable" if cached is None else "stale"
            n = len(found.committed)
            log.info("%s %s: rebuilt from %d markers", exp.index_path, reason, n)
        top = retention.best(found.committed, monitor, mode)
        write_index(exp, found.committed, best=None if top is None else top.step, fsync=fsync)
    for path, why in found.torn:
        log.warning("not a committed checkpoint, ignored: %s (%s)", path, why)
    return found


Which = str | int | os.PathLike[str]


def resolve(
    exp: layout.ExperimentLayout, which: Which, *, monitor: str | None, mode: str
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint directory that ``which`` names, and its marker; None if there is
    none yet. ``"latest"`` and ``"best"`` pick the newest (best) checkpoint whose files
    check out and skip a bad one with a warning; a step or a path that is bad raises."""
    found = candidates(exp, which, monitor=monitor, mode=mode)
    return found[0] if found else None


def candidates(
    exp: layout.ExperimentLayout, which: Which, *, monitor: str | None, mode: str
) -> list[tuple[Path, dict[str, Any]]]:
    """What ``which`` may resolve to, in order of preference, each with its marker and
    its files' sizes checked: for ``"latest"``/``"best"`` every committed checkpoint
    newest (best) first, a bad one skipped with a warning; for a step or a path, that
    one (raising if it is bad). The caller may go down the list if digests disagree."""
    if which in ("latest", "best"):
        committed = scan(exp).committed
        ranked = committed if which == "latest" else _by_metric(exp, committed, monitor, mode)
        out = []
        for info in reversed(ranked):
            try:
                marker = commit.read_marker(info.path)
                commit.check_files(info.path, marker)
                out.append((info.path, marker))
            except CheckpointError as e:
                log.warning("skipping step %d for which=%r: %s", info.step, which, e)
        return out
    if isinstance(which, int) and not isinstance(which, bool):
        path = exp.step_dir(which)
        if not path.exists():
            raise CheckpointNotFoundError(_missing_step_message(exp, which))
    elif isinstance(which, (str, os.PathLike)):
        path = Path(which)
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint path {path} does not exist")
        path = path.resolve()
    else:
        raise TypeError(f"which must be 'latest', 'best', a step or a path, got {which!r}")
    info = inspect_checkpoint_dir(path)
    marker = commit.read_marker(info.path)
    commit.check_files(info.path, marker)
    return [(path, marker)]


def find_checkpoints(
    experiment_dir: str | os.PathLike[str],
    mode: str = "latest",
    *,
    monitor: str | None = None,
    metric_mode: str | None = None,
) -> list[CheckpointInfo]:
    """The committed checkpoints of an experiment, read from their markers (no process
    group, nothing written): ``mode="latest"``: newest first; ``mode="best"``: best first
    by ``monitor`` (default: the ``checkpoint.monitor``/``mode`` of the experiment's
    ``config.yaml``), checkpoints without a finite value last."""
    exp = layout.ExperimentLayout(Path(experiment_dir))
    if not exp.root.is_dir():
        raise CheckpointNotFoundError(f"experiment directory {exp.root} does not exist")
    committed = scan(exp).committed
    if mode == "latest":
        return list(reversed(committed))
    if mode != "best":
        raise ValueError(f"mode must be 'latest' or 'best', got {mode!r}")
    if monitor is None:
        monitor, saved_mode = monitor_of(exp)
        metric_mode = metric_mode or saved_mode
    if monitor is None:
        raise CheckpointError(
            f"mode='best' needs a monitor: pass monitor=, or set checkpoint.monitor in "
            f"{exp.config_path}"
        )
    return retention.rank_by_metric(committed, monitor, metric_mode or "min")


def monitor_of(exp: layout.ExperimentLayout) -> tuple[str | None, str | None]:
    """``checkpoint.monitor`` and ``checkpoint.mode`` of the experiment's ``config.yaml``."""
    import yaml

    try:
        data = yaml.safe_load(exp.config_path.read_text())
    except (OSError, yaml.YAMLError):
        return None, None
    block = data.get("checkpoint") if isinstance(data, dict) else None
    if not isinstance(block, dict):
        return None, None
    monitor, mode = block.get("monitor"), block.get("mode")
    return (
        monitor if isinstance(monitor, str) else None,
        mode if mode in ("min", "max") else None,
    )


def _by_metric(
    exp: layout.ExperimentLayout, entries: list[CheckpointInfo], monitor: str | None, mode: str
) -> list[CheckpointInfo]:
    """Entries with a finite ``monitor`` value, worst first (so the best is last)."""
    if monitor is None:
        raise CheckpointError("which='best' needs CheckpointConfig.monitor (a metric name)")
    ranked = [
        e
        for e in retention.rank_by_metric(entries, monitor, mode)
        if math.isfinite(retention.metric_of(e, monitor))
    ]
    if entries and not ranked:
        raise CheckpointError(
            f"no committed checkpoint in {exp.checkpoints_dir} has a finite {monitor!r} "
            "metric; cannot pick the best"
        )
    return list(reversed(ranked))


def _missing_step_message(exp: layout.ExperimentLayout, step: int) -> str:
    committed = [e.step for e in scan(exp).committed]
    tmp = exp.tmp_dir(step)
    latest = f"latest committed is step {committed[-1]}" if committed else "none is committed"
    if tmp.exists():
        return f"checkpoint {tmp} is incomplete (no {layout.MARKER_FILE} marker); {latest}"
    return f"no checkpoint for step {step} in {exp.checkpoints_dir}; {latest}"
