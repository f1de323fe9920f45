"""``adopt``: a checkpoint written by stock DCP (``dcp.save``: torchtitan's ``step-10/``)
committed into an experiment, so that a migrating run continues from it.

    dcp_engine.adopt("outputs/checkpoint/step-10", "experiments/run1", step=10)

1. The source is checked before anything is written: its ``.metadata`` reads, every item
   it lists (every chunk of every tensor) has a place in a file, and every such file
   exists and is long enough for its items.
2. As the lease holder of the experiment (created if needed), a save of ``step`` begins
   (``Committer.begin``: refused for a step at or below a committed one). The files the
   checkpoint is made of (``.metadata`` and the files it lists; nothing else) are copied
   into ``step_X.tmp/`` with their CRC-32 computed as they stream (``move``: hashed, then
   renamed there; local disks only, one file system). With a ``layout`` other than
   ``stock`` (``relayout.py``: torchtitan's ``step-N/``, its model's parameters nested under
   ``model``), ``.metadata`` is written renamed instead of copied, and hashed as written;
   a move then deletes the source's once committed.
3. The marker (sizes, digests, an ``adopted`` entry per top-level key, shards in DCP's
   stock format) is written and the directory published: the commit protocol of a save.

A failure before the commit removes ``step_X.tmp/`` and leaves the source as it was (a
move puts the files it moved back). Values load into whatever the caller's ``app_state``
has (``saved.codec_for_saved``): modules, optimizers in any of the layouts
``optim_layout`` reads, tensors, Stateful objects, plain values.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import marker, resolve
from .catalog import Catalog
from .codecs import ADOPTED, TREE
from .comm import quiet_dcp
from .committer import Committer
from .digests import hexdigest
from .errors import CheckpointError, IntegrityError, NotACheckpointError
from .index import CheckpointInfo
from .layout import DCP_METADATA_FILE, MARKER_FILE, ExperimentLayout, dcp_metadata_path, marker_path
from .lease import Lease
from .location import Location, as_location
from .native import ShardSlice
from .native_reader import NativeReader
from .progress import Progress
from .progress import progress as bar_of
from .relayout import STOCK, Relayout, relayout
from .retention import RetentionPolicy
from .storage import Storage, storage_of

_CHUNK = 8 << 20
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")


@dataclass(frozen=True)
class Source:
    """A raw DCP checkpoint that reads: its metadata and the files it is made of."""

    path: Location
    metadata: Metadata
    files: dict[str, int]
    """Relative name -> size: ``.metadata`` and every file it lists."""

    @property
    def shards(self) -> str:
        """The shard format: DCP's stock one, or the engine's (an export of ours)."""
        raw = any(isinstance(w, ShardSlice) for w in (self.metadata.storage_data or {}).values())
        return marker.SHARDS_RAW if raw else marker.SHARDS_TORCH_SAVE

    @property
    def world_size(self) -> int:
        ranks = [int(m.group(1)) for n in self.files if (m := _RANK_FILE.fullmatch(n))]
        return max(ranks, default=0) + 1


def check_source(path: str | os.PathLike[str] | Location) -> Source:
    """``path`` as a raw DCP checkpoint, checked as DCP's read planning would need it;
    ``NotACheckpointError``/``IntegrityError`` naming the path and what is wrong."""
    src = as_location(path)
    storage = storage_of(src)
    if not storage.is_dir(src):
        what = "does not exist" if not storage.exists(src) else "is not a directory"
        raise NotACheckpointError(f"{src} {what}")
    if storage.exists(marker_path(src)):
        raise CheckpointError(
            f"{src} is a dcp-engine checkpoint already (it has a {MARKER_FILE} marker): "
            "branch from it with resume=<its path> instead"
        )
    meta_path = dcp_metadata_path(src)
    if not storage.is_file(meta_path):
        raise NotACheckpointError(f"{src} is not a DCP checkpoint (no {DCP_METADATA_FILE})")
    try:
        metadata = NativeReader(src).read_metadata()
    except Exception as e:
        raise IntegrityError(f"{meta_path} is unreadable: {e}") from e
    needed: dict[str, tuple[int, str]] = {}  # file -> (bytes its items need, one item)
    for index in _items(metadata):
        where = (metadata.storage_data or {}).get(index)
        if where is None:
            raise IntegrityError(f"{meta_path} lists {index.fqn} but no file that holds it")
        end = where.offset + where.length
        if end > needed.get(where.relative_path, (-1, ""))[0]:
            needed[where.relative_path] = (end, index.fqn)
    files = {DCP_METADATA_FILE: storage.size(meta_path)}
    for name, (end, fqn) in sorted(needed.items()):
        try:
            size = storage.size(src / name)
        except FileNotFoundError:
            raise IntegrityError(
                f"{src} is not a complete DCP checkpoint: {name} is missing "
                f"({DCP_METADATA_FILE} has {fqn} in it)"
            ) from None
        if size < end:
            raise IntegrityError(
                f"{src / name} is truncated: {size} bytes, {DCP_METADATA_FILE} needs {end}"
            )
        files[name] = size
    return Source(src, metadata, files)


def _items(metadata: Metadata) -> list[MetadataIndex]:
    """What a read of everything asks the storage for: each chunk of each tensor, each
    serialised value (DCP's planning of a full load)."""
    out: list[MetadataIndex] = []
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            out.extend(MetadataIndex(fqn, chunk.offsets) for chunk in meta.chunks)
        else:
            out.append(MetadataIndex(fqn))
    return out


def entries_of(source: Source) -> dict[str, dict[str, Any]]:
    """A marker entry per top-level key: ``adopted`` (stock DCP does not say what a value
    was), with ``int_keys`` where an optimizer's ``state`` was keyed by parameter id."""
    planner = source.metadata.planner_data or {}
    paths = {fqn: tuple(planner.get(fqn, (fqn,))) for fqn in source.metadata.state_dict_metadata}
    out: dict[str, dict[str, Any]] = {
        str(p[0]): {"kind": ADOPTED, "encoding": TREE} for p in paths.values()
    }
    ids = {f: p for f, p in paths.items() if len(p) >= 4 and p[-3:-1] == ("param_groups", 0)}
    ids = {f: p for f, p in ids.items() if p[-1] == "params"}
    if ids:  # small: the parameter lists of optimizer groups
        values: dict[str, Any] = {}
        with quiet_dcp(True):
            _load_state_dict(
                values,
                storage_reader=NativeReader(source.path),
                planner=_EmptyStateDictLoadPlanner(keys=set(ids)),
                no_dist=True,
            )
        for path in ids.values():
            params: Any = values
            for part in path:
                params = params[part]
            if isinstance(params, list) and all(isinstance(p, int) for p in params):
                entry = out[str(path[0])]
                entry.setdefault("int_keys", []).append([*path[1:-3], "state"])
    return out


def adopt(
    source: str | os.PathLike[str] | Location,
    experiment: str | os.PathLike[str] | Location,
    *,
    step: int,
    move: bool = False,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    progress: bool | None = None,
    storage: Storage | None = None,
    lease_timeout_s: float = 30.0,
    layout: str = STOCK,
) -> CheckpointInfo:
    """Commit the raw DCP checkpoint ``source`` into ``experiment`` (a directory or URL;
    created if needed) as ``step``; returns it as committed. ``move``: rename the files
    instead of copying (both on one local file system; ``source`` is removed if that
    leaves it empty). ``progress``: a bar on stderr (default: on a terminal).
    ``storage``: the experiment's storage seam. ``layout``: how the source's keys become
    entries (``relayout.LAYOUTS``: ``"stock"`` as written, ``"torchtitan"`` its model's
    parameters under ``model``). Refused while a job holds the experiment (its lease), for
    a step at or below one already committed there, and for a source that does not read
    or is not in ``layout``; nothing is written before these checks."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    clean_metrics = marker.clean_metrics(metrics)
    src = check_source(source)
    plan = relayout(src.metadata, layout, src.path)
    exp = ExperimentLayout(as_location(experiment))
    store = storage_of(exp.root, storage)
    if move and not (store.renames and storage_of(src.path).renames):
        raise CheckpointError("--move renames files: DCP_DIR and the experiment must be local")
    store.mkdir(exp.root)
    lease = Lease.acquire(exp.owner_path, store, stale_after_s=lease_timeout_s)
    try:
        store.mkdir(exp.checkpoints_dir)
        committer = Committer(exp, store, lease)
        monitor, mode = resolve.monitor_of(exp)
        policy = RetentionPolicy(monitor=monitor, mode=mode or "min")
        catalog = Catalog(exp, policy, committer=committer, storage=store)
        try:
            committer.sweep()
            catalog.open()
            newest = catalog.newest()
            tmp = committer.begin(step, None if newest is None else newest.step)
            moved: list[str] = []
            try:
                entries = plan.entries(entries_of(src))
                digests = _bring(src, plan, tmp, store, moved if move else None, progress)
                extra = {"adopted_from": str(src.path)}
                if plan.changed:
                    extra["adopted_layout"] = layout
                final, mark = committer.finalize(
                    step,
                    epoch=epoch,
                    metrics=clean_metrics,
                    extra=extra,
                    entries=entries,
                    digests=digests,
                    world_size=src.world_size,
                    shards=src.shards,
                )
            except BaseException:
                for name in reversed(moved):  # the source as it was, then no .tmp
                    store.publish(tmp / name, src.path / name)
                committer.abort(step)
                raise
            info = CheckpointInfo.from_marker(final, mark)
            catalog.add(info)
        finally:
            catalog.close()
    finally:
        lease.release()
    if move:
        reading = storage_of(src.path)
        if plan.changed:  # the committed copy's names differ: the source's is stale now
            reading.remove_file(dcp_metadata_path(src.path))
        if not reading.children(src.path):
            reading.remove_tree(src.path)  # moved out whole: the directory goes
    return info


def _bring(
    src: Source,
    plan: Relayout,
    tmp: Location,
    store: Storage,
    moved: list[str] | None,
    asked: bool | None,
) -> dict[str, dict[str, Any]]:
    """Every file of ``src`` into ``tmp`` with its size and CRC-32: copied, or (``moved``
    given) hashed and then renamed, each name added to ``moved`` once it is in ``tmp``.
    A ``plan`` that renames keys gives ``.metadata`` (pickled, as DCP writes it) in place
    of the source's, which is neither copied nor moved."""
    reading = storage_of(src.path)
    digests: dict[str, dict[str, Any]] = {}
    names = dict(src.files)
    if plan.changed:
        meta = DCP_METADATA_FILE
        del names[meta]
        digests[meta] = _write(store, tmp / meta, pickle.dumps(plan.metadata))
    with bar_of(f"adopt {src.path.name}", sum(names.values()), asked) as bar:
        for name, size in sorted(names.items()):
            if moved is None:
                digests[name] = _copy(reading, src.path / name, store, tmp / name, size, bar)
            else:
                digests[name] = _hash(reading, src.path / name, size, bar)
    for name in sorted(names) if moved is not None else ():
        try:
            store.publish(src.path / name, tmp / name)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            raise CheckpointError(
                f"--move renames files, and {src.path} is on another file system than "
                f"{tmp.parent}: copy instead (without --move)"
            ) from e
        moved.append(name)  # type: ignore[union-attr]
    return digests


def _copy(
    reading: Storage, src: Location, store: Storage, dst: Location, size: int, bar: Progress
) -> dict[str, Any]:
    crc, n = 0, 0
    with reading.open_read(src) as fin, store.open_write(dst) as fout:
        while chunk := fin.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            fout.write(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return _checked(src, n, size, crc)


def _write(store: Storage, dst: Location, data: bytes) -> dict[str, Any]:
    with store.open_write(dst) as fout:
        fout.write(data)
    return {"size": len(data), "crc32": hexdigest(zlib.crc32(data))}


def _hash(reading: Storage, src: Location, size: int, bar: Progress) -> dict[str, Any]:
    crc, n = 0, 0
    with reading.open_read(src) as fin:
        while chunk := fin.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
            bar.update(len(chunk))
    return _checked(src, n, size, crc)


def _checked(src: Location, n: int, size: int, crc: int) -> dict[str, Any]:
    if n != size:
        raise IntegrityError(f"{src} changed while it was adopted: {size} bytes, then {n}")
    return {"size": n, "crc32": hexdigest(crc)}


__all__ = ["Source", "adopt", "check_source", "entries_of"]
