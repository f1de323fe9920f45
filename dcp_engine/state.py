"""Turning ``app_state`` into a DCP state dict and back.

Each top-level value has a *kind*, recorded in the marker so that a load knows how the
bytes were written:

- ``module``: ``get_model_state_dict`` (plain, DDP, FSDP2; keys without wrapper prefixes,
  DTensor shards under FSDP2, so a load reshards to any world size or wrapper);
- ``optimizer``: ``get_optimizer_state_dict`` of the module in ``app_state`` that owns
  its parameters, flattened and keyed by parameter name;
- ``stateful``: anything with ``state_dict``/``load_state_dict`` (LR schedulers,
  ``GradScaler``, DCP ``Stateful``); its state dict is a tensor tree or a pickle;
- ``tensors``: a tensor, or dicts/lists/tuples holding tensors (written as tensors,
  never pickled; tuples are written as lists);
- ``object``: any other picklable value, written as one pickled blob;
- ``_rng``: the RNG states of every rank, one blob per rank.

Loading never writes into the caller's objects until the whole checkpoint has been read
into fresh storage and matched key by key and shape by shape.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import CheckpointError, StateMismatchError

log = logging.getLogger(__name__)

MODULE, OPTIMIZER, STATEFUL, TENSORS, OBJECT, RNG = (
    "module",
    "optimizer",
    "stateful",
    "tensors",
    "object",
    "rng",
)
TREE, PICKLE = "tree", "pickle"
RNG_KEY = "_rng"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_MAX_KEYS_SHOWN = 5


def kind_of(value: Any) -> str:
    if isinstance(value, nn.Module):
        return MODULE
    if isinstance(value, torch.optim.Optimizer):
        return OPTIMIZER
    if isinstance(value, torch.Tensor):
        return TENSORS
    if callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    ):
        return STATEFUL
    return TENSORS if has_tensor(value) else OBJECT


def has_tensor(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, Mapping):
        return any(has_tensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(has_tensor(v) for v in tree)
    return False


def check_keys(app_state: Mapping[str, Any]) -> None:
    if not isinstance(app_state, Mapping) or not app_state:
        raise TypeError("app_state must be a non-empty dict of name -> object")
    for key in app_state:
        if not isinstance(key, str) or not key or "." in key or key.startswith("_"):
            raise ValueError(
                f"app_state key {key!r} is invalid: keys are non-empty str without '.', "
                "not starting with '_' (reserved for the engine)"
            )


def _map_tree(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Copy the containers of ``tree`` with ``fn`` applied to tensors; tuples become lists."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: _map_tree(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_map_tree(v, fn) for v in tree]
    return tree


def _detached(tree: Any) -> Any:
    return _map_tree(tree, lambda t: t.detach())


def _empty_like(tree: Any) -> Any:
    return _map_tree(tree, torch.empty_like)


def _owner_module(
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


# ---------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "CUDA RNG saved for %d devices, %d here: not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )


def rng_fqn(rank: int) -> str:
    return f"{RNG_KEY}.rank{rank}"


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
    check_keys(app_state)
    sd: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, value in app_state.items():
        kind = kind_of(value)
        entry: dict[str, Any] = {"kind": kind}
        if kind == MODULE:
            sd[key] = get_model_state_dict(value)
        elif kind == OPTIMIZER:
            owner_key, owner = _owner_module(key, value, app_state)
            sd[key] = get_optimizer_state_dict(owner, value, options=_OPTIM_OPTIONS)
            entry["module"] = owner_key
        elif kind == TENSORS:
            sd[key], entry["encoding"] = _detached(value), TREE
        elif kind == OBJECT:
            sd[key], entry["encoding"] = _pickle(key, value), PICKLE
        else:  # STATEFUL: its state dict as a tensor tree, or one blob if it has no tensor
            payload = value.state_dict()
            if has_tensor(payload):
                sd[key], entry["encoding"] = _detached(payload), TREE
            else:
                sd[key], entry["encoding"] = _pickle(key, payload), PICKLE
        entries[key] = entry
    if capture_rng:
        sd[RNG_KEY] = {f"rank{rank}": pickle.dumps(capture_rng_state())}
        entries[RNG_KEY] = {"kind": RNG, "world_size": world_size}
    return SaveState(sd, entries)


def _pickle(key: str, value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError(
            f"app_state[{key!r}] ({type(value).__name__}) is neither a module, optimizer, "
            f"tensor tree or Stateful object, and cannot be pickled: {e}"
        ) from e


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class _Restore:
    """How one key of ``app_state`` is restored: ``decode`` is pure (unpickle, rebuild the
    caller's container types) and runs for every key before any ``apply`` writes."""

    key: str
    order: int
    decode: Callable[[Any], Any]
    apply: Callable[[Any], None]


# Apply order: what runs the caller's code (load_state_dict of Stateful objects) first,
# so that if it raises, modules and optimizers are still untouched; RNG last.
_ORDER = {STATEFUL: 0, OBJECT: 0, TENSORS: 1, OPTIMIZER: 2, MODULE: 3, RNG: 4}


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
    where: str

    def apply(self) -> None:
        """Write the loaded values into the caller's objects (only after a full read)."""
        self.flat.update(self.read)  # DCP replaced the placeholders of non-tensor leaves
        nested = unflatten_state_dict(self.flat, self.mappings)
        decoded = []
        for r in self.restores:
            try:
                decoded.append((r, r.decode(nested[r.key])))
            except StateMismatchError:
                raise
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint {self.where}: cannot decode {r.key!r}: {e}"
                ) from e
        for r, value in sorted(decoded, key=lambda rv: rv[0].order):
            r.apply(value)

    def rollback(self) -> None:
        for fn in self.rollbacks:
            fn()


def build_load_plan(
    app_state: dict[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    metadata: Metadata,
    *,
    rank: int,
    restore_rng: bool,
    where: str,
    optional: Collection[str] = (),
) -> LoadPlan:
    """Fresh targets for every key of ``app_state``, checked against the checkpoint (a key
    in ``optional`` that the checkpoint lacks is left as it is).

    Raises ``StateMismatchError`` naming ``where`` and the first mismatching keys before
    anything is read; the caller's objects are untouched (an optimizer whose state had to
    be initialised to learn its shapes is reset, here and by ``LoadPlan.rollback``).
    """
    check_keys(app_state)
    rollbacks: list[Callable[[], None]] = []
    try:
        return _build_load_plan(
            app_state, entries, metadata, rank, restore_rng, where, rollbacks, optional
        )
    except BaseException:
        for fn in rollbacks:
            fn()
        raise


def _build_load_plan(
    app_state: dict[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    metadata: Metadata,
    rank: int,
    restore_rng: bool,
    where: str,
    rollbacks: list[Callable[[], None]],
    optional: Collection[str],
) -> LoadPlan:
    nested: dict[str, Any] = {}
    restores: list[_Restore] = []
    lenient: set[str] = set()  # key prefixes whose absence from the checkpoint is tolerated
    for key, value in app_state.items():
        saved = entries.get(key)
        if saved is None and key in optional:
            continue  # the caller's value stays
        if saved is None:
            raise StateMismatchError(
                f"checkpoint {where} has no entry {key!r} (it has: {sorted(entries)})"
            )
        kind = kind_of(value)
        if kind != saved["kind"]:
            raise StateMismatchError(
                f"checkpoint {where}: {key!r} was saved as a {saved['kind']}, "
                f"cannot load it into a {kind} ({type(value).__name__})"
            )
        if kind == MODULE:
            nested[key] = _empty_like(get_model_state_dict(value))
            restores.append(_Restore(key, _ORDER[kind], _same, _module_setter(value)))
        elif kind == OPTIMIZER:
            _, owner = _owner_module(key, value, app_state)
            if not value.state:
                # get_optimizer_state_dict initialises empty state to learn its shapes.
                rollbacks.append(value.state.clear)
            osd = get_optimizer_state_dict(owner, value, options=_OPTIM_OPTIONS)
            nested[key] = _empty_like(osd)
            unstepped = _unstepped(key, owner, value, metadata)
            restores.append(
                _Restore(key, _ORDER[kind], _same, _optimizer_setter(owner, value, unstepped))
            )
            lenient.add(f"{key}.param_groups.")
            lenient.update(f"{key}.state.{fqn}." for fqn in unstepped)
        elif saved.get("encoding") == PICKLE:
            nested[key] = b""
            restores.append(
                _Restore(key, _ORDER[kind], pickle.loads, _setter(key, kind, app_state))
            )
        else:
            template = value.state_dict() if kind == STATEFUL else value
            nested[key] = _empty_like(template)
            restores.append(
                _Restore(
                    key, _ORDER[kind], _rebuilder(template, key), _setter(key, kind, app_state)
                )
            )
    if restore_rng and RNG_KEY in entries:
        if rng_fqn(rank) in metadata.state_dict_metadata:
            nested[RNG_KEY] = {f"rank{rank}": b""}
            restores.append(
                _Restore(
                    RNG_KEY,
                    _ORDER[RNG],
                    lambda v: pickle.loads(v[f"rank{rank}"]),
                    restore_rng_state,
                )
            )
        else:
            log.warning(
                "[rank=%d] checkpoint %s has no RNG state for this rank (saved by %s ranks); "
                "RNG not restored",
                rank,
                where,
                entries[RNG_KEY].get("world_size"),
            )
    flat, mappings = flatten_state_dict(nested)
    tolerated = _match(flat, metadata, list(app_state), lenient, where)
    read = {k: v for k, v in flat.items() if k not in tolerated}
    return LoadPlan(read, flat, mappings, restores, rollbacks, where)


def _match(
    flat: dict[str, Any], metadata: Metadata, keys: list[str], lenient: set[str], where: str
) -> set[str]:
    """Keys, shapes and dtypes of the fresh targets against the checkpoint's metadata.

    Returns the keys absent from the checkpoint that are tolerated (they keep their value).
    """
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
        unexpected = sorted(f for f in have - want if not any(f.startswith(p) for p in lenient))
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


def _same(value: Any) -> Any:
    return value


def _module_setter(module: nn.Module) -> Callable[[Any], None]:
    def apply(sd: Any) -> None:
        set_model_state_dict(module, sd)

    return apply


def _unstepped(
    key: str, owner: nn.Module, optim: torch.optim.Optimizer, metadata: Metadata
) -> dict[str, nn.Parameter]:
    """The parameters of ``optim`` that have no state at all in the checkpoint: they had
    not been stepped when it was saved (DINO's last layer, frozen for the first epoch, has
    its gradients dropped). By fqn. A parameter with part of its state is not one of them
    (``_match`` reports it)."""
    prefix = f"{key}.state."
    # Every dotted prefix of the keys under state.: a parameter has state in the checkpoint
    # iff its fqn is one of them (state names may nest: state.<fqn>.mom.buf).
    saved: set[str] = set()
    for f in metadata.state_dict_metadata:
        if f.startswith(prefix):
            parts = f[len(prefix) :].split(".")
            saved.update(".".join(parts[:i]) for i in range(1, len(parts)))
    mine = {id(p) for group in optim.param_groups for p in group["params"]}
    out: dict[str, nn.Parameter] = {}
    for name, param in owner.named_parameters():
        if id(param) in mine and param.requires_grad:
            out.update((fqn, param) for fqn in _get_fqns(owner, name) if fqn not in saved)
    return out


def _optimizer_setter(
    owner: nn.Module, optim: torch.optim.Optimizer, unstepped: Mapping[str, nn.Parameter]
) -> Callable[[Any], None]:
    def apply(osd: Any) -> None:
        set_optimizer_state_dict(owner, optim, osd, options=_OPTIM_OPTIONS)
        # Invariant: a parameter without state in the checkpoint has none after the load,
        # as in the run that saved it (its first step then counts from 1, bit for bit).
        for param in unstepped.values():
            optim.state.pop(param, None)
        if unstepped:
            log.info(
                "%d parameters were not stepped yet when the checkpoint was saved: "
                "no optimizer state for %s",
                len(unstepped),
                _first(sorted(unstepped)),
            )

    return apply


def _setter(key: str, kind: str, app_state: dict[str, Any]) -> Callable[[Any], None]:
    def apply(value: Any) -> None:
        if kind == STATEFUL:
            app_state[key].load_state_dict(value)
        elif kind == TENSORS:
            app_state[key] = _copy_into(app_state[key], value)
        else:
            app_state[key] = value

    return apply


def _rebuilder(template: Any, key: str) -> Callable[[Any], Any]:
    return lambda loaded: _rebuild(template, loaded, key)


def _rebuild(template: Any, src: Any, path: str) -> Any:
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
                out[k] = _rebuild(v, src[k] if k in src else src[str(k)], f"{path}.{k}")
            elif _is_empty(v):
                out[k] = v
            else:
                raise StateMismatchError(f"{path}.{k} is not in the checkpoint")
        return out
    if isinstance(template, (list, tuple)):
        if not isinstance(src, (list, tuple)) or len(src) != len(template):
            raise StateMismatchError(f"{path}: checkpoint holds {src!r:.80}")
        values = [
            _rebuild(t, v, f"{path}[{i}]")
            for i, (t, v) in enumerate(zip(template, src, strict=True))
        ]
        if isinstance(template, tuple):
            return type(template)(*values) if hasattr(template, "_fields") else tuple(values)
        return values
    return src


def _is_empty(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple)) and not value


@torch.no_grad()
def _copy_into(dst: Any, src: Any) -> Any:
    """Tensors of ``dst`` updated by copy, containers in place, other leaves replaced.
    ``src`` has ``dst``'s structure (``_rebuild``)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return dst
    if isinstance(dst, dict):
        for k in dst:
            dst[k] = _copy_into(dst[k], src[k])
        return dst
    if isinstance(dst, list):
        for i in range(len(dst)):
            dst[i] = _copy_into(dst[i], src[i])
        return dst
    if isinstance(dst, tuple):
        values = [_copy_into(d, s) for d, s in zip(dst, src, strict=True)]
        return type(dst)(*values) if hasattr(dst, "_fields") else tuple(values)
    return src
