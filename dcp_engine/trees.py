"""Nested dicts/lists/tuples of tensors: what the codecs write, rebuild and snapshot.

A load puts back what it changed when it fails (invariant 10): modules and tensor trees
by exchange (``swap_into``: the read targets keep the values from before, so the
snapshot costs no memory), Stateful state dicts and hyperparameters from CPU copies
(``offload``).
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


Path = list[str | int]


def int_keyed(tree: Any, path: tuple[str | int, ...] = ()) -> list[Path]:
    """The paths (keys and list indices from the root) of the non-empty dicts of ``tree``
    whose keys are all ints, as in an optimizer's ``state``. DCP writes every key as a
    str; a marker entry keeps these paths so that a read gives the ints back
    (``restore_int_keys``). Below a key that is neither str nor int nothing is recorded."""
    out: list[Path] = []
    if isinstance(tree, Mapping):
        if tree and all(isinstance(k, int) and not isinstance(k, bool) for k in tree):
            out.append(list(path))
        for k, v in tree.items():
            if isinstance(k, (str, int)) and not isinstance(k, bool):
                out.extend(int_keyed(v, (*path, k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.extend(int_keyed(v, (*path, i)))
    return out


def restore_int_keys(tree: Any, paths: list[Path]) -> Any:
    """``tree`` (as DCP read it: str keys) with the dicts at ``paths`` keyed by int again,
    in place; a path that is not there (DCP drops empty containers) is skipped."""
    for path in sorted(paths, key=len):  # a parent's keys are ints before its children's
        node = tree
        for part in path:
            if isinstance(node, Mapping):
                node = node.get(part, node.get(str(part)))
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                node = None
            if node is None:
                break
        if isinstance(node, dict) and all(str(k).lstrip("-").isdigit() for k in node):
            items = list(node.items())
            node.clear()
            node.update((int(k), v) for k, v in items)
    return tree


def _map(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Copy the containers of ``tree`` with ``fn`` applied to tensors; tuples holding a
    tensor become lists (DCP pickles a tuple whole), others stay leaves (Adam's betas)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and not has_tensor(tree):
        return tree
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_map(v, fn) for v in tree]
    return tree


def detached(tree: Any) -> Any:
    """What DCP writes: tensors by reference (detached), other leaves as they are."""
    return _map(tree, lambda t: t.detach())


def cast(tree: Any, dtype: torch.dtype) -> Any:
    """``tree`` with its floating-point tensors in ``dtype`` (copies where it differs)."""
    return _map(tree, lambda t: t.detach().to(dtype) if t.is_floating_point() else t)


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


# ---------------------------------------------------------------- swaps

_SWAP_BYTES = 16 << 20  # the bounded buffer of an exchange


class Swaps:
    """What ``swap_into`` did, so that ``undo`` can put it back: tensor pairs whose
    contents it exchanged (the read target of each now holds the caller's value from
    before: the snapshot costs no memory), and container entries it replaced."""

    def __init__(self, root: Any = None) -> None:
        self.root = root
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replaced: list[tuple[Any, Any, Any]] = []

    @torch.no_grad()
    def undo(self) -> None:
        while self.pairs:
            swap(*self.pairs.pop())
        while self.replaced:
            container, key, old = self.replaced.pop()
            container[key] = old


@torch.no_grad()
def swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two tensors of one shape and dtype, in place, through a
    buffer of at most 16 MiB (row blocks of the first dimension)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise StateMismatchError(
            f"cannot exchange {tuple(a.shape)} {a.dtype} with {tuple(b.shape)} {b.dtype}"
        )
    if a.dim() == 0 or a.numel() * a.element_size() <= _SWAP_BYTES:
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
        return
    row = max(1, a[0].numel() * a.element_size())
    step = max(1, _SWAP_BYTES // row)
    tmp = torch.empty_like(a.narrow(0, 0, min(step, a.shape[0])))
    for start in range(0, a.shape[0], step):
        n = min(step, a.shape[0] - start)
        x, y, t = a.narrow(0, start, n), b.narrow(0, start, n), tmp.narrow(0, 0, n)
        t.copy_(x)
        x.copy_(y)
        y.copy_(t)


def _alias(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


@torch.no_grad()
def swap_into(dst: Any, src: Any, record: Swaps, seen: set[Any] | None = None) -> Any:
    """``src`` into ``dst`` by exchange: ``dst``'s tensors get ``src``'s contents and ``src``'s
    tensors ``dst``'s old ones (a tensor aliased under two keys, tied weights, once);
    other leaves replaced. ``record`` keeps what to undo."""
    seen = set() if seen is None else seen
    if isinstance(dst, torch.Tensor):
        a, b = _local(dst), _local(src)
        if _alias(a) not in seen:
            seen.add(_alias(a))
            swap(a, b)
            record.pairs.append((a, b))
        return dst
    if isinstance(dst, (dict, list)):
        for k in dst if isinstance(dst, dict) else range(len(dst)):
            new = swap_into(dst[k], src[k], record, seen)
            if new is not dst[k]:
                record.replaced.append((dst, k, dst[k]))
                dst[k] = new
        return dst
    if isinstance(dst, tuple):
        return _like(dst, [swap_into(d, s, record, seen) for d, s in zip(dst, src, strict=True)])
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
