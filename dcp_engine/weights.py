"""``load_weights``: weights into a model that is not quite the one that was trained
(evaluation, fine-tuning, another codebase), from a dcp-engine checkpoint or a plain file.

Sources: a dcp-engine checkpoint (a directory, an alias, an experiment, or a guide's file
name for one: ``checkpoint_best.pth``; ``key`` names the entry, e.g. ``teacher``, and the
guides' ``teacher_state_dict`` is ``teacher``), or a ``.pt``/``.pth`` file holding a state
dict, or a dict with the state dict under ``model``/``state_dict``/``model_state_dict``/
``net`` (the formats of the guides our users come from). Without a ``key`` an ``ema_net``
entry is preferred, as SuperGradients loads the EMA weights of a checkpoint that has them.
Wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) are ignored on
both sides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import layout, resolve
from .errors import CheckpointError, ConfigError, StateMismatchError
from .export import flat_tensors
from .location import Location, as_location, is_url
from .reader import open_checkpoint
from .storage import Storage, storage_of

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EMA_KEY = "ema_net"  # SuperGradients: "the EMA weights will be the ones loaded"
STATE_DICT_KEYS = (EMA_KEY, "model", "state_dict", "model_state_dict", "net")
STATE_DICT_SUFFIX = "_state_dict"  # the guides' teacher_state_dict is our teacher


@dataclass(frozen=True)
class LoadResult:
    """Keys of the model not loaded, and keys of the source not used (model naming)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def strip_wrappers(name: str) -> str:
    """``module._orig_mod.backbone.w`` -> ``backbone.w``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._orig_mod.", ".")
    return name


def read_state_dict(
    source: str | os.PathLike[str] | Location,
    key: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The flat state dict (name -> tensor) a source holds: a local path or a URL
    (``s3://``, ``http(s)://``...) of a checkpoint, an alias, an experiment or a file."""
    path = as_location(source, storage_options if is_url(source) else None)
    storage = storage_of(path)
    if not storage.exists(path):
        path = resolve.follow(path)  # a guide's name for one of ours, or it raises
    if _is_checkpoint_location(storage, path):
        ckpt = open_checkpoint(path)  # verified: a corrupt checkpoint raises here
        if key is None:
            modules = [k for k in ckpt.keys if ckpt.kind(k) == "module"]
            key = _preferred(modules, f"{ckpt.path} holds modules {modules}: name one with key=")
        elif key not in ckpt.keys and key.removesuffix(STATE_DICT_SUFFIX) in ckpt.keys:
            key = key.removesuffix(STATE_DICT_SUFFIX)
        tree = ckpt.load_entries([key])[key]
    else:
        try:
            with storage.open_read(path) as f:
                tree = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a loadable state dict file: {e}") from e
        if key is not None:
            if not isinstance(tree, Mapping) or key not in tree:
                raise CheckpointError(f"{path} has no key {key!r}")
            tree = tree[key]
        elif isinstance(tree, Mapping) and not _is_flat_tensors(tree):
            nested = [k for k, v in tree.items() if isinstance(v, Mapping) and _is_flat_tensors(v)]
            inner = [k for k in STATE_DICT_KEYS if isinstance(tree.get(k), Mapping)]
            if not inner and len(nested) != 1:
                raise CheckpointError(
                    f"{path}: no state dict found (looked for a flat dict of tensors, for "
                    f"the keys {', '.join(STATE_DICT_KEYS)} and for one dict of tensors; it "
                    f"has {sorted(tree)[:10]})"
                )
            tree = tree[_preferred(inner or nested, "")]
    flat = dict(flat_tensors(tree))
    if not flat:
        raise CheckpointError(f"{path}: no tensors under {key or 'the state dict'}")
    return flat


def _preferred(keys: list[str], ambiguous: str) -> str:
    """The entry to load when no ``key`` is given: ``ema_net`` if present (said in the
    log), else the first of the candidates in order, which must be the only one when
    ``ambiguous`` is the message to raise."""
    if EMA_KEY in keys:
        log.info("loading the EMA weights (%s), as SuperGradients does; name another entry "
                 "with key= for the raw ones", EMA_KEY)  # fmt: skip
        return EMA_KEY
    if ambiguous and len(keys) != 1:
        raise CheckpointError(ambiguous)
    return keys[0]


def _is_checkpoint_location(storage: Storage, path: Location) -> bool:
    """A checkpoint, an alias or an experiment of ours, rather than one file. (A web
    server answers a directory's URL with a page, so "is it a file" cannot tell.)"""
    if path.name in layout.ALIASES:
        return True
    if isinstance(path, Path):
        return storage.is_dir(path)
    return storage.exists(layout.marker_path(path)) or storage.exists(path / layout.INDEX_FILE)


def _is_flat_tensors(tree: Mapping[str, Any]) -> bool:
    return bool(tree) and all(isinstance(v, torch.Tensor) for v in tree.values())


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Location,
    *,
    key: str | None = None,
    strict: bool | Literal["shape", "no_key_matching"] = True,
    backbone_only: bool = False,
    backbone_prefix: str = "backbone.",
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Load the weights of ``source`` into ``model``; the missing and unexpected keys.
    ``source`` may be a URL (``s3://``, ``http(s)://``; ``storage_options`` for its file
    system, default its environment).

    ``strict=True``: names (wrapper prefixes aside) and shapes must match exactly;
    ``False``: load what matches by name and shape, report the rest; ``"shape"`` (or
    SuperGradients' ``"no_key_matching"``): match by position when names differ: the i-th
    tensor of the source goes to the i-th of the model, and any pair whose shapes disagree
    (or different counts) refuses the whole load. ``backbone_only``: only the backbone:
    the keys under ``backbone_prefix`` of a side that has them, all keys of a side that is
    a bare backbone (a model without that prefix, or Mammoth's simple ``.pt`` of the
    backbone's parameters). The model is untouched when the load is refused.
    """
    if strict == "no_key_matching":
        strict = "shape"
    found = read_state_dict(source, key, storage_options)
    source_sd = {strip_wrappers(k): v for k, v in found.items()}
    target_sd = model.state_dict()
    names = {strip_wrappers(k): k for k in target_sd}  # stripped -> the model's own name
    if backbone_only:  # both sides named relative to the backbone
        source_sd = _backbone(source_sd, backbone_prefix)
        names = _backbone(names, backbone_prefix)
    if strict == "shape":
        pairs = _match_by_position(source_sd, names, target_sd, str(source))
        missing: list[str] = []
        unexpected: list[str] = []
    elif strict in (True, False):
        pairs, missing, unexpected = _match_by_name(source_sd, names, target_sd, bool(strict))
        if strict and (missing or unexpected):
            raise StateMismatchError(
                f"{source}: strict load refused: missing {missing[:8]}, unexpected "
                f"{unexpected[:8]} (strict=False loads what matches; 'shape' matches by position)"
            )
    else:
        raise ValueError(f"strict must be True, False or 'shape' (no_key_matching), got {strict!r}")
    with torch.no_grad():
        for target_name, tensor in pairs:
            target_sd[target_name].copy_(tensor)
    return LoadResult(missing, unexpected)


def _backbone(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The backbone's entries of a state dict, named relative to it: the keys under
    ``prefix`` (stripped), or every key when none has it (a bare backbone)."""
    inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside or dict(sd)


def _match_by_name(
    source: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    target: Mapping[str, torch.Tensor],
    strict: bool,
) -> tuple[list[tuple[str, torch.Tensor]], list[str], list[str]]:
    pairs, missing, unexpected = [], [], []
    for name, own in names.items():
        t = source.get(name)
        if t is None:
            missing.append(own)
        elif t.shape != target[own].shape:
            if strict:
                raise StateMismatchError(
                    f"{own}: the source has shape {list(t.shape)}, the model "
                    f"{list(target[own].shape)}"
                )
            missing.append(own)
        else:
            pairs.append((own, t))
    unexpected = [k for k in source if k not in names]
    return pairs, missing, unexpected


def _match_by_position(
    source: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    target: Mapping[str, torch.Tensor],
    where: str,
) -> list[tuple[str, torch.Tensor]]:
    src, dst = list(source.items()), list(names.values())
    if len(src) != len(dst):
        raise StateMismatchError(
            f"{where}: strict='shape' needs as many tensors as the model: the source has "
            f"{len(src)}, the model {len(dst)}"
        )
    for (s_name, t), own in zip(src, dst, strict=True):
        if t.shape != target[own].shape:
            raise StateMismatchError(
                f"{where}: strict='shape' refused: source {s_name} {list(t.shape)} vs model "
                f"{own} {list(target[own].shape)}"
            )
    return [(own, t) for (_, t), own in zip(src, dst, strict=True)]


def load_init_weights(
    app_state: Mapping[str, Any],
    source: str,
    *,
    into: str | None,
    strict: bool | str,
    backbone_only: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """``CheckpointConfig.init_weights`` (SuperGradients' ``checkpoint_path``,
    ``strict_load``, ``load_backbone``): ``source`` loaded into the module ``into`` of
    ``app_state`` (default: its only module). Raises ``ConfigError`` naming
    ``init_weights_into`` when that entry cannot be told."""
    modules = [k for k, v in app_state.items() if isinstance(v, nn.Module)]
    if into is None and len(modules) != 1:
        raise ConfigError("init_weights_into", None,
                          f"the app_state entry to load init_weights into (its modules: "
                          f"{', '.join(modules) or 'none'})")  # fmt: skip
    name = into if into is not None else modules[0]
    if name not in modules:
        raise ConfigError("init_weights_into", into, f"one of the modules {modules}")
    result = load_weights(app_state[name], source, strict=strict,  # type: ignore[arg-type]
                          backbone_only=backbone_only, storage_options=storage_options)  # fmt: skip
    log.info("loaded the initial weights of %s into %s (missing %d, unexpected %d)", source,
             name, len(result.missing_keys), len(result.unexpected_keys))  # fmt: skip
    return result


__all__ = ["LoadResult", "load_init_weights", "load_weights", "read_state_dict", "strip_wrappers"]
