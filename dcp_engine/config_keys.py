"""A ``checkpoint:`` block of a file -> ``CheckpointConfig``: the keys and value spellings
of the reference guides (experiment config, DINO, SuperGradients, Dream Trainer), the
defaults the experiment-config guide documents for its block, and errors that name the
key as it was written. ``docs/guides.md`` lists every key with what it sets."""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import CheckpointConfig
from .errors import ConfigError, UnknownKeyError

# Every key a ``checkpoint:`` block may hold -> the field it sets: the field names, plus the
# spellings of the reference guides.
KEY_ALIASES: dict[str, str] = {
    **{f.name: f.name for f in fields(CheckpointConfig)},
    # experiment config, DINO
    "dir": "root_dir",
    "save_dir": "root_dir",
    "save_frequency": "save_every_n_epochs",
    "save_freq": "save_every_n_epochs",
    "save_latest": "save_last",
    # Dream Trainer
    "resume_mode": "resume",
    # SuperGradients (training_params and checkpoint_params)
    "ckpt_root_dir": "root_dir",
    "resume_path": "resume",
    "run_id": "experiment_name",
    "metric_to_watch": "monitor",
    "greater_metric_to_watch_is_better": "mode",
    "save_ckpt_epoch_list": "save_at_epochs",
    "checkpoint_path": "init_weights",
    "strict_load": "init_weights_strict",
    "load_backbone": "init_weights_backbone_only",
}

# Keys of the guides with no counterpart here: accepted when empty (as the guides' default
# blocks print them), refused with what to use instead otherwise.
UNSUPPORTED: dict[str, str] = {
    "pretrained_weights": "empty: SuperGradients' model zoo is not part of dcp-engine; "
    "download the weights and name the file with checkpoint_path",
    "resume_from_remote_sg_logger": "false: resume from a remote root_dir (s3://...) instead",
}

# A block written only in the experiment-config guide's keys gets that guide's defaults.
EXPERIMENT_GUIDE_KEYS = frozenset(
    {"enabled", "dir", "experiment_name", "save_frequency", "save_best", "resume"}
)
SCHEDULE_FIELDS = (
    "save_every_n_steps",
    "save_every_n_epochs",
    "save_every_n_seconds",
    "save_at_epochs",
    "save_best_only",
)


def config_from_block(block: Mapping[str, Any], where: str) -> CheckpointConfig:
    """``CheckpointConfig.from_dict``: see its docstring."""
    if not isinstance(block, Mapping):
        raise ConfigError("checkpoint", block, "a mapping of keys to values", where=where)
    given: dict[str, list[tuple[str, Any]]] = {}  # field -> [(key as written, value)]
    for key, value in block.items():
        if not isinstance(key, str):
            raise UnknownKeyError(repr(key), where, None)
        if key in UNSUPPORTED:
            if value not in (None, False, ""):
                raise ConfigError(key, value, UNSUPPORTED[key], where=f"{where}.{key}")
            continue
        field = KEY_ALIASES.get(key)
        if field is None:
            known = sorted([*KEY_ALIASES, *UNSUPPORTED])
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            raise UnknownKeyError(key, where, near[0] if near else None)
        if value is None and key != field:
            continue  # an alias left empty (SuperGradients' `run_id:`) is not given
        given.setdefault(field, []).append((key, _from_file_value(key, value, where)))
    kwargs: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> key as written
    for field, spellings in given.items():
        values = [(k, v) for k, v in spellings if v is not None] or spellings[:1]
        if len(values) > 1:  # two spellings of one field, both set
            (first, _), (second, value) = values[:2]
            raise ConfigError(
                field, block[second], f"one of {first!r} and {second!r}, not both",
                where=f"{where}.{second}",
            )  # fmt: skip
        written[field], kwargs[field] = values[0]
    off_by_default = _implied(block, kwargs, written, where)
    try:
        config = CheckpointConfig(**kwargs)
    except ConfigError as e:
        as_written = written.get(e.field)
        if as_written is None:
            raise
        expected = str(e).split("expected ", 1)[-1]
        raise ConfigError(
            e.field, block[as_written], expected, where=f"{where}.{as_written}"
        ) from None
    if off_by_default:
        _warn(
            f"{where} has no enabled key: checkpointing is off (the default the "
            "experiment-config guide documents for its block); add enabled: true to save"
        )
    if written.get("save_best") and config.save_best and config.monitor is None:
        _warn(
            f"{where}.{written['save_best']}: true keeps a best checkpoint (checkpoints/best, "
            "checkpoint_best.pth) only with a metric to rank by: add monitor: <metric> (and "
            "mode: min or max) to that block; without one no best is kept"
        )
    return config


def _warn(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside this package."""
    here, level = os.path.dirname(os.path.abspath(__file__)), 2
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _implied(
    block: Mapping[str, Any], kwargs: dict[str, Any], written: dict[str, str], where: str
) -> bool:
    """What a key implies beyond its own field: SuperGradients' ``run_id`` resumes that run
    and ``metric_to_watch`` is maximised unless told otherwise; a block in the
    experiment-config guide's keys only gets that guide's defaults. True: that turned
    checkpointing off (the block has no ``enabled``)."""
    if written.get("experiment_name") == "run_id":
        resume = kwargs.get("resume")
        if resume is None:
            kwargs["resume"] = "latest"
        elif resume not in ("latest", "best"):
            raise ConfigError(
                "experiment_name", block["run_id"],
                f"no {written['resume']} beside it (run_id resumes that run in place; "
                f"{written['resume']} branches from a checkpoint into a new run)",
                where=f"{where}.run_id",
            )  # fmt: skip
    if written.get("monitor") == "metric_to_watch" and "mode" not in kwargs:
        kwargs["mode"] = "max"  # greater_metric_to_watch_is_better defaults to True in SG
    if set(block) <= EXPERIMENT_GUIDE_KEYS:
        if not any(f in kwargs for f in SCHEDULE_FIELDS):
            kwargs["save_every_n_epochs"] = 10  # its save_frequency default
        if "enabled" not in kwargs:
            kwargs["enabled"] = False
            return True
    return False


def _from_file_value(key: str, value: Any, where: str) -> Any:
    """The spellings files use for a value: ``resume: true`` (SuperGradients) is latest,
    ``resume: false`` and ``resume_mode: None`` fresh; ``async_mode: off``, which YAML
    reads as false, is "off"; SuperGradients' ``strict_load`` (``no_key_matching``) and
    ``greater_metric_to_watch_is_better``; a YAML list of epochs."""
    field = KEY_ALIASES[key]
    if field == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if field == "resume" and value in ("None", "none"):
        return None  # Dream Trainer's `None`, which YAML reads as a string
    if field == "async_mode" and value is False:
        return "off"  # YAML 1.1 reads `async_mode: off` as false
    if key == "greater_metric_to_watch_is_better":
        if not isinstance(value, bool):
            raise ConfigError("mode", value, "true or false", where=f"{where}.{key}")
        return "max" if value else "min"
    if key == "strict_load" and isinstance(value, str):
        if value.lower().rpartition(".")[2] == "no_key_matching":  # StrictLoad.NO_KEY_MATCHING
            return "shape"
        if value != "shape":
            raise ConfigError(
                field, value, "True, False or no_key_matching", where=f"{where}.{key}"
            )
    if field == "save_at_epochs" and isinstance(value, list):
        return tuple(value)
    if field == "init_weights" and value == "":
        return None
    return value


def config_from_yaml(path: str | os.PathLike[str]) -> CheckpointConfig:
    """``CheckpointConfig.from_yaml``: see its docstring."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError("checkpoint", str(path), f"valid YAML ({e})", where=str(path)) from e
    if data is None:
        data = {}
    if isinstance(data, Mapping) and "checkpoint" in data:
        return config_from_block(data["checkpoint"] or {}, f"{path}: checkpoint")
    return config_from_block(data, str(path))


__all__ = ["KEY_ALIASES", "UNSUPPORTED", "config_from_block", "config_from_yaml"]
