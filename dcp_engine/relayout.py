"""How the keys of a checkpoint written by stock DCP become the entries of the adopted
checkpoint (``adopt(..., layout=)``, ``dcp-engine adopt --layout``).

- ``stock``: as ``dcp.save`` wrote them; each top-level key is an entry.
- ``torchtitan``: torchtitan's ``CheckpointManager`` writes the model's state dict at the
  top level of its ``step-N/`` (``_flattened_model_states_sd``: ``tok_embeddings.weight``,
  ``layers.0.attention.wq.weight``...) beside its ``Stateful`` states, each a tree under
  its key (``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state`` and any other
  of its ``states``). The leaves at the top level go under ``model``
  (``model.layers.0.attention.wq.weight``): the layout of
  ``dcp_engine.integrations.torchtitan.CheckpointManager``, so that its ``load`` continues
  the run; the other keys stay as they are.

Only ``.metadata`` changes: every name in it (``state_dict_metadata``, ``planner_data``,
the ``fqn`` of each ``MetadataIndex`` of ``storage_data``). The data files hold no names
and are committed as they are.

This module imports no torch: the command line's parser reads ``LAYOUTS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

STOCK, TORCHTITAN = "stock", "torchtitan"
LAYOUTS = (STOCK, TORCHTITAN)

TORCHTITAN_MODEL = "model"
TORCHTITAN_STATES = frozenset({"optimizer", "lr_scheduler", "dataloader", "train_state"})
"""torchtitan's own states besides the model (``checkpointer/base.py``): never the model's,
even if one were written as a leaf."""

_SHOWN = 8


@dataclass(frozen=True)
class Relayout:
    """A source's metadata with its keys as the adopted checkpoint has them."""

    metadata: Metadata
    nested: frozenset[str] = frozenset()
    """The source's top-level keys now under ``into`` (none: nothing changed)."""
    into: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.nested)

    def entries(self, stock: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The marker entries: those of the source's top-level keys (``adoption.entries_of``)
        with the nested ones replaced by one entry for ``into``, as they were adopted."""
        if not self.changed:
            return dict(stock)
        kept = {k: v for k, v in stock.items() if k not in self.nested}
        first = next(stock[k] for k in sorted(self.nested))  # every leaf's entry is alike
        return {self.into: {**first}, **kept}


def relayout(metadata: Metadata, layout: str, where: object) -> Relayout:
    """``metadata`` (of the source ``where``) in ``layout``; ``ValueError`` for an unknown
    layout, ``CheckpointError`` naming ``where`` for a source not in that layout."""
    if layout == STOCK:
        return Relayout(metadata)
    if layout == TORCHTITAN:
        return _torchtitan(metadata, where)
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def _torchtitan(metadata: Metadata, where: object) -> Relayout:
    paths = _paths(metadata)
    tops = sorted({p[0] for p in paths.values()})
    if TORCHTITAN_MODEL in tops:
        raise CheckpointError(
            f"{where} has a {TORCHTITAN_MODEL!r} entry already, so it is not in torchtitan's "
            f"layout (the model's parameters at the top level): adopt it with --layout {STOCK}"
        )
    model = frozenset(
        fqn for fqn, path in paths.items() if len(path) == 1 and fqn not in TORCHTITAN_STATES
    )
    if not model:
        shown = ", ".join(tops[:_SHOWN]) + (" ..." if len(tops) > _SHOWN else "")
        raise CheckpointError(
            f"{where} has no model parameters at the top level of its state dict, where "
            f"torchtitan writes them (its keys: {shown}): adopt it with --layout {STOCK}"
        )
    return Relayout(nest(metadata, model, TORCHTITAN_MODEL), model, TORCHTITAN_MODEL)


def nest(metadata: Metadata, keys: frozenset[str], into: str) -> Metadata:
    """``metadata`` with the top-level leaves ``keys`` renamed ``<into>.<key>`` everywhere it
    names them, as ``dcp.save({into: {key: ...}})`` would have named them."""

    def name(fqn: str) -> str:
        return f"{into}.{fqn}" if fqn in keys else fqn

    paths = _paths(metadata)
    return dataclasses.replace(
        metadata,
        state_dict_metadata={name(f): m for f, m in metadata.state_dict_metadata.items()},
        planner_data={name(f): ((into, f) if f in keys else p) for f, p in paths.items()},
        storage_data={
            dataclasses.replace(index, fqn=name(index.fqn)): where
            for index, where in (metadata.storage_data or {}).items()
        },
    )


def _paths(metadata: Metadata) -> dict[str, tuple[Any, ...]]:
    """Each flat name with its path in the saved state dict (DCP's planner data)."""
    planner = metadata.planner_data or {}
    return {fqn: tuple(planner.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata}


__all__ = ["LAYOUTS", "STOCK", "TORCHTITAN", "Relayout", "nest", "relayout"]
