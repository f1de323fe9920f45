"""Nested dicts/lists/tuples of tensors: what the codecs write, rebuild and snapshot.

The snapshots (``offload``, ``mirror``) are one CPU copy of the tensors they hold; they
exist so that a load can put back what it changed (invariant 10).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .errors import StateMismatchError


def has_tensor(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, Mapping):
        return any(has_tensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(has_tensor(v) for v in tree)
    return False


def _map(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Copy the containers of ``tree`` with ``fn`` applied to tensors; tuples become lists."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_map(v, fn) for v in tree]
    return tree


def detached(tree: Any) -> Any:
    """What DCP writes: tensors by reference (detached), other leaves as they are."""
    return _map(tree, lambda t: t.detach())


def empty_like(tree: Any) -> Any:
    """Fresh read targets in the shape of ``tree``."""
    return _map(tree, torch.empty_like)


def rebuild(template: Any, src: Any, path: str) -> Any:
    """``src`` (as DCP returns it) in the shape of ``template``: its keys (DCP made them
    str), its container types (DCP made tuples lists) and its empty containers (DCP
    dropped them)."""
    if isinstance(template, torch.Tensor):
        if not isinstance(src, torch.Tensor):
            raise StateMismatchError(f"{path}: checkpoint holds {type(src).__name__}, not a tensor")
        return src
    if isinstance(template, Mapping):
        if not isinstance(src, Mapping):
            raise StateMismatchError(f"{path}: checkpoint holds {type(src).__name__}, not a dict")
        out = {}
        for k, v in template.items():
            if k in src or str(k) in src:
                out[k] = rebuild(v, src[k] if k in src else src[str(k)], f"{path}.{k}")
            elif isinstance(v, (Mapping, list, tuple)) and not v:
                out[k] = v
            else:
                raise StateMismatchError(f"{path}.{k} is not in the checkpoint")
        return out
    if isinstance(template, (list, tuple)):
        if not isinstance(src, (list, tuple)) or len(src) != len(template):
            raise StateMismatchError(f"{path}: checkpoint holds {src!r:.80}")
        values = [
            rebuild(t, v, f"{path}[{i}]")
            for i, (t, v) in enumerate(zip(template, src, strict=True))
        ]
        return _like(template, values)
    return src


def _like(template: tuple | list, values: list[Any]) -> Any:
    if isinstance(template, tuple):
        return type(template)(*values) if hasattr(template, "_fields") else tuple(values)
    return values


@torch.no_grad()
def copy_into(dst: Any, src: Any) -> Any:
    """Tensors of ``dst`` updated by copy, containers in place, other leaves replaced.
    ``src`` has ``dst``'s structure (``rebuild``)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return dst
    if isinstance(dst, dict):
        for k in dst:
            dst[k] = copy_into(dst[k], src[k])
        return dst
    if isinstance(dst, list):
        for i in range(len(dst)):
            dst[i] = copy_into(dst[i], src[i])
        return dst
    if isinstance(dst, tuple):
        return _like(dst, [copy_into(d, s) for d, s in zip(dst, src, strict=True)])
    return src


# ---------------------------------------------------------------- snapshots


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class _OnCpu:
    """A CPU copy of a tensor (of this rank's shard of a DTensor) and where it lived."""

    data: torch.Tensor
    device: torch.device
    dtensor: tuple[Any, ...] | None  # mesh, placements, shape, stride

    @staticmethod
    def of(t: torch.Tensor) -> _OnCpu:
        data = _local(t).detach().to("cpu", copy=True)
        spec = None
        if isinstance(t, DTensor):
            spec = (t.device_mesh, t.placements, t.shape, t.stride())
        return _OnCpu(data, t.device, spec)

    def back(self, to_device: bool) -> torch.Tensor:
        data = self.data.to(self.device) if to_device or self.dtensor else self.data
        if self.dtensor is None:
            return data
        mesh, placements, shape, stride = self.dtensor
        return DTensor.from_local(
            data, mesh, placements, run_check=False, shape=shape, stride=stride
        )


def _tensors(tree: Any) -> list[Any]:
    """The tensors (or ``_OnCpu`` records) in the containers of ``tree``."""
    if isinstance(tree, (torch.Tensor, _OnCpu)):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def offload(tree: Any) -> Any:
    """A deep copy of ``tree`` (a state dict) with its tensors copied to the CPU."""
    memo: dict[int, Any] = {id(t): _OnCpu.of(t) for t in _tensors(tree)}
    return copy.deepcopy(tree, memo)


def onload(snapshot: Any, *, to_device: bool) -> Any:
    """``offload``'s tree back, as a new tree: tensors on their device when ``to_device``
    (a DTensor always, rebuilt from this rank's shard), else left on the CPU."""
    memo: dict[int, Any] = {id(r): r.back(to_device) for r in _tensors(snapshot)}
    return copy.deepcopy(snapshot, memo)


def mirror(tree: Any) -> tuple[Any, Any]:
    """The caller's objects and a CPU copy of their tensors, for ``put_back``."""
    if isinstance(tree, torch.Tensor):
        return tree, _OnCpu.of(tree)
    if isinstance(tree, Mapping):
        return tree, {k: mirror(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return tree, [mirror(v) for v in tree]
    return tree, None


@torch.no_grad()
def put_back(node: tuple[Any, Any]) -> Any:
    """The objects ``mirror`` saw, in place again, their tensors bit for bit as then."""
    obj, kept = node
    if isinstance(obj, torch.Tensor):
        _local(obj).copy_(kept.data)
    elif isinstance(obj, dict):
        for k, child in kept.items():
            obj[k] = put_back(child)
    elif isinstance(obj, list):
        obj[:] = [put_back(child) for child in kept]
    elif isinstance(obj, (Mapping, tuple)):
        for child in kept.values() if isinstance(kept, dict) else kept:
            put_back(child)
    return obj
