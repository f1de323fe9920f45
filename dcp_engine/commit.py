"""The commit protocol: marker, rename, fsync, aliases.

A checkpoint exists only once committed (invariant 1). The order, on rank 0, after every
rank has written and fsynced its shards and DCP has written ``.metadata``:

1. write ``COMMITTED`` (sizes of every file, the entry kinds, step, epoch, metrics)
   into ``step_X.tmp/`` by temp file + fsync + rename, then fsync ``step_X.tmp/``;
2. rename ``step_X.tmp`` to ``step_X`` and fsync ``checkpoints/``;
3. only then update ``index.json`` and move ``latest`` (callers do these).

A crash before 2 leaves a ``.tmp`` directory, which is never loaded; a crash after 2
leaves a committed checkpoint that the index rebuild finds from its marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from . import digests as digests_mod
from . import layout
from .errors import IntegrityError, NotACheckpointError

log = logging.getLogger(__name__)

MARKER_FORMAT = "dcp-engine/1"


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``path`` so that readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def file_sizes(directory: Path) -> dict[str, int]:
    """Sizes of the regular files under ``directory`` (relative POSIX paths), marker excluded."""
    sizes: dict[str, int] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != layout.MARKER_FILE:
            sizes[p.relative_to(directory).as_posix()] = p.stat().st_size
    return sizes


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain floats (tensors and numpy scalars via ``float``); names must be str."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        try:
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {k!r}={v!r} is not a number") from e
    return out


def build_marker(
    *,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float],
    world_size: int,
    entries: Mapping[str, Mapping[str, Any]],
    files: Mapping[str, int],
    digests: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``COMMITTED`` record. ``files``: the sizes on disk; ``digests``: what the
    writers hashed while writing (name -> size, crc32). A file whose hashed size is not
    its size on disk is refused: the digest would not describe it."""
    listed: dict[str, dict[str, Any]] = {}
    for name, size in files.items():
        listed[name] = {"size": size}
        d = (digests or {}).get(name)
        if d is not None:
            if d["size"] != size:
                raise IntegrityError(
                    f"{name}: {size} bytes on disk, but {d['size']} were written and hashed"
                )
            listed[name][digests_mod.ALGORITHM] = d[digests_mod.ALGORITHM]
    return {
        "format": MARKER_FORMAT,
        "step": step,
        "epoch": epoch,
        "metrics": dict(metrics),
        "extra": dict(extra or {}),
        "created": time.time(),
        "world_size": world_size,
        "torch_version": torch.__version__,
        "entries": {k: dict(v) for k, v in entries.items()},
        "files": listed,
        "bytes": sum(files.values()),
    }


def write_marker(tmp_dir: Path, marker: Mapping[str, Any], *, fsync: bool = True) -> None:
    """Step 1 of the commit: the marker, then the directory entries, made durable."""
    data = json.dumps(marker, indent=1, sort_keys=True, allow_nan=True).encode()
    atomic_write_bytes(layout.marker_path(tmp_dir), data, fsync=fsync)


def publish(tmp_dir: Path, final_dir: Path, *, fsync: bool = True) -> None:
    """Step 2 of the commit: the rename that makes the checkpoint exist."""
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; refusing to replace a checkpoint")
    os.rename(tmp_dir, final_dir)
    if fsync:
        fsync_dir(final_dir.parent)


def read_marker(checkpoint_dir: Path) -> dict[str, Any]:
    """The parsed marker of a committed checkpoint; ``NotACheckpointError`` says why not."""
    path = layout.marker_path(checkpoint_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotACheckpointError(
            f"{checkpoint_dir} is not a committed checkpoint (no {layout.MARKER_FILE} marker)"
        ) from None
    try:
        marker = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotACheckpointError(f"{path} is not a valid marker: {e}") from None
    problem = _marker_problem(marker)
    if problem:
        raise NotACheckpointError(f"{path} is not a valid marker: {problem}")
    return marker


def _marker_problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != MARKER_FORMAT:
        return f"format {m.get('format')!r}, expected {MARKER_FORMAT!r}"
    checks = {
        "step": lambda v: isinstance(v, int) and v >= 0,
        "epoch": lambda v: v is None or isinstance(v, int),
        "metrics": lambda v: isinstance(v, dict),
        "created": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
        "world_size": lambda v: isinstance(v, int) and v >= 1,
        "entries": lambda v: isinstance(v, dict),
        "files": lambda v: isinstance(v, dict),
        "bytes": lambda v: isinstance(v, int) and v >= 0,
    }
    for key, ok in checks.items():
        if key not in m or not ok(m[key]):
            return f"field {key!r} missing or malformed"
    return None


def check_files(checkpoint_dir: Path, marker: Mapping[str, Any], *, digests: bool = False) -> None:
    """Every file the marker lists exists with its size (and, with ``digests=True``, its
    digest: every byte is read), and DCP's metadata reads.

    Raises ``IntegrityError`` naming the first bad file.
    """
    for problem in file_problems(checkpoint_dir, marker, digests=digests):
        raise IntegrityError(problem)
    try:
        FileSystemReader(checkpoint_dir).read_metadata()
    except Exception as e:
        raise IntegrityError(
            f"{layout.dcp_metadata_path(checkpoint_dir)} is unreadable: {e}"
        ) from e


def file_problems(
    checkpoint_dir: Path,
    marker: Mapping[str, Any],
    *,
    digests: bool = True,
    names: Iterable[str] | None = None,
) -> list[str]:
    """One line per listed file (or of ``names`` among them) that is missing, of the
    wrong size or (``digests``) whose digest differs; empty if all match. Files without a
    recorded digest (``digests=False`` at save) are checked by size."""
    problems = []
    files = marker["files"]
    for name in sorted(files if names is None else names):
        meta = files[name]
        path = checkpoint_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing (listed in the marker)")
            continue
        if size != meta["size"]:
            problems.append(f"{path} is {size} bytes, the marker says {meta['size']}")
            continue
        expected = meta.get(digests_mod.ALGORITHM)
        if digests and expected is not None:
            actual = digests_mod.file_digest(path)
            if actual != expected:
                problems.append(
                    f"{path}: {digests_mod.ALGORITHM} {actual}, the marker says {expected}"
                )
    return problems


def move_alias(checkpoints_dir: Path, alias: str, target_name: str, *, fsync: bool = True) -> bool:
    """Point ``checkpoints/<alias>`` at ``target_name`` atomically (temp link + rename).

    Returns False, and leaves the name alone, where symlinks are not possible or the name
    is taken by something that is not our symlink; the index stays the truth either way.
    """
    link = checkpoints_dir / alias
    tmp = checkpoints_dir / f".{alias}.{os.getpid()}.tmp"
    try:
        if link.exists() and not link.is_symlink():
            log.warning("%s exists and is not a symlink; not moving the %r alias", link, alias)
            return False
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target_name, tmp)
        os.replace(tmp, link)
        if fsync:
            fsync_dir(checkpoints_dir)
    except OSError as e:  # called after the commit: never turn it into a failed save
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot point %r at %s (%s); the index is the truth", alias, target_name, e)
        return False
    return True


def retire(exp: layout.ExperimentLayout, step: int, *, fsync: bool = True) -> bool:
    """Delete committed checkpoint ``step``: the reverse of the commit. The rename back to
    ``step_X.tmp`` makes it stop existing at once (a crash mid-delete leaves a ``.tmp``
    that is never loaded and is swept), then the files go. Only our own canonical name is
    ever touched. Returns False if it was already gone."""
    final, tmp = exp.step_dir(step), exp.tmp_dir(step)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        log.warning("%s is not a checkpoint directory of ours; not deleting it", final)
        return False
    if tmp.exists():  # a leftover of an earlier retire that crashed: ours by name
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.rename(final, tmp)
    except FileNotFoundError:
        return False
    if fsync:
        fsync_dir(exp.checkpoints_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return True
