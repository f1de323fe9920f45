"""The engine's shard format under DCP's planner and metadata: raw tensor bytes, one file
per rank.

DCP's ``FileSystemWriter`` wraps every tensor in its own ``torch.save`` archive (a zip
writer and a pickler per item, about 1 ms each): two thirds of a save's CPU time. Here a
rank's write items go into ONE file ``__<rank>_0.raw`` in plan order, each tensor as its
bytes (row-major, native byte order, the dtype the plan says), each non-tensor value as
its serialised bytes; every byte passes through the storage's hashing
stream, so the file's digest costs no second pass. DCP's ``.metadata`` (written by the
coordinator) maps every item to a ``ShardSlice``: file, offset, length,
dtype and shape.

``NativeWriter`` (here) and ``native_reader.NativeReader`` are DCP's ``StorageWriter``
and ``StorageReader`` for it, so stock DCP reads and writes this format too::

    dcp.load(state, storage_reader=dcp_engine.storage_reader(path))

``dcp-engine export --format dcp`` converts a checkpoint to DCP's stock format for
readers without dcp_engine. Non-tensor values are serialised here by DCP's planner
(``torch.save`` into the item); the engine's own saves use torch's format without a zip
archive (``shards.rank_write``), which the same ``torch.load`` reads.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .digests import HashingFileSystem
from .errors import IntegrityError
from .location import URL, Location, as_location
from .marker import SHARDS_RAW as FORMAT
from .storage import storage_of

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


Entry = tuple[str, str, tuple[int, ...]]
"""A write item as a writer needs it: its fqn, its stored dtype (``""``: a serialised
value) and its chunk's shape. Plain tuples: they cross the pipe to a writer process."""
Place = tuple[str, int, int]
"""Where a written item is: file, offset, length."""


def entries_of(items: Iterable[WriteItem]) -> list[Entry]:
    out: list[Entry] = []
    for item in items:
        td = item.tensor_data
        if item.type == WriteItemType.BYTE_IO or td is None:
            out.append((item.index.fqn, "", ()))
        else:
            out.append((item.index.fqn, dtype_name(td.properties.dtype), tuple(td.chunk.sizes)))
    return out


def write_items(
    stream: IO[bytes],
    name: str,
    positions: Iterable[int],
    entries: list[Entry],
    data_of: Callable[[int], Any],
) -> list[tuple[int, Place]]:
    """Write the entries at ``positions`` into ``stream`` in that order; where each went.
    ``data_of(position)``: a serialised value's bytes, a tensor, or the bytes of a staging
    buffer that holds exactly the entry's chunk (a ``memoryview``, made once per buffer)."""
    placed = []
    offset = 0
    for pos in positions:
        fqn, dtype, shape = entries[pos]
        data = data_of(pos)
        if isinstance(data, torch.Tensor):
            if data.device.type != "cpu":
                data = data.cpu()
            if dtype_name(data.dtype) != dtype or tuple(data.shape) != shape:
                raise TypeError(f"{fqn}: planned as {dtype} {shape}, the tensor is "
                                f"{dtype_name(data.dtype)} {tuple(data.shape)}")  # fmt: skip
            view = tensor_view(data)
        elif isinstance(data, io.BytesIO):
            view = data.getbuffer()
        else:
            view = memoryview(data)
        if len(view):
            stream.write(view)
        placed.append((pos, (name, offset, len(view))))
        offset += len(view)
    return placed


def write_rank_file(
    fs: HashingFileSystem,
    directory: Location,
    name: str,
    positions: list[int],
    entries: list[Entry],
    data_of: Callable[[int], Any],
) -> tuple[list[tuple[int, Place]], FileWritten]:
    """One rank's file: its entries, made durable (the file system's ``fsync``: an fsync
    on disk, a completed upload on an object store); where each went and its digest."""
    with fs.create_stream(directory / name, "wb") as stream:
        placed = write_items(stream, name, positions, entries, data_of)
        stream.flush()
    return placed, FileWritten(name, fs.digests[name])


def results_of(
    items: list[WriteItem], entries: list[Entry], places: list[Place]
) -> list[WriteResult]:
    """DCP's write results of a rank's items, from where its writer put them."""
    return [
        WriteResult(index=item.index, size_in_bytes=place[2],
                    storage_data=ShardSlice(place[0], place[1], place[2], entry[1], entry[2]))
        for item, entry, place in zip(items, entries, places, strict=True)
    ]  # fmt: skip


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


def write_metadata(fs: HashingFileSystem, directory: Location, data: bytes) -> FileWritten:
    """The coordinator's ``.metadata`` (``metadata_bytes``), hashed as it is written."""
    with fs.create_stream(directory / METADATA_FILE, "wb") as f:
        f.write(data)
        f.flush()
    return FileWritten(METADATA_FILE, fs.digests[METADATA_FILE])


class NativeWriter(StorageWriter):
    """DCP ``StorageWriter`` for the ``raw/1`` format (for ``dcp.save``; the engine's own
    saves call ``write_rank_file``/``write_metadata`` directly). After ``finish`` on the
    coordinator, ``files`` holds every file's digest."""

    def __init__(
        self, path: str | os.PathLike[str] | URL, *, fsync: bool = True, digests: bool = True
    ) -> None:
        super().__init__()
        self.path = as_location(path)
        self.fsync = fsync
        self._digests = digests
        self.rank = 0
        self.files: dict[str, dict[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = as_location(checkpoint_id)
        self.files = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0

    def _fs(self) -> HashingFileSystem:
        return storage_of(self.path).shard_filesystem(digests=self._digests, fsync=self.fsync)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        storage_of(self.path).mkdir(self.path)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fs = self._fs()
        entries = entries_of(plan.items)
        placed, written = write_rank_file(
            fs, self.path, shard_name(self.rank), list(range(len(entries))), entries,
            lambda pos: planner.resolve_data(plan.items[pos]),
        )  # fmt: skip
        results = results_of(plan.items, entries, [place for _, place in placed])
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([*results, file_result(written)])
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        items, files = split_results(r for per_rank in results for r in per_rank)
        data = metadata_bytes(metadata, items, checkpoint_id=str(self.path))
        meta = write_metadata(self._fs(), self.path, data)
        self.files = {f.name: f.digest for f in [*files, meta]}

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike, URL))


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


def storage_writer(path: str | os.PathLike[str] | URL, *, fsync: bool = True) -> NativeWriter:
    """A DCP ``StorageWriter`` writing the engine's ``raw/1`` format (``dcp.save``), to a
    local directory or a URL (``s3://...``)."""
    return NativeWriter(path, fsync=fsync)


__all__ = [
    "FORMAT",
    "NativeWriter",
    "ShardSlice",
    "storage_writer",
]
