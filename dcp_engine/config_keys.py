"""Reading a ``checkpoint:`` block from a file into a ``CheckpointConfig``.

Every key a block may hold maps to the field it sets (``KEY_ALIASES``): the field names,
the spellings of the reference guides, and torchtitan's ``[checkpoint]`` keys with their
torchtitan meanings (``TORCHTITAN_VALUES`` turns their values into ours, ``_folder``
and ``_implied`` add what a key means beyond its own field). A key of another framework
that the engine knows but does not support raises ``UnsupportedKeyError`` saying why and
what to use; any other key raises ``UnknownKeyError`` with a suggestion only when one is
certain (another framework's spelling of one of ours, or a near-miss typo), never a guess.
"""

from __future__ import annotations

import importlib
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import CheckpointConfig
from .errors import ConfigError, UnknownKeyError, UnsupportedKeyError
from .location import is_url

# Every key a ``checkpoint:`` block may hold -> the field it sets. Field names, plus the
# spellings of the reference guides (experiment config, SuperGradients, Dream Trainer).
KEY_ALIASES: dict[str, str] = {
    **{f.name: f.name for f in fields(CheckpointConfig)},
    "dir": "root_dir",
    "save_dir": "root_dir",
    "ckpt_root_dir": "root_dir",
    "save_frequency": "save_every_n_epochs",
    "save_freq": "save_every_n_epochs",
    "save_latest": "save_last",
    "resume_mode": "resume",
    "resume_path": "resume",
}

# ---------------------------------------------------------------- torchtitan
# torchtitan's [checkpoint] keys (0.1 to 0.3 spellings) -> the field each sets first.


def _model_only(value: Any) -> Any:
    """``*_model_only: true`` -> the ``model`` key alone (torchtitan's model state key)."""
    if isinstance(value, bool):
        return ("model",) if value else None
    return value  # the field's check names the key


def _key_list(value: Any) -> Any:
    """A list of keys, or torchtitan's command-line form ``"optimizer,lr_scheduler"``."""
    if isinstance(value, str):
        return tuple(k.strip() for k in value.split(",") if k.strip())
    return value


TORCHTITAN_ASYNC = {"disabled": "off", "async": "thread", "async_with_pinned_mem": "process"}

TORCHTITAN_KEYS: dict[str, str] = {
    "enable": "enabled",
    "enable_checkpoint": "enabled",
    "folder": "experiment_name",  # and root_dir: see _folder
    "interval": "save_every_n_steps",
    "keep_latest_k": "keep_last_n",
    "load_step": "resume_step",
    "initial_load_path": "resume",  # a branch, used only while the experiment is empty
    "initial_load_model_only": "initial_load_only",
    "initial_load_model_weights_only": "initial_load_only",
    "last_save_model_only": "last_save_only",
    "last_save_model_weights_only": "last_save_only",
    "model_weights_only": "last_save_only",
}
KEY_ALIASES.update(TORCHTITAN_KEYS)

TORCHTITAN_VALUES: dict[str, Callable[[Any], Any]] = {
    "keep_latest_k": lambda v: None if v == 0 and not isinstance(v, bool) else v,  # 0: all
    "load_step": lambda v: None if v == -1 and not isinstance(v, bool) else v,  # -1: newest
    "initial_load_path": lambda v: v.strip() or None if isinstance(v, str) else v,
    "initial_load_model_only": _model_only,
    "initial_load_model_weights_only": _model_only,
    "last_save_model_only": _model_only,
    "last_save_model_weights_only": _model_only,
    "model_weights_only": _model_only,
    "exclude_from_loading": _key_list,
}

TORCHTITAN_DEFAULTS: dict[str, Any] = {
    "enable": False,
    "folder": "checkpoint",
    "interval": 500,
    "keep_latest_k": 10,
    "last_save_model_only": True,
    "async_mode": "disabled",
}
"""torchtitan's defaults (0.3) for the keys it has an equivalent of; ``from_toml`` reads a
torchtitan job file with them."""

TORCHTITAN_DUMP_FOLDER = "./torchtitan/outputs"
"""torchtitan's default ``job.dump_folder``."""

_HF = (
    "the engine writes and reads DCP checkpoints; export the final one with "
    "`dcp-engine export --format safetensors`, and load Hugging Face weights into the "
    "model yourself before the first save"
)
_ADAPTER = "dcp_engine.integrations.torchtitan.CheckpointManager honors it"

UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "initial_load_in_hf": ((False,), f"torchtitan's Hugging Face load; {_HF}"),
    "initial_load_in_hf_quantized": ((False,), f"torchtitan's Hugging Face load; {_HF}"),
    "last_save_in_hf": ((False,), f"torchtitan's Hugging Face final save; {_HF}"),
    "create_seed_checkpoint": (
        (False,),
        "torchtitan's seed-checkpoint run is its trainer's; save the initialised model "
        "once yourself: CheckpointManager.save(0, {'model': model})",
    ),
    "enable_first_step_checkpoint": (
        (False,),
        f"torchtitan's save after step 1 has no callback trigger here ({_ADAPTER}); call "
        "manager.save(1, app_state) after the first step",
    ),
    "load_only": (
        (False,),
        f"torchtitan's load-without-saving mode ({_ADAPTER}); here: save_every_n_steps: 0 "
        "and save_on_train_end: false, or read with open_checkpoint",
    ),
    "enable_ft_dataloader_checkpoints": (
        (),
        "torchtitan's torchft fault tolerance is not supported; the dataloader is saved "
        "with the rest of app_state (a StatefulDataLoader value)",
    ),
}
"""torchtitan keys the engine does not support -> (values that ask for nothing, why)."""

# ---------------------------------------------------------------- other frameworks
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
    kwargs: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> key as written
    for key, value in block.items():
        if not isinstance(key, str):
            raise UnknownKeyError(repr(key), where, None)
        field = KEY_ALIASES.get(key)
        if field is None and _asks_for_nothing(key, value):
            continue  # e.g. torchtitan's `last_save_in_hf = false`
        if field is None:
            raise unknown_key(key, value, where)
        if field in written:
            raise ConfigError(
                field, value, f"one of {written[field]!r} and {key!r}, not both",
                where=f"{where}.{key}",
            )  # fmt: skip
        written[field] = key
        convert = TORCHTITAN_VALUES.get(key)
        kwargs[field] = convert(value) if convert else _from_file_value(field, value)
    if written.get("experiment_name") == "folder":
        _folder(kwargs, written, where, base_folder)
    _implied(kwargs, written, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        as_written = written.get(e.field)
        if as_written is None:
            raise
        expected = str(e).split("expected ", 1)[-1]
        raise ConfigError(e.field, block.get(as_written, kwargs[e.field]), expected,
                          where=f"{where}.{as_written}") from None  # fmt: skip


def from_yaml(cls: type[CheckpointConfig], path: str | os.PathLike[str]) -> CheckpointConfig:
    """See ``CheckpointConfig.from_yaml``."""
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
        return from_dict(cls, data["checkpoint"] or {}, where=f"{path}: checkpoint")
    return from_dict(cls, data, where=str(path))


def from_toml(cls: type[CheckpointConfig], path: str | os.PathLike[str]) -> CheckpointConfig:
    """See ``CheckpointConfig.from_toml``."""
    tomllib = _toml()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("checkpoint", str(path), f"valid TOML ({e})", where=str(path)) from e
    job = data.get("job", {})
    table = data.get("checkpoint", {} if "job" in data else data)
    if not isinstance(table, Mapping) or not isinstance(job, Mapping):
        raise ConfigError("checkpoint", table, "a table", where=f"{path}: checkpoint")
    return from_dict(
        cls,
        with_torchtitan_defaults(table),
        where=f"{path}: checkpoint",
        base_folder=str(job.get("dump_folder", TORCHTITAN_DUMP_FOLDER)),
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
    for key, value in TORCHTITAN_DEFAULTS.items():
        if KEY_ALIASES[key] not in setting:
            out[key] = value
    ours = [k for k in block if KEY_ALIASES.get(k) == "last_save_only" and k not in TORCHTITAN_KEYS]
    if "export_dtype" not in setting and not ours:
        out["export_dtype"] = "float32"  # _implied drops it without a model-only final save
    return out


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


def _from_file_value(field: str, value: Any) -> Any:
    """The spellings files use for a value: ``resume: true`` (SuperGradients) is latest,
    ``resume: false`` fresh; ``async_mode: off``, which YAML reads as false, is "off";
    torchtitan's ``async_mode`` values are ours (``disabled``: off, ``async``: a thread,
    ``async_with_pinned_mem``: a writer process)."""
    if field == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if field == "async_mode" and value is False:
        return "off"  # YAML 1.1 reads `async_mode: off` as false
    if field == "async_mode" and isinstance(value, str):
        return TORCHTITAN_ASYNC.get(value.lower(), value)
    return value


def _folder(
    kwargs: dict[str, Any], written: dict[str, str], where: str, base_folder: str | None
) -> None:
    """torchtitan's ``folder`` is the experiment directory, relative to the job's dump
    folder (``root_dir``, else ``base_folder``) unless absolute or a URL: its parent
    becomes ``root_dir`` and its last part ``experiment_name``."""
    folder = kwargs["experiment_name"]
    if not isinstance(folder, str) or folder.strip().rstrip("/") in ("", "."):
        raise ConfigError("experiment_name", folder, "a directory", where=f"{where}.folder")
    base = kwargs.get("root_dir", base_folder)
    if base is None:
        base = _default("root_dir")
    folder = folder.strip()
    if is_url(folder) or os.path.isabs(folder):
        full = folder
    elif is_url(str(base)):
        full = f"{str(base).rstrip('/')}/{folder}"
    else:
        full = posixpath.join(os.fspath(base), folder)
    if not is_url(full):
        full = posixpath.normpath(full)
    root, slash, name = full.rstrip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise ConfigError("experiment_name", folder, "a directory", where=f"{where}.folder")
    kwargs["root_dir"], kwargs["experiment_name"] = root or ("/" if slash else "."), name
    written.setdefault("root_dir", "folder")


def _implied(kwargs: dict[str, Any], written: dict[str, str], where: str) -> None:
    """What torchtitan's keys mean beyond their own field."""
    keys = set(written.values())
    # folder, load_step, initial_load_path: a job resumes from its folder's newest (unless
    # the block says resume itself).
    fresh = kwargs.get("resume") is None and written.get("resume") in (None, "initial_load_path")
    if fresh and keys & {"folder", "load_step", "initial_load_path"}:
        kwargs["resume"] = "latest"
    if written.get("resume") == "initial_load_path" and kwargs["resume"] != "latest":
        if not kwargs.get("experiment_name"):
            raise ConfigError(
                "resume",
                kwargs["resume"],
                "a folder (or experiment_name) beside it: the initial load is used only "
                "while that experiment has no checkpoint, and a new experiment every run "
                "would start from it again",
                where=f"{where}.initial_load_path",
            )
        if "initial_load_only" not in written:  # torchtitan's initial_load_model_only=True
            kwargs["initial_load_only"] = ("model",)
    elif written.get("initial_load_only") in TORCHTITAN_KEYS:
        kwargs.pop("initial_load_only")  # no initial_load_path: no effect, as in torchtitan
    # export_dtype applies only to a model-only final save; torchtitan ignores it otherwise.
    only = written.get("last_save_only")
    if only in TORCHTITAN_KEYS and kwargs.get("last_save_only") is None:
        kwargs.pop("export_dtype", None)


def _default(name: str) -> Any:
    for f in fields(CheckpointConfig):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(name)


__all__ = [
    "KEY_ALIASES",
    "OTHER_SPELLINGS",
    "TORCHTITAN_DEFAULTS",
    "TORCHTITAN_KEYS",
    "UNSUPPORTED",
    "from_dict",
    "from_toml",
    "from_yaml",
    "unknown_key",
    "with_torchtitan_defaults",
]
