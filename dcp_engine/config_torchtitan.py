"""torchtitan's ``[checkpoint]`` keys (its 0.1 to 0.3 spellings) with their torchtitan
meanings: the field each key sets (``TORCHTITAN_KEYS``), how its value reads
(``TORCHTITAN_VALUES``), what it means beyond its field (``folder``, ``implied``), its
defaults for a job file (``TORCHTITAN_DEFAULTS``) and the keys the engine knows but does
not support (``UNSUPPORTED``: why, and what to use). ``config_keys`` reads blocks with them.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from .config import CheckpointConfig
from .errors import ConfigError
from .location import is_url


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


def apply_folder(
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


def implied(kwargs: dict[str, Any], written: dict[str, str], where: str) -> None:
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
    "TORCHTITAN_ASYNC",
    "TORCHTITAN_DEFAULTS",
    "TORCHTITAN_DUMP_FOLDER",
    "TORCHTITAN_KEYS",
    "TORCHTITAN_VALUES",
    "UNSUPPORTED",
    "apply_folder",
    "implied",
]
