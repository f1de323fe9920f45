"""Reused CPU staging buffers: the copy of the state that a background write reads.

A save in an async mode copies every tensor of the DCP state dict into a buffer that was
allocated (and touched) once and is reused by every later save of the same shapes: plain
CPU memory in thread mode, shared memory in process mode (so the writer process reads it
without a pipe), pinned memory when the tensors live on CUDA. If the shapes change, the
pool is rebuilt and the log says so. There is one pool per manager (invariant 6).

What a writer receives is a *staged state*: a flat dict ``fqn -> buffer or value`` and the
DCP write items computed from the live tensors (DTensor offsets included), so that the
write needs neither the device mesh nor the live tensors. A non-tensor leaf (a numpy
array, a set, a list of ints) is deep-copied at ``stage`` unless it is immutable: the
writer serialises it after ``save`` returned, when training may have changed it
(invariant 3).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.planner_helpers import _create_write_items
from torch.distributed.tensor import DTensor

from .errors import CheckpointError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


@dataclass
class StagedState:
    """A snapshot of the state in the pool's buffers, ready for any writer."""

    values: dict[str, Any]
    """fqn -> staged CPU tensor (a pool buffer) or a non-tensor value."""
    items: list[WriteItem]
    """DCP write items of this rank, computed from the live tensors."""
    mappings: dict[str, Any]
    """DCP's flatten mappings (stored as the checkpoint's planner data)."""
    key: Any
    """The structure of ``items`` and ``mappings`` (``WriteItems.of``)."""
    pending: list[Callable[[], None]] = field(default_factory=list)
    """Copies not done yet (overlapped staging); run them before anything reads ``values``."""
    generation: int = 0
    """The pool layout the buffers belong to (``StagingPool.generation``)."""
    shared: Any = None
    """Process mode: the shared segment's handle (``SharedArena.handle``)."""
    views: dict[str, memoryview] = field(default_factory=dict)
    """Each buffer's bytes (``StagingPool.views``)."""

    def finish_copies(self) -> None:
        for copy in self.pending:
            copy()
        self.pending = []
        _sync_cuda()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


class StagingPool:
    """Buffers for one layout of state (``fqn``, shape, dtype), reused across saves."""

    def __init__(self, *, shared: bool) -> None:
        self.shared = shared
        self.generation = 0
        """Bumped at every rebuild; a writer process holding old buffers must get new ones."""
        self._specs: dict[str, tuple[Any, ...]] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.arena: SharedArena | None = None
        """Process mode: the shared segment holding every buffer."""
        self.write_items = WriteItems()
        self.before_rebuild: Callable[[], None] | None = None
        """Process mode: make the writer process unmap the arena before a new one."""
        self.views: dict[str, memoryview] = {}
        """Each buffer's bytes (what a writer writes), made once per layout."""

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(b) for b in self.buffers.values())

    def stage(
        self,
        state_dict: dict[str, Any],
        *,
        defer: Callable[[str, torch.Tensor], bool] | None = None,
    ) -> StagedState:
        """Copy the tensors of ``state_dict`` into the pool (building it if the layout changed).

        ``defer(fqn, tensor)``: tensors for which it is true are not copied now; their
        copies are returned in ``StagedState.pending`` (overlapped staging).
        """
        flat, mappings = flatten_state_dict(state_dict)
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        self._ensure(tensors)
        items, key = self.write_items.of(flat, mappings, one_chunk=True)
        values: dict[str, Any] = {}
        pending: list[Callable[[], None]] = []
        for fqn, value in flat.items():
            if not isinstance(value, torch.Tensor):
                values[fqn] = _captured(value)
                continue
            buf, src = self.buffers[fqn], _local(value).detach()
            values[fqn] = buf
            if defer is not None and defer(fqn, value):
                pending.append(_copier(buf, src))
            else:
                buf.copy_(src, non_blocking=src.is_cuda)
        _sync_cuda()
        shared = None if self.arena is None else self.arena.handle
        return StagedState(
            values, items, mappings, key, pending, self.generation, shared, self.views
        )

    def prepare(self, state_dict: dict[str, Any]) -> None:
        """Allocate (and touch) the buffers for these tensors now, not in the first save.
        Adds to the pool: buffers of tensors not in ``state_dict`` are kept."""
        flat, _ = flatten_state_dict(state_dict)
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        self._ensure(tensors, keep_others=True)

    def _ensure(self, tensors: dict[str, torch.Tensor], *, keep_others: bool = False) -> None:
        specs = {k: _spec(t) for k, t in tensors.items()}
        if keep_others:
            specs = {**self._specs, **specs}
        if specs == self._specs:
            return
        # Rebuild: in process memory a buffer whose (shape, dtype, origin) still matches is
        # kept (e.g. a fresh run's pool prepared before the optimizer had state only gains
        # the moments); shared memory is one arena, rebuilt whole.
        start = time.perf_counter()
        rebuilt = bool(self._specs)
        if self.shared:  # one arena for all: a writer process maps it by one name
            # The old one goes first (here and in the writer process, which unmaps it when
            # asked), so that the new one needs no more shared memory than it holds.
            self.release()
            if self.before_rebuild is not None:
                self.before_rebuild()
            check_shared_memory(sum(_spec_bytes(sp) for sp in specs.values()))
            kept: dict[str, torch.Tensor] = {}
            self.arena = SharedArena({k: (sp[0], sp[1]) for k, sp in specs.items()})
            new = dict(self.arena.buffers)
        else:
            kept = {k: b for k, b in self.buffers.items() if self._specs[k] == specs.get(k)}
            new = {k: self._allocate(_local(t)) for k, t in tensors.items() if k not in kept}
        self.buffers = {**kept, **new}
        self.views = {k: _bytes_of(b) for k, b in self.buffers.items()}
        self._specs = specs
        self.generation += 1
        log.info(
            "staging pool %s: %d tensors, %.1f MiB (%s), %d allocated (%.1f MiB) in %.2f s",
            "allocated" if not rebuilt else "grown" if keep_others
            else "rebuilt (the state's shapes changed)",
            len(self.buffers),
            self.nbytes / 2**20,
            "shared memory" if self.shared else "process memory",
            len(new),
            sum(_nbytes(b) for b in new.values()) / 2**20,
            time.perf_counter() - start,
        )  # fmt: skip

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
        buf.zero_()  # touch every page now, not during the first save
        return buf

    def release(self) -> None:
        self.buffers = {}
        self.views = {}
        self._specs = {}
        self.arena = None


class WriteItems:
    """DCP's write items of a flat state, each reused while its value's layout is
    unchanged (creating one costs ~25 us per tensor, a save's worth of them more than
    its write of 64 MiB in 600 tensors)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, list[WriteItem]]] = {}

    def of(
        self, flat: Mapping[str, Any], mappings: Mapping[str, Any], *, one_chunk: bool = False
    ) -> tuple[list[WriteItem], Any]:
        """The items (as DCP's ``create_default_local_save_plan`` makes them), and the
        structure they follow: equal structures, equal items."""
        items: list[WriteItem] = []
        layouts = []
        for fqn, value in flat.items():
            layout = _layout(value)
            hit = self._cache.get(fqn)
            if hit is None or hit[0] != layout:
                made = [] if layout == "elsewhere" else _create_write_items(fqn, value)
                if one_chunk and isinstance(value, torch.Tensor) and len(made) != 1:
                    raise NotImplementedError(
                        f"{fqn}: a tensor written as {len(made)} chunks by one rank is not "
                        "supported by the async writers; use async_mode='off'"
                    )
                hit = self._cache[fqn] = (layout, made)
            items.extend(hit[1])
            layouts.append((fqn, layout))
        return items, (tuple(layouts), tuple(mappings.items()))


def _layout(value: Any) -> Any:
    """What a value's write items depend on."""
    if isinstance(value, DTensor):
        if value.device_mesh.get_coordinate() is None:
            return "elsewhere"  # this rank holds no part of it
        return ("dtensor", tuple(value.shape), value.dtype, value.requires_grad,
                value.device_mesh, tuple(value.placements))  # fmt: skip
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad,
                value.layout, value.device.type)  # fmt: skip
    return "object"


_ALIGN = 64


class SharedArena:
    """The process mode's staging buffers: views into ONE named shared-memory segment
    (torch's ``file_system`` sharing: its manager daemon removes the segment once no
    process maps it, so a killed job leaves nothing in ``/dev/shm``)."""

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        layout: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        offset = 0
        for fqn, (shape, dtype) in specs.items():
            layout[fqn] = (offset, str(dtype).removeprefix("torch."), tuple(shape))
            offset += -(-_spec_bytes((shape, dtype)) // _ALIGN) * _ALIGN
        storage = torch.UntypedStorage._new_using_filename_cpu(max(offset, 1))
        manager, name, size = storage._share_filename_cpu_()
        self.handle = (manager, name, size, layout)
        """What a writer process needs to map the buffers (``attach_shared``)."""
        self.buffers = _views(storage, layout)
        for buf in self.buffers.values():
            buf.zero_()  # touch every page now, not during the first save


def _views(
    storage: torch.UntypedStorage, layout: Mapping[str, tuple[int, str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    views = {}
    for fqn, (offset, dtype_name, shape) in layout.items():
        dtype = getattr(torch, dtype_name)
        buf = torch.empty(0, dtype=dtype)
        buf.set_(storage, offset // dtype.itemsize, shape, _row_major_strides(torch.Size(shape)))
        views[fqn] = buf
    return views


def attach_shared(handle: tuple[Any, ...]) -> dict[str, memoryview]:
    """In a writer process: the bytes of each staging buffer of ``SharedArena.handle``."""
    manager, name, size, layout = handle
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, name, size)
    return {fqn: _bytes_of(buf) for fqn, buf in _views(storage, layout).items()}


def _bytes_of(buf: torch.Tensor) -> memoryview:
    """A contiguous CPU buffer's bytes (they follow its later contents)."""
    if buf.numel() == 0 or buf.is_cuda:
        return memoryview(b"")  # an empty one; a CUDA one is never handed to a writer
    return memoryview(buf.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def mutated_by_optimizers_only(app_state: Mapping[str, Any]) -> Callable[[str, torch.Tensor], bool]:
    """For overlapped staging: is a tensor the storage of a parameter or of optimizer state
    (changed only by an optimizer step, so its copy may overlap the next forward/backward)?"""
    ptrs: set[int] = set()
    for value in app_state.values():
        if isinstance(value, nn.Module):
            ptrs.update(_local(p).data_ptr() for p in value.parameters())
        elif isinstance(value, torch.optim.Optimizer):
            for per_param in value.state.values():
                ptrs.update(
                    _local(t).data_ptr() for t in per_param.values() if isinstance(t, torch.Tensor)
                )
    ptrs.discard(0)  # empty tensors
    return lambda _, t: _local(t).data_ptr() in ptrs


def check_shared_memory(needed: int, *, free_bytes: int | None = None) -> None:
    """Refuse to stage ``needed`` more bytes in shared memory than ``SHM_DIR`` has free
    (``free_bytes``, read from the file system by default): past it, the writer process
    or the training would die of SIGBUS at the first touch of a page, not fail cleanly."""
    if free_bytes is None:
        if not needed or not os.path.isdir(SHM_DIR):
            return
        free_bytes = shutil.disk_usage(SHM_DIR).free
    if needed > free_bytes:
        raise CheckpointError(
            f"async_mode='process' stages the state in shared memory ({SHM_DIR}): it needs "
            f"{needed:,} bytes ({needed / 2**30:.2f} GiB) more, {SHM_DIR} has {free_bytes:,} "
            f"bytes ({free_bytes / 2**30:.2f} GiB) free; give the job a bigger {SHM_DIR} "
            "(e.g. docker run --shm-size=<size>, or a larger tmpfs) or use "
            "async_mode='thread' (staging in process memory)"
        )


_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    enum.Enum,
    torch.dtype,
    torch.device,
)


def _captured(value: Any) -> Any:
    """A non-tensor leaf as it is now: the writer serialises it later (``torch.save``)."""
    if isinstance(value, _IMMUTABLE) or (
        isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value)
    ):
        return value
    return deepcopy(value)


def _nbytes(t: torch.Tensor) -> int:
    local = _local(t)
    return local.numel() * local.element_size()


def _spec_bytes(spec: tuple[Any, ...]) -> int:
    shape, dtype = spec[0], spec[1]
    return int(torch.Size(shape).numel()) * dtype.itemsize


def _spec(t: torch.Tensor) -> tuple[Any, ...]:
    local = _local(t)
    return (tuple(local.shape), local.dtype, local.is_cuda)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _copier(buf: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    def copy() -> None:
        buf.copy_(src, non_blocking=src.is_cuda)

    return copy


class StagedSavePlanner(DefaultSavePlanner):
    """DCP's default planner over a staged state: the write items were computed in the
    foreground from the live tensors; the data comes from the staging buffers."""

    def __init__(self, items: list[WriteItem], mappings: dict[str, Any]) -> None:
        super().__init__(flatten_state_dict=True)
        self._items = items
        self._staged_mappings = mappings

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        # Already flat: keep the foreground's mappings instead of flattening again.
        self.state_dict = state_dict
        self.mappings = self._staged_mappings
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items), planner_data=self._staged_mappings)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        # One item per fqn: the buffer holds exactly this rank's chunk.
        return self.state_dict[index.fqn]
