"""Reading the engine's shard format (``raw/1``, ``native.py``): DCP's
``StorageReader`` for its checkpoints, checking every file it reads against its digest.

Each tensor goes straight from the file into its target when the target is a contiguous
CPU tensor of the stored dtype and the whole stored chunk is wanted (no intermediate
copy); otherwise (resharding, a dtype change, a device tensor) through one scratch buffer
of that chunk. Items in DCP's stock format (checkpoints written before ``raw/1``) are
read as DCP reads them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from .digests import ALGORITHM, HashingFileSystem, hexdigest
from .errors import IntegrityError
from .location import URL, Location, as_location
from .native import ShardSlice, tensor_view, to_dtype
from .storage import Storage, storage_of


class NativeReader(FileSystemReader):
    """DCP ``StorageReader`` for the engine's checkpoints: ``raw/1`` items read raw,
    items in DCP's stock format (older checkpoints) as DCP reads them.

    With ``digests`` (file name -> size and ``crc32``, from the marker) every ``raw/1``
    file read by the load is checked once (``prepare_global_plan``): in the read's pass by
    a rank that reads all of it in order (the usual case: its own file), else by a read
    of its own. A mismatch raises ``DigestMismatch`` naming the file (DCP gives every
    rank every rank's read errors, in a ``CheckpointException``); what was read went into
    the planner's targets only, and the caller applies nothing of a failed read."""

    def __init__(
        self,
        path: str | os.PathLike[str] | URL,
        *,
        digests: Mapping[str, tuple[int, str | None]] | None = None,
        storage: Storage | None = None,
    ) -> None:
        super().__init__(str(path))
        self.location = as_location(path)
        self.storage = storage_of(self.location, storage)
        self.fs = HashingFileSystem(self.storage)  # type: ignore[assignment]
        self.path = self.location  # type: ignore[assignment]
        self.digests = digests

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(None)
        if checkpoint_id:
            self.location = as_location(checkpoint_id)
            self.storage = storage_of(self.location)
            self.fs = HashingFileSystem(self.storage)  # type: ignore[assignment]
            self.path = self.location  # type: ignore[assignment]

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Coordinator: who checks which file. A file some rank reads whole, in order, is
        checked by that rank in its read's pass; a file only read in parts, by one of its
        readers once more, whole. Each file once: DCP gathers every rank's read errors,
        so a mismatch fails the load on every rank (before anything is applied)."""
        if self.digests is None:
            return plans
        read = [self._slices(p) for p in plans]
        in_pass: list[set[str]] = [set() for _ in plans]
        whole: list[set[str]] = [set() for _ in plans]
        for name in sorted({n for per_rank in read for n in per_rank}):
            size, expected = self.digests.get(name, (0, None))
            if expected is None:
                continue
            readers = [r for r, per_rank in enumerate(read) if name in per_rank]
            covering = [r for r in readers if _covers(read[r][name], size)]
            (in_pass[covering[0]] if covering else whole[readers[0]]).add(name)
        return [
            dataclasses.replace(p, storage_data=_Checks(frozenset(in_pass[r]), frozenset(whole[r])))
            for r, p in enumerate(plans)
        ]

    def _slices(self, plan: LoadPlan) -> dict[str, list[ShardSlice]]:
        out: dict[str, list[ShardSlice]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if isinstance(info, ShardSlice):
                out.setdefault(info.relative_path, []).append(info)
        return {name: sorted(infos, key=lambda i: i.offset) for name, infos in out.items()}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        checks = plan.storage_data
        if self.digests is not None and not isinstance(checks, _Checks):
            checks = self.prepare_global_plan([plan])[0].storage_data  # DCP planned without us
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
            path = self.location / name
            ordered = sorted(reqs, key=lambda p: p[0].offset)
            _, expected = (self.digests or {}).get(name, (0, None))
            in_pass = isinstance(checks, _Checks) and name in checks.in_pass
            if expected is not None and isinstance(checks, _Checks) and name in checks.whole:
                _check_digest(path, self.storage.digest(path), expected)
            crc = 0
            values: list[tuple[Any, bytearray]] = []  # unpickled once the file checks out
            with self.storage.open_read(path) as f:
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


@dataclass(frozen=True)
class _Checks:
    """A rank's share of a load's digest checks (its ``LoadPlan.storage_data``)."""

    in_pass: frozenset[str]
    """Files this rank reads whole, in order: checked in the read's pass."""
    whole: frozenset[str]
    """Files no rank reads whole: this rank reads each once more, first, to check it."""


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


def _check_digest(path: Location, actual: str, expected: str) -> None:
    if actual != expected:
        raise DigestMismatch(f"{path}: {ALGORITHM} {actual}, the marker says {expected}")


def _read_item(
    f: Any,
    path: Location,
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


def _read_into(f: Any, view: memoryview, path: Location, info: ShardSlice) -> None:
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


def storage_reader(path: str | os.PathLike[str] | URL) -> NativeReader:
    """A DCP ``StorageReader`` for a checkpoint of the engine (either shard format):
    ``dcp.load(state, storage_reader=dcp_engine.storage_reader(path))``. Reads only; it
    does not check digests (``open_checkpoint`` and the manager do)."""
    return NativeReader(path)


__all__ = ["DigestMismatch", "NativeReader", "storage_reader"]
