"""An optimizer's state dict in the three layouts checkpoints hold it in, and the
conversions between them.

- ``flat``: ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``, what the
  engine (and torchtitan) writes: ``{"state.<fqn>.<name>": ..., "param_groups.<fqn>.lr": ...}``;
- ``ids``: ``Optimizer.state_dict()``, what ``Optimizer.load_state_dict`` takes:
  ``{"state": {0: {...}}, "param_groups": [{"lr": ..., "params": [0, 1]}]}``, a parameter
  being its position in the optimizer's groups (group by group, in order);
- ``fqn``: ``get_optimizer_state_dict`` unflattened, what ``set_optimizer_state_dict``
  takes: the same, keyed by parameter name.

A flat state dict says neither which group a parameter was in nor in what order: the
engine records both (``param_names``: each group's parameter names, in order) in the
marker entry of every optimizer it saves, so that an offline read gives the ``ids``
layout. A checkpoint without that record gives the ``fqn`` layout, with a group per run
of parameters with equal hyperparameters (``flat_to_fqn``). State names may nest
(``state.<fqn>.a.b``: Shampoo); they come back as nested dicts.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import _get_fqns

from .errors import CheckpointError, StateMismatchError

STATE, GROUPS, PARAMS = "state", "param_groups", "params"
Layout = Literal["flat", "ids", "fqn"]


_NAMES: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, list[list[str]]]] = (
    weakref.WeakKeyDictionary()
)


def param_names(owner: nn.Module, optim: torch.optim.Optimizer, key: str) -> list[list[str]]:
    """Each group's parameter names, in the optimizer's order (the names of
    ``get_optimizer_state_dict``: no ``module.``, ``_orig_mod.`` or FSDP prefix). Kept
    per optimizer while its groups hold the same parameters (every save asks). ``key``:
    the optimizer's ``app_state`` key, for the error."""
    ids = (id(owner), tuple(tuple(id(p) for p in g[PARAMS]) for g in optim.param_groups))
    cached = _NAMES.get(optim)
    if cached is not None and cached[0] == ids:
        return [list(group) for group in cached[1]]
    names = _param_names(owner, optim, key)
    _NAMES[optim] = (ids, names)
    return [list(group) for group in names]


def _param_names(owner: nn.Module, optim: torch.optim.Optimizer, key: str) -> list[list[str]]:
    names: dict[int, str] = {}
    for name, param in owner.named_parameters():
        for fqn in sorted(_get_fqns(owner, name)):
            names.setdefault(id(param), fqn)
    out: list[list[str]] = []
    for i, group in enumerate(optim.param_groups):
        for j, p in enumerate(group[PARAMS]):
            if id(p) not in names:
                raise CheckpointError(
                    f"app_state[{key!r}]: param_groups[{i}]['params'][{j}] (shape "
                    f"{list(p.shape)}) is not a parameter of its module "
                    f"({type(owner).__name__})"
                )
        out.append([names[id(p)] for p in group[PARAMS]])
    return out


def saved_layout(key: str, fqns: Sequence[str], saved: Collection[str]) -> Layout:
    """The layout an optimizer was saved in under ``key``, from the checkpoint's flat keys
    ``saved`` (DCP's metadata) and the optimizer's parameter names ``fqns``."""
    if f"{key}.{GROUPS}.0.{PARAMS}" not in saved:
        return "flat"
    prefixes = tuple(f"{key}.{STATE}.{fqn}." for fqn in fqns)
    return "fqn" if any(f.startswith(prefixes) for f in saved) else "ids"


def unstepped(
    key: str,
    owner: nn.Module,
    optim: torch.optim.Optimizer,
    metadata: Metadata,
    names: Mapping[str, str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters of ``optim`` that have no state at all in the checkpoint: they had
    not been stepped when it was saved (DINO's last layer, frozen for the first epoch, has
    its gradients dropped). By the name the checkpoint keys state by: the fqn, or, with
    ``names`` (name -> fqn), a position. A parameter with part of its state is not one of
    them (the key-by-key match reports it)."""
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
    if names is not None:  # keyed by position: the positions of those parameters
        return {pos: out[fqn] for pos, fqn in names.items() if fqn in out and pos not in saved}
    return out


def _split(flat: Mapping[str, Any], section: str, fqns: Collection[str]) -> dict[str, dict]:
    """``section.<fqn>.<rest>`` keys by parameter name (the longest name that prefixes the
    key), ``rest`` split at dots into nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    head = section + "."
    for key, value in flat.items():
        if not key.startswith(head):
            continue
        parts = key[len(head) :].split(".")
        cut = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in fqns), 0)
        if not cut:
            raise CheckpointError(f"optimizer key {key!r} names no parameter of the optimizer")
        node = out.setdefault(".".join(parts[:cut]), {})
        for part in parts[cut:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def flat_to_nested(
    flat: Mapping[str, Any], groups: Sequence[Sequence[str]], by: Layout
) -> dict[str, Any]:
    """The ``ids`` (or ``fqn``) layout of a flat state dict whose parameters were in
    ``groups`` (each group's names, in order)."""
    fqns = [fqn for group in groups for fqn in group]
    known = set(fqns)
    state = _split(flat, STATE, known)
    hyper = _split(flat, GROUPS, known)
    ids = {fqn: i for i, fqn in enumerate(fqns)}

    def name(fqn: str) -> Any:
        return ids[fqn] if by == "ids" else fqn

    out_groups = []
    for group in groups:
        values = dict(hyper.get(group[0], {})) if group else {}
        out_groups.append({**values, PARAMS: [name(f) for f in group]})
    return {STATE: {name(f): state[f] for f in fqns if f in state}, GROUPS: out_groups}


def flat_to_fqn(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fqn`` layout of a flat state dict that does not say its groups: one group
    per run of parameters (in the order of the checkpoint) with equal hyperparameters."""
    head = GROUPS + "."
    order = list(
        dict.fromkeys(k[len(head) :].rsplit(".", 1)[0] for k in flat if k.startswith(head))
    )
    hyper = _split(flat, GROUPS, set(order))
    groups: list[list[str]] = []
    for fqn in order:
        if groups and _same(hyper[groups[-1][0]], hyper[fqn]):
            groups[-1].append(fqn)
        else:
            groups.append([fqn])
    return flat_to_nested(flat, groups, "fqn")


def nested_to_flat(
    nested: Mapping[str, Any], groups: Sequence[Sequence[str]], by: Layout, where: str
) -> dict[str, Any]:
    """The flat layout of an ``ids`` or ``fqn`` state dict, for an optimizer whose groups
    are ``groups`` (each group's names, in order). ``StateMismatchError`` naming ``where``
    when the saved groups do not hold the same parameters."""
    saved_groups = nested.get(GROUPS) or []
    if len(saved_groups) != len(groups):
        raise StateMismatchError(
            f"{where}: the checkpoint has {len(saved_groups)} parameter groups, the "
            f"optimizer {len(groups)}"
        )
    fqns = [fqn for group in groups for fqn in group]
    names = {(i if by == "ids" else fqn): fqn for i, fqn in enumerate(fqns)}
    flat: dict[str, Any] = {}
    start = 0
    for g, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        expected = list(range(start, start + len(group))) if by == "ids" else list(group)
        start += len(group)
        if list(saved.get(PARAMS, [])) != list(expected):
            raise StateMismatchError(
                f"{where}: parameter group {g} holds {_short(saved.get(PARAMS))} in the "
                f"checkpoint, {_short(expected)} in the optimizer"
            )
        for fqn in group:
            for k, v in saved.items():
                if k != PARAMS:
                    flat[f"{GROUPS}.{fqn}.{k}"] = v
    for pid, values in (nested.get(STATE) or {}).items():
        if pid not in names:
            raise StateMismatchError(f"{where}: state of parameter {pid!r}, which no group holds")
        _flatten(values, f"{STATE}.{names[pid]}", flat)
    return flat


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _short(items: Any) -> str:
    items = list(items or [])
    return repr(items) if len(items) <= 6 else f"{items[:6]!r}... ({len(items)})"


__all__ = [
    "Layout",
    "flat_to_fqn",
    "flat_to_nested",
    "nested_to_flat",
    "param_names",
    "saved_layout",
    "unstepped",
]
