"""Values of ``app_state`` whose state differs between ranks: each rank writes its own
copy, under ``<key>.rank<r>``, and reads back its own.

DCP writes a non-tensor value that every rank holds under one name once, from the rank
its planner picks: right for a replicated value, wrong for per-rank state. These are per
rank (the ``per_rank`` kind, ``PerRankCodec``):

- torchdata's ``StatefulDataLoader``, recognised as it is: its position (batches yielded,
  its sampler's and workers' state) is this rank's share of the data;
- any ``Stateful`` object wrapped in ``PerRank`` (a rank's own data stream).

A per-rank value loads only under the world size that saved it (rank ``r``'s copy means
nothing to another split of the data): another world size is a ``StateMismatchError``
naming the key and both world sizes, raised before anything is read. The engine's RNG
states (``_rng``, ``codecs.RngCodec``) are per rank the same way.

Stock DCP has no per-rank encoding: a per-rank value's ``state_dict()`` keys its own part
by rank (torchtitan's dataloader: ``{"dp_rank_<r>": ..., "world_size": n}``), and every
rank's part lands under one key. An ``adopted`` entry loads into a per-rank value as DCP
loads a ``Stateful`` (``AdoptedPerRankCodec``): the keys of this rank's ``state_dict()``
are read (each must be there), the other ranks' beside them are left unread.
"""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Mapping
from typing import Any

from . import trees
from .codecs import Codec, LoadContext, Slot
from .errors import StateMismatchError

PER_RANK = "per_rank"
PICKLE_PER_RANK = "pickle_per_rank"
"""The entry's encoding: ``{"rank<r>": pickle of rank r's state_dict()}``."""

# What StatefulDataLoader.load_state_dict sets (torchdata 0.11): a snapshot of these undoes
# it without making an iterator (state_dict() of a fresh loader starts its workers).
_LOADER_ATTRS = ("_iterator", "_initial_iter_for_state_dict", "next_iter_state")


class PerRank:
    """Marks a ``Stateful`` value of ``app_state`` whose state differs between ranks: each
    rank saves its ``state_dict()`` and gets its own back through ``load_state_dict``.

        app_state["stream"] = de.PerRank(my_rank_local_iterator)

    ``value`` is the object. Not needed for torchdata's ``StatefulDataLoader``, which is
    recognised as per rank by itself."""

    def __init__(self, value: Any) -> None:
        if not (_has(value, "state_dict") and _has(value, "load_state_dict")):
            raise TypeError(
                f"PerRank takes an object with state_dict() and load_state_dict(), got "
                f"{type(value).__name__}"
            )
        self.value = value

    def state_dict(self) -> Any:
        return self.value.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.value.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def _has(value: Any, name: str) -> bool:
    return callable(getattr(value, name, None))


def is_stateful_dataloader(value: Any) -> bool:
    """A torchdata ``StatefulDataLoader`` (without importing torchdata: an instance means
    its module is loaded)."""
    module = sys.modules.get("torchdata.stateful_dataloader")
    cls = getattr(module, "StatefulDataLoader", None)
    return cls is not None and isinstance(value, cls)


def is_per_rank(value: Any) -> bool:
    return isinstance(value, PerRank) or is_stateful_dataloader(value)


class PerRankCodec(Codec):
    """Rank ``rank`` of ``world_size``: its value's state as one pickle of its own."""

    kind, order = PER_RANK, 0

    def __init__(self, rank: int, world_size: int | None) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def _mine(self) -> str:
        return f"rank{self.rank}"

    def matches(self, value: Any) -> bool:
        return is_per_rank(value)

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        payload = value.state_dict()
        try:
            blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise TypeError(
                f"app_state[{key!r}] ({type(value).__name__}): its state_dict() on rank "
                f"{self.rank} cannot be pickled: {e}"
            ) from e
        entry = {"kind": PER_RANK, "encoding": PICKLE_PER_RANK, "world_size": self.world_size}
        return {self._mine: blob}, entry

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        saved = slot.entry.get("world_size")
        fqn = f"{slot.key}.{self._mine}"
        other_world = self.world_size is not None and saved != self.world_size
        if other_world or fqn not in ctx.metadata.state_dict_metadata:
            now = f"{self.world_size} here" if self.world_size else f"no copy for rank {self.rank}"
            raise StateMismatchError(
                f"app_state[{slot.key!r}] ({type(slot.value).__name__}) holds per-rank state "
                f"saved by {saved} ranks ({now}): a rank's position means nothing to another "
                "split of the data. Resume on the same world size, leave it out of the "
                "app_state of this load (it then starts its epoch afresh), or keep the "
                "position in a de.ResumableDistributedSampler (world-size aware) instead"
            )
        ctx.lenient.add(f"{slot.key}.rank")  # the other ranks' copies are theirs
        return {self._mine: b""}

    def decode(self, slot: Slot, loaded: Any) -> Any:
        return pickle.loads(loaded[self._mine])

    def apply(self, slot: Slot, value: Any) -> None:
        slot.value.load_state_dict(value)

    def snapshot(self, slot: Slot) -> Any:
        value = slot.value
        if is_stateful_dataloader(value) and all(hasattr(value, a) for a in _LOADER_ATTRS):
            return {a: getattr(value, a) for a in _LOADER_ATTRS}
        return copy.deepcopy(value.state_dict())

    def restore(self, slot: Slot, snap: Any) -> None:
        value = slot.value
        if is_stateful_dataloader(value) and all(hasattr(value, a) for a in _LOADER_ATTRS):
            for name, old in snap.items():
                setattr(value, name, old)
            return
        value.load_state_dict(snap)


class AdoptedPerRankCodec(PerRankCodec):
    """A per-rank value from an ``adopted`` entry (stock DCP): the tree of this rank's
    ``state_dict()`` keys; the checkpoint's other keys under the entry are other ranks'."""

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        slot.aux = slot.value.state_dict()
        ctx.unasked.add(f"{slot.key}.")
        return trees.empty_like(slot.aux)

    def decode(self, slot: Slot, loaded: Any) -> Any:
        return trees.rebuild(slot.aux, loaded, slot.key)


__all__ = [
    "PER_RANK",
    "PICKLE_PER_RANK",
    "AdoptedPerRankCodec",
    "PerRank",
    "PerRankCodec",
    "is_per_rank",
]
