"""Turning ``app_state`` into a DCP state dict and back, all or nothing.

Every top-level value is written by the codec of its kind (``codecs.py``: module,
optimizer, stateful, tensors, object, and ``_rng`` for the RNG states of every rank;
``ranked.py``: per-rank values, a ``StatefulDataLoader`` or a ``PerRank``); the kind and
encoding go into the marker so that a load knows how the bytes were written.

A load never writes into the caller's objects until the whole checkpoint has been read
into fresh storage and matched key by key and shape by shape (``build_load_plan``). Then
``LoadPlan.apply`` writes key by key, caller code (``load_state_dict`` of Stateful objects)
first, modules last, and takes a snapshot of each value right before writing it; if
anything fails, every value written so far, the failing one included, is put back and a
``CheckpointError`` names the checkpoint and the key (invariant 10). ``rollback`` puts
everything back after a successful ``apply`` too (when another rank's apply failed).

Memory: the read targets are this rank's shard of the state once more, and they are the
snapshots too: modules and tensor trees get the loaded values by exchange with them
(``trees.swap_into``: the targets keep the values from before), an optimizer takes the
loaded tensors as its state (its old state is kept by reference). Only the state dicts of
Stateful objects are copied to the CPU (small: schedulers, samplers, scalers). A load thus
needs the state's memory once more at its peak, and nothing after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from .codecs import (
    ADOPTED,
    MODULE,
    OBJECT,
    OPTIMIZER,
    PICKLE,
    RNG,
    RNG_KEY,
    STATEFUL,
    TENSORS,
    TREE,
    Codec,
    LoadContext,
    RngCodec,
    Slot,
    capture_rng_state,
    codec_for,
    kind_of,
    restore_rng_state,
)
from .errors import CheckpointError, StateMismatchError
from .ranked import PerRankCodec, is_per_rank
from .saved import codec_for_saved
from .trees import has_tensor

__all__ = [
    "ADOPTED",
    "MODULE",
    "OBJECT",
    "OPTIMIZER",
    "PICKLE",
    "RNG",
    "RNG_KEY",
    "STATEFUL",
    "TENSORS",
    "TREE",
    "LoadPlan",
    "SaveState",
    "build_load_plan",
    "build_save_state",
    "capture_rng_state",
    "check_keys",
    "has_tensor",
    "kind_of",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

_MAX_KEYS_SHOWN = 5


def _codec(value: Any, rank: int, world_size: int | None) -> Codec:
    """The codec of ``value`` on rank ``rank`` of ``world_size`` (per-rank values first)."""
    return PerRankCodec(rank, world_size) if is_per_rank(value) else codec_for(value)


def check_keys(app_state: Mapping[str, Any]) -> None:
    if not isinstance(app_state, Mapping) or not app_state:
        raise TypeError("app_state must be a non-empty dict of name -> object")
    for key in app_state:
        if not isinstance(key, str) or not key or "." in key or key.startswith("_"):
            raise ValueError(
                f"app_state key {key!r} is invalid: keys are non-empty str without '.', "
                "not starting with '_' (reserved for the engine)"
            )


# ---------------------------------------------------------------- save


@dataclass
class SaveState:
    state_dict: dict[str, Any]
    """What DCP writes: tensors (and DTensors) by reference, other leaves as values."""
    entries: dict[str, dict[str, Any]]
    """The kind (and encoding) of every top-level key; goes into the marker."""


def build_save_state(
    app_state: Mapping[str, Any], *, rank: int, world_size: int, capture_rng: bool
) -> SaveState:
    """Non-tensor leaves are held by reference: a synchronous ``dcp.save`` writes them at
    once, and ``StagingPool.stage`` copies them for the background writers."""
    check_keys(app_state)
    sd: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, value in app_state.items():
        sd[key], entries[key] = _codec(value, rank, world_size).encode(key, value, app_state)
    if capture_rng:
        rng = RngCodec(rank, world_size)
        sd[RNG_KEY], entries[RNG_KEY] = rng.encode(RNG_KEY, None, app_state)
    return SaveState(sd, entries)


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class _Restore:
    """One key of the plan: its codec and where its value lives."""

    codec: Codec
    slot: Slot


@dataclass
class LoadPlan:
    """Fresh storage to read into, and what to do with it once the read succeeded."""

    read: dict[str, Any]
    """Flat DCP state dict of fresh tensors and placeholders; DCP fills it in place."""
    flat: dict[str, Any]
    """``read`` plus the keys kept at their current value (tolerated as absent)."""
    mappings: dict[str, Any]
    restores: list[_Restore]
    rollbacks: list[Callable[[], None]]
    """Undo what building the plan did (an optimizer's initialised state)."""
    where: str
    applied: list[tuple[_Restore, Any]] = field(default_factory=list)
    """What ``apply`` wrote so far, in order, with each value's snapshot from before."""

    def apply(self) -> None:
        """Write the loaded values into the caller's objects (only after a full read); all
        or nothing: on any failure every value is put back as it was before the call."""
        key, doing = "", "decode"
        try:
            self.flat.update(self.read)  # DCP replaced the placeholders of non-tensor leaves
            nested = unflatten_state_dict(self.flat, self.mappings)
            decoded = []
            for r in self.restores:  # pure: nothing is written before every key decoded
                key = r.slot.key
                decoded.append((r, r.codec.decode(r.slot, nested[key])))
            doing = "apply"
            for r, value in sorted(decoded, key=lambda rv: rv[0].codec.order):
                key = r.slot.key
                self.applied.append((r, r.codec.snapshot(r.slot)))
                r.codec.apply(r.slot, value)
        except BaseException as e:
            lost = self._put_back()
            if isinstance(e, StateMismatchError) or not isinstance(e, Exception):
                raise
            raise CheckpointError(self._failure(doing, key, e, lost)) from e

    def rollback(self) -> None:
        """Put back every value that ``apply`` changed (another rank's apply failed after
        this one's succeeded) and undo what building the plan did."""
        self._put_back()

    def _put_back(self) -> list[str]:
        lost = []
        while self.applied:  # newest first
            r, snap = self.applied.pop()
            try:
                r.codec.restore(r.slot, snap)
            except Exception:
                log.exception("checkpoint %s: %r could not be put back", self.where, r.slot.key)
                lost.append(r.slot.key)
        for fn in self.rollbacks:
            fn()
        return lost

    def _failure(self, doing: str, key: str, e: Exception, lost: list[str]) -> str:
        what = repr(key) if key else "its state"
        msg = f"checkpoint {self.where}: cannot {doing} {what} ({type(e).__name__}: {e}); "
        if lost:
            return msg + f"{lost} could not be put back as they were (see the log)"
        if doing == "decode":
            return msg + "nothing was changed"
        return msg + "every value it changed was put back as it was before the load"


def build_load_plan(
    app_state: dict[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    metadata: Metadata,
    *,
    rank: int,
    restore_rng: bool,
    where: str,
    optional: Collection[str] = (),
    world_size: int | None = None,
) -> LoadPlan:
    """Fresh targets for every key of ``app_state``, checked against the checkpoint (a key
    in ``optional`` that the checkpoint lacks is left as it is). ``world_size``: the
    loading job's, which a per-rank value must have been saved by (None: not checked
    beyond this rank's copy being there).

    Raises ``StateMismatchError`` naming ``where`` and the first mismatching keys before
    anything is read; the caller's objects are untouched (an optimizer whose state had to
    be initialised to learn its shapes is reset, here and by ``LoadPlan.rollback``).
    """
    check_keys(app_state)
    ctx = LoadContext(metadata)
    try:
        return _build_load_plan(
            app_state, entries, ctx, rank, restore_rng, where, optional, world_size
        )
    except BaseException:
        for fn in ctx.rollbacks:
            fn()
        raise


def _build_load_plan(
    app_state: dict[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    ctx: LoadContext,
    rank: int,
    restore_rng: bool,
    where: str,
    optional: Collection[str],
    world_size: int | None,
) -> LoadPlan:
    nested: dict[str, Any] = {}
    restores: list[_Restore] = []
    for key, value in app_state.items():
        saved = entries.get(key)
        if saved is None and key in optional:
            continue  # the caller's value stays
        if saved is None:
            raise StateMismatchError(
                f"checkpoint {where} has no entry {key!r} (it has: {sorted(entries)})"
            )
        codec = codec_for_saved(_codec(value, rank, world_size), saved, key, value, where)
        slot = Slot(key, app_state, saved)
        nested[key] = codec.targets(slot, ctx)
        restores.append(_Restore(codec, slot))
    if restore_rng and RNG_KEY in entries:
        rng = RngCodec(rank)
        if rng.fqn in ctx.metadata.state_dict_metadata:
            slot = Slot(RNG_KEY, app_state, entries[RNG_KEY])
            nested[RNG_KEY] = rng.targets(slot, ctx)
            restores.append(_Restore(rng, slot))
        else:
            log.warning(
                "[rank=%d] checkpoint %s has no RNG state for this rank (saved by %s ranks); "
                "RNG not restored",
                rank,
                where,
                entries[RNG_KEY].get("world_size"),
            )
    flat, mappings = flatten_state_dict(nested)
    tolerated = _match(flat, ctx.metadata, list(app_state), ctx.lenient, ctx.unasked, where)
    read = {k: v for k, v in flat.items() if k not in tolerated}
    return LoadPlan(read, flat, mappings, restores, ctx.rollbacks, where)


def _match(
    flat: dict[str, Any],
    metadata: Metadata,
    keys: list[str],
    lenient: set[str],
    unasked: set[str],
    where: str,
) -> set[str]:
    """Keys, shapes and dtypes of the fresh targets against the checkpoint's metadata.

    Returns the keys absent from the checkpoint that are tolerated (they keep their value).
    """
    extra_ok = tuple(lenient | unasked)
    md = metadata.state_dict_metadata
    all_tolerated: set[str] = set()
    for key in keys:

        def ours(fqn: str, key: str = key) -> bool:
            return fqn == key or fqn.startswith(key + ".")

        want = {f for f in flat if ours(f)}
        have = {f for f in md if ours(f)}
        # e.g. an optimizer hyperparameter that another torch version does not have
        tolerated = {f for f in want - have if any(f.startswith(p) for p in lenient)}
        all_tolerated |= tolerated
        missing = sorted(want - have - tolerated)
        unexpected = sorted(f for f in have - want if not f.startswith(extra_ok))
        problems = []
        if missing:
            problems.append(f"missing in checkpoint: {_first(missing)}")
        if unexpected:
            problems.append(f"not in {key!r}: {_first(unexpected)}")
        bad = [m for f in sorted(want & have) if (m := _mismatch(f, flat[f], md[f]))]
        if bad:
            problems.append(f"mismatch: {_first(bad)}")
        if problems:
            raise StateMismatchError(
                f"cannot load checkpoint {where} into {key!r}: " + "; ".join(problems)
            )
    return all_tolerated


def _mismatch(fqn: str, target: Any, saved: Any) -> str | None:
    if isinstance(saved, BytesStorageMetadata) or not isinstance(target, torch.Tensor):
        if isinstance(saved, BytesStorageMetadata) == isinstance(target, torch.Tensor):
            return f"{fqn} (tensor vs object)"
        return None
    if tuple(saved.size) != tuple(target.shape):
        return f"{fqn} shape checkpoint {tuple(saved.size)} vs {tuple(target.shape)}"
    if saved.properties.dtype != target.dtype:
        return f"{fqn} dtype checkpoint {saved.properties.dtype} vs {target.dtype}"
    return None


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_SHOWN])
    more = len(items) - _MAX_KEYS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")
