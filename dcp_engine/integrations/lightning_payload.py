"""A Lightning checkpoint dict as the engine's ``app_state``, and back.

Lightning hands a ``CheckpointIO`` one dict: ``state_dict`` and ``optimizer_states``
(tensors), and ``loops``, ``callbacks``, ``lr_schedulers``, ``hyper_parameters``... (mostly
plain values, some small tensors). It is saved as two engine entries:

- ``tensors``: every tensor of the model and optimizer state (``HEAVY``), flat, under a
  label that says where it was (``state_dict/net.0.weight``,
  ``optimizer_states/0/state/0/exp_avg``): written as tensors (deduplicated across ranks
  by DCP), never pickled;
- ``skeleton``: the dict itself with each of those tensors replaced by a ``TensorRef`` to
  its label, pickled, so that what DCP would not keep comes back as it was: int keys
  (optimizer state), tuples, empty dicts and lists, ``OrderedDict`` and other dict types.

Also here: what a second save of the same step changes (``Snapshot`` and ``overrides``):
one global step is one model and optimizer state, so only the other keys are compared.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError

TENSORS = "tensors"
SKELETON = "skeleton"
HEAVY = ("state_dict", "optimizer_states")
"""The keys that hold the model and optimizer state: the same at one global step."""


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor of the checkpoint dict went: its label in the ``tensors`` entry."""

    label: str


def app_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's ``app_state`` for ``checkpoint``: the tensors of ``HEAVY`` by
    reference (the engine stages them), the skeleton as a value (pickled when ``save`` is
    called, with the few small tensors of the other keys, whose labels would change from
    save to save: ``best_k_models`` is keyed by path)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {k: _split(v, (k,), tensors) if k in HEAVY else v for k, v in checkpoint.items()}
    blob = _pickle(skeleton)  # one value, whatever it holds (never a tensor tree)
    return {TENSORS: tensors, SKELETON: blob} if tensors else {SKELETON: blob}


def rebuild(entries: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checkpoint dict from the ``tensors`` and ``skeleton`` entries as read back."""
    blob = entries.get(SKELETON)
    if not isinstance(blob, bytes):
        raise CheckpointError(f"{where} holds no Lightning checkpoint (no {SKELETON!r} entry)")
    skeleton = pickle.loads(blob)
    tensors = entries.get(TENSORS) or {}
    return _join(skeleton, tensors, where)


def _pickle(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError(f"the Lightning checkpoint cannot be pickled: {e}") from e


def _split(value: Any, path: tuple[Any, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        base = "/".join(str(p) for p in path) or "tensor"
        label, n = base, 1
        while label in tensors:  # another path spelled the same ("a/b" and a -> b)
            label, n = f"{base}#{n}", n + 1
        tensors[label] = value
        return TensorRef(label)
    if isinstance(value, (dict, list)):
        out = copy.copy(value)  # keeps the container's type and attributes
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            out[k] = _split(v, (*path, k), tensors)
        return out
    if type(value) is tuple:
        return tuple(_split(v, (*path, i), tensors) for i, v in enumerate(value))
    return value  # other objects are pickled whole, tensors inside them included


def _join(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, TensorRef):
        if value.label not in tensors:
            raise CheckpointError(f"{where}: tensor {value.label!r} is missing")
        return tensors[value.label]
    if isinstance(value, (dict, list)):
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        for k, v in items:
            value[k] = _join(v, tensors, where)
        return value
    if type(value) is tuple:
        return tuple(_join(v, tensors, where) for v in value)
    return value


def to_device(tree: Any, device: torch.device | str | None) -> Any:
    """``tree`` with its tensors on ``device`` (None: as they are, on the CPU)."""
    if device is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, MutableMapping):
        for k, v in list(tree.items()):
            tree[k] = to_device(v, device)
        return tree
    if isinstance(tree, list):
        return [to_device(v, device) for v in tree]
    if type(tree) is tuple:
        return tuple(to_device(v, device) for v in tree)
    return tree


# ---------------------------------------------------------------- the same step twice


@dataclass(frozen=True)
class Snapshot:
    """What a second save of ``step`` is compared with: the keys of the checkpoint the
    engine holds and a fingerprint of each key outside ``HEAVY`` (None: unknown, so that
    a second save records all of them with its name)."""

    step: int
    keys: frozenset[str]
    fingerprints: Mapping[str, bytes] | None

    @classmethod
    def of(cls, step: int, checkpoint: Mapping[str, Any]) -> Snapshot:
        prints = {k: _fingerprint(v) for k, v in checkpoint.items() if k not in HEAVY}
        return cls(step, frozenset(checkpoint), prints)


@dataclass(frozen=True)
class Overrides:
    """How the dict a name was saved with differs from the checkpoint the engine holds."""

    values: bytes | None
    """The keys whose values differ, pickled at the save (None: none)."""
    removed: tuple[str, ...] = ()
    """Keys the engine's checkpoint has and this name's dict had not."""

    def apply(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        for key in self.removed:
            checkpoint.pop(key, None)
        if self.values is not None:
            checkpoint.update(pickle.loads(self.values))
        return checkpoint


NO_OVERRIDES = Overrides(None)


def overrides(saved: Snapshot, checkpoint: Mapping[str, Any], name: str) -> Overrides:
    """What ``name`` (a save of the step ``saved`` holds) must record to read back as
    ``checkpoint``; ``CheckpointError`` if it brings model or optimizer state the engine's
    checkpoint lacks (a weights-only save first, a full one second)."""
    added = [k for k in HEAVY if k in checkpoint and k not in saved.keys]
    if added:
        raise CheckpointError(
            f"{name}: step {saved.step} was saved without {added} under another name, and "
            "one step is one checkpoint; save it with the same save_weights_only everywhere"
        )
    values = {
        k: v
        for k, v in checkpoint.items()
        if k not in HEAVY
        and (
            saved.fingerprints is None
            or k not in saved.fingerprints
            or saved.fingerprints[k] != _fingerprint(v)
        )
    }
    removed = tuple(sorted(k for k in saved.keys if k not in checkpoint))
    return Overrides(_pickle(values) if values else None, removed)


def _fingerprint(value: Any) -> bytes:
    return pickle.dumps(_comparable(value), protocol=pickle.HIGHEST_PROTOCOL)


def _comparable(value: Any) -> Any:
    """``value`` with its tensors as (dtype, shape, bytes), so that equal values pickle
    alike whatever their storage."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return (
            "tensor",
            str(t.dtype),
            tuple(t.shape),
            t.view(-1).view(torch.uint8).numpy().tobytes(),
        )
    if isinstance(value, Mapping):
        return (type(value).__name__, [(k, _comparable(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_comparable(v) for v in value])
    return value


__all__ = [
    "HEAVY",
    "NO_OVERRIDES",
    "SKELETON",
    "TENSORS",
    "Overrides",
    "Snapshot",
    "TensorRef",
    "app_state",
    "overrides",
    "rebuild",
    "to_device",
]
