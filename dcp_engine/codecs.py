"""State codecs: one class per kind of value of ``app_state``, tried in ``CODECS`` order.

- ``ModuleCodec`` (``module``): ``get_model_state_dict`` (plain, DDP, FSDP2: keys without
  wrapper prefixes, DTensor shards, so a load reshards to any world size or wrapper);
- ``OptimizerCodec`` (``optimizer``): ``get_optimizer_state_dict`` of the module in
  ``app_state`` that owns its parameters, flattened and keyed by parameter name;
- ``StatefulCodec`` (``stateful``): anything with ``state_dict``/``load_state_dict``; its
  state dict as a tensor tree, or one pickle when it holds no tensor;
- ``TensorTreeCodec`` (``tensors``): a tensor, or dicts/lists/tuples holding tensors
  (written as tensors, never pickled; tuples holding tensors are written as lists);
- ``ObjectCodec`` (``object``): any other picklable value, as one pickled blob;
- ``RngCodec`` (``rng``, key ``_rng``): the RNG states of every rank, one blob per rank;
- ``adopted`` entries were written by stock DCP (``dcp-engine adopt``): their Python kind
  is unknown, so they load into whatever the caller has (``saved.codec_for_saved``).

The kind (and encoding) goes into the marker. A codec encodes a value for ``dcp.save``,
builds fresh read targets, decodes what was read (touching nothing of the caller's),
applies it, and snapshots/restores the value so that a load is all or nothing.
"""

from __future__ import annotations

import logging
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import optim_layout, trees
from .errors import CheckpointError
from .rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

MODULE, OPTIMIZER, STATEFUL, TENSORS, OBJECT, RNG = (
    "module",
    "optimizer",
    "stateful",
    "tensors",
    "object",
    "rng",
)
ADOPTED = "adopted"
TREE, PICKLE = "tree", "pickle"
RNG_KEY = "_rng"
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class Slot:
    """One top-level key being loaded: where the caller's value lives, what the marker says
    about it, and what its codec worked out while building the read targets."""

    key: str
    app_state: dict[str, Any]
    entry: Mapping[str, Any]
    aux: Any = None

    @property
    def value(self) -> Any:
        return self.app_state[self.key]


@dataclass
class LoadContext:
    """What every codec of one load shares while it builds its read targets."""

    metadata: Metadata
    rollbacks: list[Callable[[], None]] = field(default_factory=list)
    """Undo the side effects of building the targets (an optimizer's initialised state)."""
    lenient: set[str] = field(default_factory=set)
    """fqn prefixes whose absence from the checkpoint is tolerated (the value stays)."""
    unasked: set[str] = field(default_factory=set)
    """fqn prefixes under which the checkpoint may hold more than the targets ask for (other
    ranks' copies of a per-rank value that stock DCP wrote); what is asked must be there."""


class Codec(ABC):
    """How one kind of value is written, read back, applied and rolled back."""

    kind: ClassVar[str]
    order: ClassVar[int]
    """Apply order: caller code (``load_state_dict``) first, so that if it raises the
    modules and optimizers are still untouched; modules, then RNG, last."""

    @abstractmethod
    def matches(self, value: Any) -> bool: ...

    @abstractmethod
    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        """The DCP sub-state-dict of ``value`` and its marker entry."""

    @abstractmethod
    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        """Fresh storage for ``dcp.load`` to fill (nested, keyed as ``encode`` wrote)."""

    def decode(self, slot: Slot, loaded: Any) -> Any:
        """What ``dcp.load`` filled in, as ``apply`` takes it; touches nothing."""
        return loaded

    @abstractmethod
    def apply(self, slot: Slot, value: Any) -> None: ...

    @abstractmethod
    def snapshot(self, slot: Slot) -> Any:
        """What ``restore`` needs to put the value back as it is now (a CPU copy)."""

    @abstractmethod
    def restore(self, slot: Slot, snap: Any) -> None: ...


def _tree_entry(kind: str, tree: Any) -> dict[str, Any]:
    """A tree's marker entry; ``int_keys``: where its dicts are keyed by int (an
    optimizer's ``state``), which DCP writes as str."""
    entry: dict[str, Any] = {"kind": kind, "encoding": TREE}
    if int_keys := trees.int_keyed(tree):
        entry["int_keys"] = int_keys
    return entry


def _pickle(key: str, value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError(
            f"app_state[{key!r}] ({type(value).__name__}) is neither a module, optimizer, "
            f"tensor tree or Stateful object, and cannot be pickled: {e}"
        ) from e


class ModuleCodec(Codec):
    kind, order = MODULE, 3

    def matches(self, value: Any) -> bool:
        return isinstance(value, nn.Module)

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        return get_model_state_dict(value), {"kind": MODULE}

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        return trees.empty_like(get_model_state_dict(slot.value))

    def apply(self, slot: Slot, value: Any) -> None:
        # The loaded values go in by exchange with the read targets, which keep the old
        # ones (the snapshot, at no memory cost); then the module's own load path (its
        # hooks: BatchNorm's, FSDP's) runs over values already in place.
        live = get_model_state_dict(slot.value)
        slot.aux.root = live
        trees.swap_into(live, value, slot.aux)
        set_model_state_dict(slot.value, live)

    def snapshot(self, slot: Slot) -> Any:
        slot.aux = trees.Swaps()
        return slot.aux

    def restore(self, slot: Slot, snap: Any) -> None:
        snap.undo()  # the old values back in the tensors the load wrote
        if snap.root is not None:  # through the module's load path (a state_dict of copies)
            set_model_state_dict(slot.value, snap.root)


@dataclass(frozen=True)
class _OptimizerAux:
    owner: nn.Module
    unstepped: dict[str, nn.Parameter]
    groups: list[list[str]]
    """Each group's parameter names, in order."""
    layout: optim_layout.Layout
    """How the checkpoint holds it: the engine's flat layout, or one of stock DCP's."""
    template: Any = None
    """The read targets of a nested layout (their int keys, for ``trees.rebuild``)."""


@dataclass(frozen=True)
class _OptimizerSnapshot:
    state: Any  # the live objects (a load replaces them)
    groups: list[dict[str, Any]]
    contents: dict[Any, Any]  # the per-parameter state dicts, by reference
    hyper: list[dict[str, Any]]


class OptimizerCodec(Codec):
    kind, order = OPTIMIZER, 2

    def matches(self, value: Any) -> bool:
        return isinstance(value, torch.optim.Optimizer)

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        owner_key, owner = owner_module(key, value, app_state)
        osd = get_optimizer_state_dict(owner, value, options=OPTIM_OPTIONS)
        # "params": the groups and their order, which the flat layout loses; offline reads
        # need them to give Optimizer.load_state_dict's layout (optim_layout.py).
        params = optim_layout.param_names(owner, value, key)
        return osd, {"kind": OPTIMIZER, "module": owner_key, "params": params}

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        optim = slot.value
        _, owner = owner_module(slot.key, optim, slot.app_state)
        if not optim.state:
            # get_optimizer_state_dict initialises empty state to learn its shapes.
            ctx.rollbacks.append(lambda: optim.state.clear())
        osd = get_optimizer_state_dict(owner, optim, options=OPTIM_OPTIONS)
        groups = optim_layout.param_names(owner, optim, slot.key)
        fqns = [fqn for group in groups for fqn in group]
        saved = optim_layout.saved_layout(slot.key, fqns, ctx.metadata.state_dict_metadata)
        # The names the checkpoint keys state by: positions in the ids layout (stock DCP
        # of optimizer.state_dict()), else parameter names.
        names = {str(i): fqn for i, fqn in enumerate(fqns)} if saved == "ids" else None
        unstepped = optim_layout.unstepped(slot.key, owner, optim, ctx.metadata, names)
        ctx.lenient.add(f"{slot.key}.param_groups.")
        ctx.lenient.update(f"{slot.key}.state.{name}." for name in unstepped)
        template = None
        if saved != "flat":
            template = optim_layout.flat_to_nested(osd, groups, saved)
            osd = template
        slot.aux = _OptimizerAux(owner, unstepped, groups, saved, template)
        return trees.empty_like(osd)

    def decode(self, slot: Slot, loaded: Any) -> Any:
        aux: _OptimizerAux = slot.aux
        if aux.layout == "flat":
            return loaded
        nested = trees.rebuild(aux.template, loaded, slot.key)
        return optim_layout.nested_to_flat(nested, aux.groups, aux.layout, slot.key)

    def apply(self, slot: Slot, value: Any) -> None:
        aux: _OptimizerAux = slot.aux
        set_optimizer_state_dict(aux.owner, slot.value, value, options=OPTIM_OPTIONS)
        # Invariant: a parameter without state in the checkpoint has none after the load,
        # as in the run that saved it (its first step then counts from 1, bit for bit).
        for param in aux.unstepped.values():
            slot.value.state.pop(param, None)
        if aux.unstepped:
            log.info(
                "%d parameters were not stepped yet when the checkpoint was saved: "
                "no optimizer state for %s",
                len(aux.unstepped),
                ", ".join(sorted(aux.unstepped)[:5]),
            )

    def snapshot(self, slot: Slot) -> Any:
        # The optimizer's own state, not get_optimizer_state_dict: a restore through
        # set_optimizer_state_dict would lose the state of parameters the load left
        # without any (the unstepped ones), and could not tell which had none.
        # By reference: set_optimizer_state_dict replaces the state (the loaded tensors
        # become it); it never writes into the tensors it had.
        optim = slot.value
        contents = {p: dict(s) for p, s in optim.state.items()}
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups]
        groups = list(optim.param_groups)
        return _OptimizerSnapshot(optim.state, groups, contents, trees.offload(hyper))

    def restore(self, slot: Slot, snap: Any) -> None:
        snap.state.clear()
        snap.state.update({p: dict(s) for p, s in snap.contents.items()})
        for group, hyper in zip(snap.groups, trees.onload(snap.hyper, to_device=True), strict=True):
            params = group["params"]
            group.clear()
            group.update({"params": params, **hyper})
        slot.value.state, slot.value.param_groups = snap.state, snap.groups


class StatefulCodec(Codec):
    kind, order = STATEFUL, 0

    def matches(self, value: Any) -> bool:
        return callable(getattr(value, "state_dict", None)) and callable(
            getattr(value, "load_state_dict", None)
        )

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        payload = value.state_dict()
        if trees.has_tensor(payload):
            return trees.detached(payload), _tree_entry(STATEFUL, payload)
        return _pickle(key, payload), {"kind": STATEFUL, "encoding": PICKLE}

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        if slot.entry.get("encoding") == PICKLE:
            return b""
        slot.aux = slot.value.state_dict()
        return trees.empty_like(slot.aux)

    def decode(self, slot: Slot, loaded: Any) -> Any:
        if slot.entry.get("encoding") == PICKLE:
            return pickle.loads(loaded)
        return trees.rebuild(slot.aux, loaded, slot.key)

    def apply(self, slot: Slot, value: Any) -> None:
        slot.value.load_state_dict(value)

    def snapshot(self, slot: Slot) -> Any:
        return trees.offload(slot.value.state_dict())

    def restore(self, slot: Slot, snap: Any) -> None:
        slot.value.load_state_dict(trees.onload(snap, to_device=True))


class TensorTreeCodec(Codec):
    kind, order = TENSORS, 1

    def matches(self, value: Any) -> bool:
        return trees.has_tensor(value)

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        return trees.detached(value), _tree_entry(TENSORS, value)

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        return trees.empty_like(slot.value)

    def decode(self, slot: Slot, loaded: Any) -> Any:
        return trees.rebuild(slot.value, loaded, slot.key)

    def apply(self, slot: Slot, value: Any) -> None:
        slot.app_state[slot.key] = trees.swap_into(slot.value, value, slot.aux)

    def snapshot(self, slot: Slot) -> Any:
        slot.aux = trees.Swaps(root=slot.value)  # the read targets keep the old values
        return slot.aux

    def restore(self, slot: Slot, snap: Any) -> None:
        snap.undo()
        slot.app_state[slot.key] = snap.root


class ObjectCodec(Codec):
    kind, order = OBJECT, 0

    def matches(self, value: Any) -> bool:
        return True

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        return _pickle(key, value), {"kind": OBJECT, "encoding": PICKLE}

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        return b""

    def decode(self, slot: Slot, loaded: Any) -> Any:
        return pickle.loads(loaded)

    def apply(self, slot: Slot, value: Any) -> None:
        slot.app_state[slot.key] = value

    def snapshot(self, slot: Slot) -> Any:
        return slot.value  # replaced by a load, never mutated: the object itself

    def restore(self, slot: Slot, snap: Any) -> None:
        slot.app_state[slot.key] = snap


class RngCodec(Codec):
    """The RNG states of this rank (``_rng.rank<r>``); not a value of ``app_state``."""

    kind, order = RNG, 4

    def __init__(self, rank: int, world_size: int = 0) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def fqn(self) -> str:
        return f"{RNG_KEY}.rank{self.rank}"

    def matches(self, value: Any) -> bool:
        return False

    def encode(self, key: str, value: Any, app_state: Mapping[str, Any]) -> tuple[Any, dict]:
        blob = pickle.dumps(capture_rng_state())
        return {f"rank{self.rank}": blob}, {"kind": RNG, "world_size": self.world_size}

    def targets(self, slot: Slot, ctx: LoadContext) -> Any:
        return {f"rank{self.rank}": b""}

    def decode(self, slot: Slot, loaded: Any) -> Any:
        return pickle.loads(loaded[f"rank{self.rank}"])

    def apply(self, slot: Slot, value: Any) -> None:
        restore_rng_state(value)

    def snapshot(self, slot: Slot) -> Any:
        return capture_rng_state()

    def restore(self, slot: Slot, snap: Any) -> None:
        restore_rng_state(snap)


CODECS: tuple[Codec, ...] = (
    ModuleCodec(),
    OptimizerCodec(),
    StatefulCodec(),
    TensorTreeCodec(),
    ObjectCodec(),
)
"""Tried in this order; ``ObjectCodec`` takes whatever is left."""


def codec_for(value: Any) -> Codec:
    return next(c for c in CODECS if c.matches(value))


def kind_of(value: Any) -> str:
    return codec_for(value).kind


def owner_module(
    key: str, optim: torch.optim.Optimizer, app_state: Mapping[str, Any]
) -> tuple[str, nn.Module]:
    wanted = {id(p) for g in optim.param_groups for p in g["params"]}
    modules = [(k, v) for k, v in app_state.items() if isinstance(v, nn.Module)]
    for name, module in modules:
        if wanted <= {id(p) for p in module.parameters()}:
            return name, module
    raise CheckpointError(
        f"app_state[{key!r}]: the optimizer's parameters do not all belong to one nn.Module "
        f"of app_state (modules: {[k for k, _ in modules]}); add the model to app_state"
    )
