"""A ``checkpoint:`` block of a file -> ``CheckpointConfig``.

Every key a block may hold maps to the field it sets (``KEY_ALIASES``): the field names,
the spellings of the reference guides (experiment config, DINO, SuperGradients, Dream
Trainer; ``docs/guides.md``) and torchtitan's keys with their torchtitan meanings
(``config_torchtitan``; ``docs/torchtitan.md``). A block written only in the
experiment-config guide's keys gets the defaults that guide documents. A key the engine
knows but does not support raises ``UnsupportedKeyError`` saying why and what to use; any
other key raises ``UnknownKeyError`` with a suggestion only when one is certain (another
framework's spelling of one of ours, or a near-miss typo), never a guess. A bad value
raises ``ConfigError`` naming the key as it was written.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import config_torchtitan as titan
from .config import CheckpointConfig
from .errors import ConfigError, UnknownKeyError, UnsupportedKeyError

# The reference guides' spellings -> the field each sets.
GUIDE_KEYS: dict[str, str] = {
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

# Every key a ``checkpoint:`` block may hold -> the field it sets.
KEY_ALIASES: dict[str, str] = {
    **{f.name: f.name for f in fields(CheckpointConfig)},
    **GUIDE_KEYS,
    **titan.TORCHTITAN_KEYS,
}

# Keys with no counterpart here -> (values that ask for nothing, why and what instead). The
# guides print some of them empty in their default blocks, torchtitan's job files as false.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "pretrained_weights": (
        (None, ""),
        "SuperGradients' model zoo is not part of dcp-engine; download the weights and "
        "name the file with checkpoint_path",
    ),
    "resume_from_remote_sg_logger": (
        (None, False),
        "SuperGradients' logger storage is not read; resume from a remote root_dir "
        "(s3://...) instead",
    ),
    **titan.UNSUPPORTED,
}

# Keys of other frameworks' checkpoint configs -> (framework, our key): named in the error.
OTHER_SPELLINGS: dict[str, tuple[str, str]] = {
    "dirpath": ("Lightning's ModelCheckpoint", "root_dir"),
    "save_top_k": ("Lightning's ModelCheckpoint", "keep_top_k"),
    "every_n_train_steps": ("Lightning's ModelCheckpoint", "save_every_n_steps"),
    "every_n_epochs": ("Lightning's ModelCheckpoint", "save_every_n_epochs"),
    "train_time_interval": ("Lightning's ModelCheckpoint", "save_every_n_seconds"),
    "output_dir": ("Hugging Face Trainer", "root_dir"),
    "save_steps": ("Hugging Face Trainer", "save_every_n_steps"),
    "save_total_limit": ("Hugging Face Trainer", "keep_last_n"),
    "resume_from_checkpoint": ("Hugging Face Trainer", "resume"),
    "metric_for_best_model": ("Hugging Face Trainer", "monitor"),
    "greater_is_better": ("Hugging Face Trainer", "mode (max or min)"),
    "project_dir": ("Accelerate's ProjectConfiguration", "root_dir"),
    "total_limit": ("Accelerate's ProjectConfiguration", "keep_last_n"),
    "max_to_keep": ("Orbax", "keep_last_n"),
    "save_interval_steps": ("Orbax", "save_every_n_steps"),
    "keep_period": ("Orbax", "keep_every_n_steps"),
    "best_mode": ("Orbax", "mode"),
    "max_keep_ckpts": ("MMEngine's CheckpointHook", "keep_last_n"),
    "out_dir": ("MMEngine's CheckpointHook", "root_dir"),
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


# ---------------------------------------------------------------- reading


def from_dict(
    cls: type[CheckpointConfig],
    block: Mapping[str, Any],
    *,
    where: str = "checkpoint",
    base_folder: str | None = None,
) -> CheckpointConfig:
    """See ``CheckpointConfig.from_dict``. ``base_folder``: what torchtitan's ``folder``
    is relative to when the block has no ``root_dir`` (torchtitan's ``job.dump_folder``)."""
    if not isinstance(block, Mapping):
        raise ConfigError("checkpoint", block, "a mapping of keys to values", where=where)
    given: dict[str, list[tuple[str, Any]]] = {}  # field -> [(key as written, value)]
    for key, value in block.items():
        if not isinstance(key, str):
            raise UnknownKeyError(repr(key), where, None)
        field = KEY_ALIASES.get(key)
        if field is None and _asks_for_nothing(key, value):
            continue  # e.g. torchtitan's `last_save_in_hf = false`, SG's `pretrained_weights:`
        if field is None:
            raise unknown_key(key, value, where)
        if value is None and key != field:
            continue  # an alias left empty (SuperGradients' `run_id:`) is not given
        given.setdefault(field, []).append((key, _from_file_value(key, value, where)))
    kwargs: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> key as written
    for field, spellings in given.items():
        values = [(k, v) for k, v in spellings if v is not None] or spellings[:1]
        if len(values) > 1:  # two spellings of one field, both set
            (first, _), (second, _) = values[:2]
            raise ConfigError(
                field, block[second], f"one of {first!r} and {second!r}, not both",
                where=f"{where}.{second}",
            )  # fmt: skip
        written[field], kwargs[field] = values[0]
    if written.get("experiment_name") == "folder":
        titan.apply_folder(kwargs, written, where, base_folder)
    titan.implied(kwargs, written, where)
    off_by_default = _guides_implied(block, kwargs, written, where)
    try:
        config = cls(**kwargs)
    except ConfigError as e:
        as_written = written.get(e.field)
        if as_written is None:
            raise
        expected = str(e).split("expected ", 1)[-1]
        raise ConfigError(e.field, block.get(as_written, kwargs.get(e.field)), expected,
                          where=f"{where}.{as_written}") from None  # fmt: skip
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


def from_yaml(cls: type[CheckpointConfig], path: str | os.PathLike[str]) -> CheckpointConfig:
    """See ``CheckpointConfig.from_yaml``."""
    import yaml

    path = Path(path)
    data = _read(path, yaml.safe_load, yaml.YAMLError, "YAML")
    if data is None:
        data = {}
    if isinstance(data, Mapping) and "checkpoint" in data:
        return from_dict(cls, data["checkpoint"] or {}, where=f"{path}: checkpoint")
    return from_dict(cls, data, where=str(path))


def _read(path: Path, loads: Callable[[str], Any], error: type[Exception], what: str) -> Any:
    """A config file's parsed content; a missing file or bad syntax named with its path."""
    try:
        return loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except error as e:
        raise ConfigError("checkpoint", str(path), f"valid {what} ({e})", where=str(path)) from e


def from_toml(cls: type[CheckpointConfig], path: str | os.PathLike[str]) -> CheckpointConfig:
    """See ``CheckpointConfig.from_toml``."""
    tomllib = _toml()
    path = Path(path)
    data = _read(path, tomllib.loads, tomllib.TOMLDecodeError, "TOML")
    job = data.get("job", {})
    table = data.get("checkpoint", {} if "job" in data else data)
    if not isinstance(table, Mapping) or not isinstance(job, Mapping):
        raise ConfigError("checkpoint", table, "a table", where=f"{path}: checkpoint")
    return from_dict(
        cls,
        with_torchtitan_defaults(table),
        where=f"{path}: checkpoint",
        base_folder=str(job.get("dump_folder", titan.TORCHTITAN_DUMP_FOLDER)),
    )


def _toml() -> Any:
    """The standard library's TOML reader (Python 3.11), else ``tomli``, its backport."""
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError("CheckpointConfig.from_toml needs Python 3.11 or `pip install tomli`")


def with_torchtitan_defaults(block: Mapping[str, Any]) -> dict[str, Any]:
    """``block`` plus torchtitan's default of every key whose field no key of the block
    sets (a block that says ``enabled`` gets no ``enable``)."""
    setting = {KEY_ALIASES.get(k) for k in block}
    out = dict(block)
    for key, value in titan.TORCHTITAN_DEFAULTS.items():
        if KEY_ALIASES[key] not in setting:
            out[key] = value
    ours = [
        k
        for k in block
        if KEY_ALIASES.get(k) == "last_save_only" and k not in titan.TORCHTITAN_KEYS
    ]
    if "export_dtype" not in setting and not ours:
        out["export_dtype"] = "float32"  # implied() drops it without a model-only final save
    return out


# ---------------------------------------------------------------- errors


def unknown_key(key: str, value: Any, where: str) -> ConfigError:
    """The error for a key no field takes: unsupported (why), another framework's
    spelling (ours), a near-miss typo (the key meant), or nothing to suggest."""
    unsupported = UNSUPPORTED.get(key)
    if unsupported is not None:
        return UnsupportedKeyError(key, value, where, unsupported[1])
    other = OTHER_SPELLINGS.get(key)
    if other is not None:
        framework, ours = other
        return UnknownKeyError(key, where, None, hint=f"that is {framework}'s key; ours is {ours}")
    return UnknownKeyError(key, where, _typo_of(key))


def _asks_for_nothing(key: str, value: Any) -> bool:
    """An unsupported key set to the value that turns its feature off."""
    unsupported = UNSUPPORTED.get(key)
    return unsupported is not None and any(
        type(value) is type(v) and value == v for v in unsupported[0]
    )


def _typo_of(key: str) -> str | None:
    """The one known key that ``key`` misses by case, ``-`` for ``_`` or one edit (two
    for keys over 6 letters; an edit: a letter added, dropped, changed, or two swapped),
    else None: a far guess (``folder`` -> ``mode``) misleads more than no answer."""
    norm = key.strip().lower().replace("-", "_")
    known = {*KEY_ALIASES, *UNSUPPORTED}
    if norm in known:
        return norm
    limit = 1 if len(norm) <= 6 else 2
    near = sorted((d, k) for k in known if (d := _edits(norm, k)) <= limit)
    if not near or (len(near) > 1 and near[1][0] == near[0][0]):
        return None  # none, or no single nearest
    return near[0][1]


def _edits(a: str, b: str) -> int:
    """Edit distance with swaps of neighbours (optimal string alignment)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _warn(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside this package."""
    here, level = os.path.dirname(os.path.abspath(__file__)), 2
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


# ---------------------------------------------------------------- values and implications


def _guides_implied(
    block: Mapping[str, Any], kwargs: dict[str, Any], written: dict[str, str], where: str
) -> bool:
    """What a guide's key implies beyond its own field: SuperGradients' ``run_id`` resumes
    that run and ``metric_to_watch`` is maximised unless told otherwise; a block in the
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
    """The spellings files use for a value: torchtitan's (``config_torchtitan``);
    ``resume: true`` (SuperGradients) is latest, ``resume: false`` and ``resume_mode:
    None`` fresh; ``async_mode: off``, which YAML reads as false, is "off", and
    torchtitan's ``async_mode`` values are ours; SuperGradients' ``strict_load``
    (``no_key_matching``) and ``greater_metric_to_watch_is_better``; a list of epochs."""
    convert = titan.TORCHTITAN_VALUES.get(key)
    if convert is not None:
        return convert(value)
    field = KEY_ALIASES[key]
    if field == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if field == "resume" and value in ("None", "none"):
        return None  # Dream Trainer's `None`, which YAML reads as a string
    if field == "async_mode" and value is False:
        return "off"  # YAML 1.1 reads `async_mode: off` as false
    if field == "async_mode" and isinstance(value, str):
        return titan.TORCHTITAN_ASYNC.get(value.lower(), value)
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


__all__ = [
    "GUIDE_KEYS",
    "KEY_ALIASES",
    "OTHER_SPELLINGS",
    "UNSUPPORTED",
    "from_dict",
    "from_toml",
    "from_yaml",
    "unknown_key",
    "with_torchtitan_defaults",
]
