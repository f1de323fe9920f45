"""Values as they were saved, rebuilt from the checkpoint alone (``SavedTreeCodec``).

A plain value of ``app_state`` (``None``, a dict without tensors...) is replaced by a
load. When the checkpoint holds a tree of tensors under its key (an
``optimizer.state_dict()`` saved once stepped, resumed into a fresh optimizer's state dict
or into ``None``), or any value of a checkpoint written by stock DCP (``ADOPTED``: its
Python kind is unknown), the caller's value cannot give the read targets their shape:
they come from DCP's metadata, and the nesting from its planner data (lists where DCP
wrote indices), with int keys where the marker entry recorded them (``int_keys``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from . import trees
from .codecs import ADOPTED, OBJECT, TENSORS, Codec, LoadContext, ObjectCodec, Slot
from .errors import StateMismatchError
from .ranked import AdoptedPerRankCodec, PerRankCodec


def paths_of(key: str, metadata: Metadata) -> dict[str, tuple[Any, ...]]:
    """Every flat name under top-level ``key`` with its path in the saved tree."""
    planner = metadata.planner_data or {}
    out = {}
    for fqn in metadata.state_dict_metadata:
        path = tuple(planner.get(fqn, (fqn,)))
        if path[0] == key:
            out[fqn] = path
    return out


def rebuild(key: str, flat: dict[str, Any], metadata: Metadata, entry: Mapping[str, Any]) -> Any:
    """The value of ``key`` from its flat names' values, nested as it was saved."""
    paths = paths_of(key, metadata)
    value = unflatten_state_dict(flat, {fqn: paths[fqn] for fqn in flat})[key]
    return trees.restore_int_keys(value, entry.get("int_keys") or [])


class SavedTreeCodec(ObjectCodec):
    """A plain value replaced by the tree the checkpoint holds for its key."""

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        paths = paths_of(slot.key, ctx.metadata)
        if not paths:
            raise StateMismatchError(f"the checkpoint holds nothing under {slot.key!r}")
        out: dict[str, Any] = {}
        for fqn in paths:
            meta = ctx.metadata.state_dict_metadata[fqn]
            if isinstance(meta, TensorStorageMetadata):
                target: Any = torch.empty(meta.size, dtype=meta.properties.dtype)
            else:
                target = b""  # replaced by the value DCP read
            if fqn == slot.key:
                return target  # one leaf, the whole value
            out[fqn[len(slot.key) + 1 :]] = target  # flattens back to ``fqn``
        slot.aux = ctx.metadata
        return out

    def decode(self, slot: Slot, loaded: Any) -> Any:
        if slot.aux is None:
            return loaded
        flat = {f"{slot.key}.{rel}": v for rel, v in loaded.items()}
        return rebuild(slot.key, flat, slot.aux, slot.entry)


def codec_for_saved(
    codec: Codec, saved: Mapping[str, Any], key: str, value: Any, where: str
) -> Codec:
    """The codec that loads ``saved`` (a marker entry) into a value whose own codec is
    ``codec``; ``StateMismatchError`` when the kinds cannot meet."""
    kind = saved["kind"]
    if codec.kind == kind:
        return codec
    if codec.kind == OBJECT and kind in (TENSORS, ADOPTED):
        return SavedTreeCodec()  # a plain value is replaced by what was saved
    if kind == ADOPTED and isinstance(codec, PerRankCodec):
        return AdoptedPerRankCodec(codec.rank, codec.world_size)  # its rank's keys only
    if kind == ADOPTED:
        return codec  # stock DCP's values load into whatever the caller has
    raise StateMismatchError(
        f"checkpoint {where}: {key!r} was saved as a {kind}, cannot load it into a {codec.kind} "
        f"({type(value).__name__})"
    )


__all__ = ["SavedTreeCodec", "codec_for_saved", "paths_of", "rebuild"]
