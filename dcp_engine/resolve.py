"""Finding checkpoints on disk, read-only: scan an experiment, resolve ``which``, check
files against their marker. Nothing here writes (the reader, the CLI and the catalog all
stand on it).

Every directory under ``checkpoints/`` is one of:

- *committed*: ``step_X/`` with a marker that reads (its digest and schema check out)
  and DCP's ``.metadata``;
- *corrupt*: ``step_X/`` that looks committed (it has a ``COMMITTED`` entry) but whose
  marker does not read, or whose step disagrees with its name: never loaded, reported
  by name, quarantined by the lease holder on resume;
- *torn*: ``step_X.tmp/`` (in flight or crashed), or ``step_X/`` without a marker (not
  ours: the commit renames only after the marker);
- *quarantined*: ``step_X.corrupt/``, moved aside earlier;
- anything else is not ours and is never listed, loaded or deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import index, layout, retention, spellings
from .digests import ALGORITHM
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError, NotACheckpointError
from .index import CheckpointInfo, Which
from .location import URL, Location, as_location
from .marker import Marker, MarkerError
from .native_reader import NativeReader
from .storage import storage_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scan:
    committed: list[CheckpointInfo]
    """Committed checkpoints, oldest (lowest step) first."""
    corrupt: list[tuple[Location, str]] = field(default_factory=list)
    """Committed-looking directories that cannot be read, and why."""
    torn: list[tuple[Location, str]] = field(default_factory=list)
    """``.tmp`` directories and marker-less step directories, and why."""
    quarantined: list[Location] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    """A checkpoint ``which`` may resolve to: its marker, or why it cannot be used."""

    path: Location
    step: int
    marker: Marker | None
    problem: str | None = None


def read_marker(checkpoint_dir: Location) -> Marker:
    """The marker of ``checkpoint_dir``: ``NotACheckpointError`` if it has none,
    ``MarkerError`` (an ``IntegrityError``) if it has one that does not read."""
    path = layout.marker_path(checkpoint_dir)
    try:
        raw = storage_of(path).read_bytes(path)
    except FileNotFoundError:
        raise NotACheckpointError(
            f"{checkpoint_dir} is not a committed checkpoint (no {layout.MARKER_FILE} marker)"
        ) from None
    except OSError as e:  # e.g. a directory named COMMITTED
        raise MarkerError(f"marker {path} is corrupt: {e.strerror or e}") from None
    return Marker.from_bytes(raw, str(path))


def inspect_checkpoint_dir(path: Location) -> tuple[CheckpointInfo, Marker]:
    """A committed checkpoint's info and marker; ``NotACheckpointError`` (not one) or
    ``IntegrityError`` (looks committed, cannot be read) saying why."""
    storage = storage_of(path)
    if not storage.is_dir(path):
        raise NotACheckpointError(f"{path} is not a directory")
    if layout.parse_tmp_dirname(path.name) is not None:
        raise NotACheckpointError(f"{path} is in flight or torn (.tmp), never loaded")
    marker = read_marker(path)
    step = layout.parse_step_dirname(path.name)
    if step is not None and step != marker.step:
        raise MarkerError(f"{path}: its marker says step {marker.step}")
    if not storage.is_file(layout.dcp_metadata_path(path)):
        raise IntegrityError(f"{path} has a marker but no {layout.DCP_METADATA_FILE}")
    return CheckpointInfo.from_marker(path, marker), marker


def scan(exp: layout.ExperimentLayout) -> Scan:
    """Every directory of ours under ``checkpoints/``, sorted into the kinds above."""
    found = Scan([])
    for entry in storage_of(exp.root).children(exp.checkpoints_dir):
        if entry.kind == "link" or entry.name in layout.ALIASES:
            continue  # aliases
        child = exp.checkpoints_dir / entry.name
        if layout.parse_tmp_dirname(child.name) is not None:
            found.torn.append((child, "in flight or torn (.tmp)"))
        elif layout.parse_corrupt_dirname(child.name) is not None:
            found.quarantined.append(child)
        elif layout.parse_step_dirname(child.name) is not None:
            try:
                found.committed.append(inspect_checkpoint_dir(child)[0])
            except IntegrityError as e:
                found.corrupt.append((child, str(e)))
            except NotACheckpointError as e:
                found.torn.append((child, str(e)))
    found.committed.sort(key=lambda c: c.step)
    return found


def file_problems(
    checkpoint_dir: Location,
    marker: Marker,
    *,
    digests: bool = True,
    names: Iterable[str] | None = None,
) -> list[str]:
    """One line per listed file (or of ``names`` among them) that is missing, of the wrong
    size or (``digests``) whose digest differs; empty if all match. Files without a
    recorded digest (saved with ``digests=False``) are checked by size."""
    problems = []
    storage = storage_of(checkpoint_dir)
    for name in sorted(marker.files if names is None else names):
        meta, path = marker.files[name], checkpoint_dir / name
        try:
            size = storage.size(path)
            if size != meta.size:
                problems.append(f"{path} is {size} bytes, the marker says {meta.size}")
                continue
            if digests and meta.crc32 is not None:
                actual = storage.digest(path)
                if actual != meta.crc32:
                    problems.append(f"{path}: {ALGORITHM} {actual}, the marker says {meta.crc32}")
        except FileNotFoundError:
            problems.append(f"{path} is missing (listed in the marker)")
        except OSError as e:  # unreadable is as bad as corrupt, and said alike on every rank
            problems.append(f"{path} is unreadable: {e.strerror or e}")
    return problems


def check_files(checkpoint_dir: Location, marker: Marker, *, digests: bool = False) -> None:
    """Every listed file has its size (with ``digests``: its digest; every byte is read),
    and DCP's metadata reads. ``IntegrityError`` naming the first bad file."""
    for problem in file_problems(checkpoint_dir, marker, digests=digests):
        raise IntegrityError(problem)
    try:
        NativeReader(checkpoint_dir).read_metadata()
    except Exception as e:
        raise IntegrityError(
            f"{layout.dcp_metadata_path(checkpoint_dir)} is unreadable: {e}"
        ) from e


def follow(path: str | os.PathLike[str] | Location) -> Location:
    """``path`` as a location, resolved, an alias (``.../checkpoints/latest``: a symlink
    on disk, an object naming its checkpoint on an object store) followed; a guide's file
    name that is not a file here (``checkpoint_latest.pth``, ``ckpt_epoch_10.pth``:
    ``spellings.py``) taken for what it names; ``CheckpointNotFoundError`` if nothing is
    there."""
    p = as_location(path)
    storage = storage_of(p)
    if not storage.exists(p):
        p = _spelled(p)
    p = storage.resolve(p)
    if p.name in layout.ALIASES and not storage.is_dir(p):
        target = storage.read_alias(p)
        if target is None or layout.parse_step_dirname(target) is None:
            raise CheckpointNotFoundError(f"alias {p} does not name a checkpoint")
        p = p.parent / target
        if not storage.exists(p):
            raise CheckpointNotFoundError(f"alias {p.parent / p.name} names a missing {p}")
    return p


def _spelled(p: Location) -> Location:
    """The alias or checkpoint a guide's file name names in the experiment around it."""
    spelling = spellings.parse(p.name)
    if spelling is None:
        raise CheckpointNotFoundError(f"{p} does not exist")
    exp = _experiment_around(p)
    what = f"{p} names {spelling.describe()} of {exp.root}"
    if spelling.alias is not None:
        alias = exp.alias_path(spelling.alias)
        if not storage_of(alias).exists(alias):
            why = " (kept only with a monitor: set monitor)" * (spelling.alias == "best")
            raise CheckpointNotFoundError(f"{what}, which has no {spelling.alias} checkpoint{why}")
        return alias
    committed = scan(exp).committed
    if spelling.step is not None:
        found = [c for c in committed if c.step == spelling.step]
        there = "steps " + ", ".join(str(c.step) for c in committed)
    else:
        found = [c for c in committed if c.epoch == spelling.epoch]
        first = int(spelling.counted_from_1)
        ends = sorted({c.epoch + first for c in committed if c.epoch is not None})
        there = "epochs " + ", ".join(map(str, ends)) + (" (counted from 1)" if first else "")
    if not found:
        raise CheckpointNotFoundError(f"{what}: there is none (its checkpoints end {there})")
    return found[-1].path  # the newest of an epoch: its end


def _experiment_around(p: Location) -> layout.ExperimentLayout:
    """The experiment a file name ``p`` sits in: ``p``'s directory, the experiment of that
    ``checkpoints/`` directory, or the only experiment in that directory."""
    d, storage = p.parent, storage_of(p)
    if _is_experiment(d):
        return layout.ExperimentLayout(d)
    if d.name == layout.CHECKPOINTS_DIR and _is_experiment(d.parent):
        return layout.ExperimentLayout(d.parent)
    found = []
    if storage.is_dir(d):
        found = sorted(c.name for c in storage.children(d) if _is_experiment(d / c.name))
    if len(found) == 1:
        return layout.ExperimentLayout(d / found[0])
    if not found:
        raise CheckpointNotFoundError(
            f"{p} does not exist, and {d} is neither an experiment nor a directory of one"
        )
    raise CheckpointNotFoundError(
        f"{p} does not exist, and {d} holds several experiments ({', '.join(found)}): name "
        f"one, e.g. {d / found[0] / p.name}"
    )


def _is_experiment(d: Location) -> bool:
    """An experiment of ours: an index, or a ``checkpoints/`` holding names of ours."""
    storage = storage_of(d)
    if storage.exists(d / layout.INDEX_FILE):
        return True
    ckpts = d / layout.CHECKPOINTS_DIR
    return storage.is_dir(ckpts) and any(
        c.name in layout.ALIASES or layout.parse_step_dirname(c.name) is not None
        for c in storage.children(ckpts)
    )


def checkpoint_dir_of(path: str | os.PathLike[str] | Location) -> Location:
    """The committed checkpoint a path names: a checkpoint directory, an alias to one, or
    an experiment directory (its latest). Raises saying why there is none."""
    p = follow(path)
    if storage_of(p).is_dir(p / layout.CHECKPOINTS_DIR):  # an experiment: its latest
        committed = scan(layout.ExperimentLayout(p)).committed
        if not committed:
            raise CheckpointNotFoundError(f"experiment {p} has no committed checkpoint")
        return committed[-1].path
    return inspect_checkpoint_dir(p)[0].path


def candidates(
    exp: layout.ExperimentLayout, which: Which, *, monitor: str | None, mode: str
) -> list[Candidate]:
    """What ``which`` may resolve to, in order of preference. ``"latest"``: every
    committed-looking checkpoint, newest first (a corrupt one with its problem, for the
    caller to report and quarantine); ``"best"``: committed ones with a finite
    ``monitor`` value, best first; a step or a path: that one (``CheckpointNotFoundError``
    if it is not there, ``NotACheckpointError`` if it is not committed)."""
    if which in ("latest", "best"):
        found = scan(exp)
        corrupt = []
        for path, why in found.corrupt:
            step = layout.parse_step_dirname(path.name)
            assert step is not None  # scan sorted it by its name
            corrupt.append(Candidate(path, step, None, why))
        if which == "best":  # a corrupt one has no metric to rank by: after the others
            ranked = _by_metric(exp, found.committed, monitor, mode)
            return [_candidate(c.path, c.step) for c in ranked] + corrupt
        out = [_candidate(c.path, c.step) for c in found.committed] + corrupt
        return sorted(out, key=lambda c: -c.step)
    if isinstance(which, int) and not isinstance(which, bool):
        path = exp.step_dir(which)
        if not storage_of(path).exists(path):
            raise CheckpointNotFoundError(_missing_step_message(exp, which))
    elif isinstance(which, (str, os.PathLike, URL)):
        try:
            path = follow(which)
        except CheckpointNotFoundError as e:
            raise CheckpointNotFoundError(f"checkpoint path {e}") from None
    else:
        raise TypeError(f"which must be 'latest', 'best', a step or a path, got {which!r}")
    info, marker = inspect_checkpoint_dir(path)
    return [_candidate(info.path, info.step, marker)]


def _candidate(path: Location, step: int, marker: Marker | None = None) -> Candidate:
    """A candidate with its marker re-read and its files' sizes checked now."""
    try:
        marker = marker or read_marker(path)
        check_files(path, marker)
    except CheckpointError as e:
        return Candidate(path, step, None, str(e))
    return Candidate(path, step, marker)


def _by_metric(
    exp: layout.ExperimentLayout, entries: list[CheckpointInfo], monitor: str | None, mode: str
) -> list[CheckpointInfo]:
    """Entries with a finite ``monitor`` value, best first. Without a ``monitor`` the
    experiment's recorded one ranks, in its recorded direction."""
    monitor, mode = ranking(exp, monitor, mode if monitor is not None else None)
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
    return ranked


def find_checkpoints(
    experiment_dir: str | os.PathLike[str] | Location | None = None,
    mode: str = "latest",
    *,
    checkpoint_dir: str | os.PathLike[str] | Location | None = None,
    monitor: str | None = None,
    metric_mode: str | None = None,
) -> list[CheckpointInfo]:
    """The committed checkpoints of an experiment, read from their markers (no process
    group, nothing written): ``mode="latest"``: newest first; ``mode="best"``: best first
    by ``monitor`` (default: the ``checkpoint.monitor``/``mode`` of the experiment's
    ``config.yaml``), checkpoints without a finite value last. ``checkpoint_dir`` (Dream
    Trainer's name) is the same as ``experiment_dir``; either may name the experiment or
    its ``checkpoints/`` directory. Each item's ``metric`` is its value of the monitor."""
    given = experiment_dir if checkpoint_dir is None else checkpoint_dir
    if given is None or (experiment_dir is not None and checkpoint_dir is not None):
        raise TypeError("find_checkpoints takes one of experiment_dir or checkpoint_dir")
    root = as_location(given)
    if root.name == layout.CHECKPOINTS_DIR and not _is_experiment(root):
        root = root.parent  # an experiment's checkpoints/
    exp = layout.ExperimentLayout(root)
    if not storage_of(exp.root).is_dir(exp.root):
        raise CheckpointNotFoundError(f"experiment directory {exp.root} does not exist")
    committed = scan(exp).committed
    if mode == "latest":
        found, ranked_by = list(reversed(committed)), monitor or monitor_of(exp)[0]
    elif mode == "best":
        ranked_by, metric_mode = ranking(exp, monitor, metric_mode)
        found = retention.rank_by_metric(committed, ranked_by, metric_mode)
    else:
        raise ValueError(f"mode must be 'latest' or 'best', got {mode!r}")
    return [dataclasses.replace(c, ranked_by=ranked_by) for c in found]


def ranking(exp: layout.ExperimentLayout, monitor: str | None, mode: str | None) -> tuple[str, str]:
    """The metric and direction that rank ``exp``'s checkpoints: the ones given, else
    the ``checkpoint.monitor``/``mode`` the experiment recorded in its ``config.yaml``."""
    if monitor is None:
        monitor, saved_mode = monitor_of(exp)
        mode = mode or saved_mode
    if monitor is None:
        raise CheckpointError(
            f"picking the best checkpoint of {exp.root} needs a metric: set "
            f"CheckpointConfig.monitor (or pass monitor=), or checkpoint.monitor in "
            f"{exp.config_path}"
        )
    return monitor, mode or "min"


def monitor_of(exp: layout.ExperimentLayout) -> tuple[str | None, str | None]:
    """The metric the experiment ranks by: ``checkpoint.monitor``/``mode`` of its
    ``config.yaml``, else what its index recorded (a ``run_config`` without a
    ``checkpoint:`` block)."""
    import yaml

    try:
        data = yaml.safe_load(storage_of(exp.root).read_bytes(exp.config_path).decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None
    block = data.get("checkpoint") if isinstance(data, dict) else None
    monitor = block.get("monitor") if isinstance(block, dict) else None
    if not isinstance(monitor, str) or not monitor:
        return index.recorded_monitor(exp)
    mode = block.get("mode") if isinstance(block, dict) else None
    return monitor, mode if mode in ("min", "max") else None


def _missing_step_message(exp: layout.ExperimentLayout, step: int) -> str:
    committed = [e.step for e in scan(exp).committed]
    tmp = exp.tmp_dir(step)
    latest = f"latest committed is step {committed[-1]}" if committed else "none is committed"
    if storage_of(tmp).exists(tmp):
        return f"checkpoint {tmp} is incomplete (no {layout.MARKER_FILE} marker); {latest}"
    return f"no checkpoint for step {step} in {exp.checkpoints_dir}; {latest}"


__all__ = [
    "Candidate",
    "Scan",
    "candidates",
    "check_files",
    "checkpoint_dir_of",
    "follow",
    "file_problems",
    "find_checkpoints",
    "inspect_checkpoint_dir",
    "monitor_of",
    "ranking",
    "read_marker",
    "scan",
]
