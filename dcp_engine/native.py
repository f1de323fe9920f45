"""The engine's shard format under DCP's planner and metadata: raw tensor bytes, one file
per rank.

DCP's ``FileSystemWriter`` wraps every tensor in its own ``torch.save`` archive (a zip
writer and a pickler per item, about 1 ms each): two thirds of a save's CPU time. Here a
rank's write items go into ONE file ``__<rank>_0.raw`` in plan order, each tensor as its
bytes (row-major, native byte order, the dtype the plan says), each non-tensor value as
the bytes DCP's planner serialised; every byte passes through the storage's hashing
stream, so the file's digest costs no second pass. DCP's ``.metadata`` (written by the
coordinator in ``finish``) maps every item to a ``ShardSlice``: file, offset, length,
dtype and shape.

``NativeWriter``/``NativeReader`` are DCP ``StorageWriter``/``StorageReader``s, so stock
DCP reads and writes this format too::

    dcp.load(state, storage_reader=dcp_engine.storage_reader(path))

``NativeReader`` also reads checkpoints in DCP's stock format (``torch.save`` per item),
which the engine wrote before ``raw/1``; ``dcp-engine export --format dcp`` converts to
it for readers without dcp_engine.

The reader reads each tensor straight into its destination when the destination is a
contiguous CPU tensor of the stored dtype and the whole stored chunk is wanted (no
intermediate copy); otherwise (resharding, a dtype change, a device tensor) through one
scratch buffer of that chunk.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .digests import ALGORITHM, HashingFileSystem, file_digest, hexdigest
from .errors import IntegrityError
from .marker import SHARDS_RAW as FORMAT

METADATA_FILE = ".metadata"
_FILE_KEY = "__dcp_engine_file__/"


def shard_name(rank: int, k: int = 0) -> str:
    """The ``k``-th file of ``rank`` (one unless ``write_threads`` > 1)."""
    return f"__{rank}_{k}.raw"


@dataclass(frozen=True)
class ShardSlice:
    """Where one write item's bytes are (``Metadata.storage_data`` values)."""

    relative_path: str
    offset: int
    length: int
    dtype: str = ""
    """The stored tensor's dtype (``"float32"``); empty for a serialised non-tensor."""
    shape: tuple[int, ...] = ()
    """The stored chunk's shape."""


@dataclass(frozen=True)
class FileWritten:
    """One file a rank wrote: its size and, with digests on, its ``crc32``."""

    name: str
    digest: dict[str, Any]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str, where: str = "the checkpoint's metadata") -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise IntegrityError(f"{where}: unknown dtype {name!r}")
    return dtype


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, row-major (a copy only if it is not contiguous)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_items(
    stream: IO[bytes],
    name: str,
    items: Iterable[WriteItem],
    resolve: Callable[[WriteItem], Any],
) -> list[WriteResult]:
    """Write ``items`` into ``stream`` (at its current end) in order; their results.
    ``resolve`` gives a tensor's item its tensor, or the bytes of a staging buffer that
    holds exactly its chunk (a ``memoryview``, made once per buffer)."""
    results = []
    offset = 0
    for item in items:
        data = resolve(item)
        if item.type == WriteItemType.BYTE_IO:
            view = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
            info = ShardSlice(name, offset, len(view))
        elif isinstance(data, memoryview):  # a staging buffer's bytes, as the plan says
            td = item.tensor_data
            assert td is not None
            view = data
            info = ShardSlice(name, offset, len(view), dtype_name(td.properties.dtype),
                              tuple(td.chunk.sizes))  # fmt: skip
        else:
            if not isinstance(data, torch.Tensor):
                raise TypeError(f"{item.index.fqn}: expected a tensor, got {type(data).__name__}")
            if data.device.type != "cpu":
                data = data.cpu()
            view = tensor_view(data)
            info = ShardSlice(name, offset, len(view), dtype_name(data.dtype), tuple(data.shape))
        if len(view):
            stream.write(view)
        offset += len(view)
        results.append(WriteResult(index=item.index, size_in_bytes=len(view), storage_data=info))
    return results


def write_rank_file(
    fs: HashingFileSystem,
    directory: Path,
    name: str,
    items: list[WriteItem],
    resolve: Callable[[WriteItem], Any],
    *,
    fsync: bool,
) -> tuple[list[WriteResult], FileWritten]:
    """One rank's file: every item, then fsync; the results and the file's digest."""
    path = directory / name
    with fs.create_stream(path, "wb") as stream:
        results = write_items(stream, name, items, resolve)
        stream.flush()
        if fsync:
            os.fsync(stream.fileno())
    return results, FileWritten(name, fs.digests[name])


def metadata_bytes(
    metadata: Metadata, results: Iterable[WriteResult], *, checkpoint_id: str | None = None
) -> bytes:
    """DCP's metadata with every item's ``ShardSlice``, pickled (as DCP's ``.metadata``)."""
    return pickle.dumps(
        dataclasses.replace(
            metadata,
            version=CURRENT_DCP_VERSION,
            storage_data={r.index: r.storage_data for r in results},
            storage_meta=None if checkpoint_id is None else StorageMeta(checkpoint_id),
        )
    )


def write_metadata(
    fs: HashingFileSystem, directory: Path, data: bytes, *, fsync: bool
) -> FileWritten:
    """The coordinator's ``.metadata`` (``metadata_bytes``), hashed as it is written."""
    with fs.create_stream(directory / METADATA_FILE, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return FileWritten(METADATA_FILE, fs.digests[METADATA_FILE])


class NativeWriter(StorageWriter):
    """DCP ``StorageWriter`` for the ``raw/1`` format (for ``dcp.save``; the engine's own
    saves call ``write_rank_file``/``write_metadata`` directly). After ``finish`` on the
    coordinator, ``files`` holds every file's digest."""

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, digests: bool = True
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.fsync = fsync
        self._digests = digests
        self.rank = 0
        self.files: dict[str, dict[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.files = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fs = HashingFileSystem(hashing=self._digests)
        results, written = write_rank_file(fs, self.path, shard_name(self.rank), plan.items,
                                           planner.resolve_data, fsync=self.fsync)  # fmt: skip
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([*results, file_result(written)])
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        items, files = split_results(r for per_rank in results for r in per_rank)
        fs = HashingFileSystem(hashing=self._digests)
        data = metadata_bytes(metadata, items, checkpoint_id=str(self.path))
        meta = write_metadata(fs, self.path, data, fsync=self.fsync)
        self.files = {f.name: f.digest for f in [*files, meta]}

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def file_result(written: FileWritten) -> WriteResult:
    """A file's digest, carried to the coordinator among the write results."""
    return WriteResult(
        index=MetadataIndex(_FILE_KEY + written.name),
        size_in_bytes=int(written.digest["size"]),
        storage_data=written,
    )


def split_results(results: Iterable[WriteResult]) -> tuple[list[WriteResult], list[FileWritten]]:
    items, files = [], []
    for r in results:
        if isinstance(r.storage_data, FileWritten):
            files.append(r.storage_data)
        else:
            items.append(r)
    return items, files


class NativeReader(FileSystemReader):
    """DCP ``StorageReader`` for the engine's checkpoints: ``raw/1`` items read raw,
    items in DCP's stock format (older checkpoints) as DCP reads them.

    With ``digests`` (file name -> size and ``crc32``, from the marker) every ``raw/1``
    file is checked before its content is handed on as loaded: in the same pass when
    this rank reads all of it in order (the usual case: its own file), else by a read of
    its own first. A mismatch raises ``DigestMismatch`` naming the file (wrapped by DCP
    in a ``CheckpointException``); what was read went into the planner's targets only."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        digests: Mapping[str, tuple[int, str | None]] | None = None,
    ) -> None:
        super().__init__(path)
        self.digests = digests

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw: list[Any] = []
        stock: list[Any] = []
        for r in plan.items:
            (raw if isinstance(self.storage_data[r.storage_index], ShardSlice) else stock).append(r)
        if stock:  # DCP's format (or a mix)
            super().read_data(dataclasses.replace(plan, items=stock), planner).wait()
        per_file: dict[str, list[tuple[ShardSlice, Any]]] = {}
        for req in raw:
            info: ShardSlice = self.storage_data[req.storage_index]
            per_file.setdefault(info.relative_path, []).append((info, req))
        for name, reqs in per_file.items():
            path = Path(self.path) / name
            ordered = sorted(reqs, key=lambda p: p[0].offset)
            size, expected = (self.digests or {}).get(name, (0, None))
            in_pass = expected is not None and _covers([i for i, _ in ordered], size)
            if expected is not None and not in_pass:
                _check_digest(path, file_digest(path), expected)
            crc = 0
            values: list[tuple[Any, bytearray]] = []  # unpickled once the file checks out
            with open(path, "rb", buffering=0) as f:
                for info, req in ordered:
                    view = _read_item(f, path, info, req, planner, values)
                    if in_pass:
                        crc = zlib.crc32(view, crc)
            if in_pass and expected is not None:
                _check_digest(path, hexdigest(crc), expected)
            for req, data in values:
                planner.load_bytes(req, io.BytesIO(data))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _covers(infos: list[ShardSlice], size: int) -> bool:
    """Whether these slices, in order, are the whole file, each byte once."""
    pos = 0
    for info in infos:
        if info.offset != pos:
            return False
        pos += info.length
    return pos == size


class DigestMismatch(IntegrityError):
    """A file read for a load is not what was written."""


def _check_digest(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise DigestMismatch(f"{path}: {ALGORITHM} {actual}, the marker says {expected}")


def _read_item(
    f: Any,
    path: Path,
    info: ShardSlice,
    req: Any,
    planner: LoadPlanner,
    values: list[tuple[Any, bytearray]],
) -> memoryview:
    """Read one item: a tensor into its target, a serialised value into ``values``; the
    bytes read (for the digest)."""
    f.seek(info.offset)
    if req.type == LoadItemType.BYTE_IO:
        data = bytearray(info.length)
        _read_into(f, memoryview(data), path, info)
        values.append((req, data))
        return memoryview(data)
    dtype = to_dtype(info.dtype, f"{path}: {req.storage_index.fqn}")
    target = planner.resolve_tensor(req).detach()
    whole = all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == info.shape
    if (
        whole
        and target.device.type == "cpu"
        and target.dtype == dtype
        and target.is_contiguous()
        and tuple(target.shape) == info.shape
    ):
        view = tensor_view(target)
        _read_into(f, view, path, info)  # straight into the destination
    else:
        scratch = torch.empty(info.shape, dtype=dtype)
        view = tensor_view(scratch)
        _read_into(f, view, path, info)
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
            scratch = scratch.narrow(dim, start, length)
        if tuple(target.shape) != tuple(scratch.shape):
            fqn = req.storage_index.fqn
            raise IntegrityError(
                f"{path}: {fqn} has shape {tuple(scratch.shape)}, its target {tuple(target.shape)}"
            )
        target.copy_(scratch)
    planner.commit_tensor(req, target)
    return view


def _read_into(f: Any, view: memoryview, path: Path, info: ShardSlice) -> None:
    view = view.cast("B") if view.format != "B" else view
    if len(view) != info.length:
        raise IntegrityError(
            f"{path}: item at offset {info.offset} holds {info.length} bytes, its target "
            f"{len(view)}"
        )
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise IntegrityError(
                f"{path} is truncated: {info.length} bytes expected at offset {info.offset}, "
                f"the file ends after {done}"
            )
        done += n


def storage_writer(path: str | os.PathLike[str], *, fsync: bool = True) -> NativeWriter:
    """A DCP ``StorageWriter`` writing the engine's ``raw/1`` format (``dcp.save``)."""
    return NativeWriter(path, fsync=fsync)


def storage_reader(path: str | os.PathLike[str]) -> NativeReader:
    """A DCP ``StorageReader`` for a checkpoint of the engine (either shard format):
    ``dcp.load(state, storage_reader=dcp_engine.storage_reader(path))``. Reads only; it
    does not check digests (``open_checkpoint`` and the manager do)."""
    return NativeReader(path)


__all__ = [
    "FORMAT",
    "NativeReader",
    "NativeWriter",
    "ShardSlice",
    "storage_reader",
    "storage_writer",
]
