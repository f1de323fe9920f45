"""The checks of ``CheckpointConfig``'s fields, run by its ``__post_init__``: each bad
value raises ``ConfigError`` naming the field, the value and what is expected; path-like
values are normalised to ``str`` and lists to tuples (the config is frozen: through
``object.__setattr__``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError
from .location import URL, as_location, is_url
from .metrics import REDUCTIONS

if TYPE_CHECKING:
    from .config import CheckpointConfig

ASYNC_MODES = ("off", "thread", "process")
STAGING = ("sync", "overlap")
WHEN_BUSY = ("wait", "skip")
MODES = ("min", "max")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def check(cfg: CheckpointConfig, *, resume_mode_given: bool) -> None:
    """Every field of ``cfg``; ``resume_mode_given``: ``resume`` came as ``resume_mode``
    (errors name it so)."""
    if isinstance(cfg.root_dir, os.PathLike):
        object.__setattr__(cfg, "root_dir", os.fspath(cfg.root_dir))
    if not isinstance(cfg.root_dir, str) or not cfg.root_dir:
        raise ConfigError("root_dir", cfg.root_dir, "a non-empty path")
    if cfg.storage_options is not None and not isinstance(cfg.storage_options, Mapping):
        raise ConfigError("storage_options", cfg.storage_options, "None or a dict")
    _check_location("root_dir", cfg.root_dir, writable=True)
    if cfg.local_dir is not None:
        if isinstance(cfg.local_dir, os.PathLike):
            object.__setattr__(cfg, "local_dir", os.fspath(cfg.local_dir))
        if not isinstance(cfg.local_dir, str) or not cfg.local_dir or is_url(cfg.local_dir):
            raise ConfigError("local_dir", cfg.local_dir, "None or a local directory")
        if os.path.abspath(cfg.local_dir) == os.path.abspath(cfg.root_dir):
            raise ConfigError("local_dir", cfg.local_dir, "a directory other than root_dir")
    _check_count("local_keep_last_n", cfg.local_keep_last_n, low=1)
    tiered_resume = cfg.local_dir is not None and cfg.resume in ("latest", "best")
    if tiered_resume and not cfg.experiment_name:
        why = "each tier would look up its own newest run"
        raise ConfigError(
            "experiment_name", "", f"a name with local_dir and resume={cfg.resume!r} ({why})"
        )
    _check_name("experiment_name", cfg.experiment_name, allow_empty=True)
    _check_name("model_name", cfg.model_name, allow_empty=False)
    _check_name("dataset_name", cfg.dataset_name, allow_empty=False)
    if cfg.monitor is not None and (not isinstance(cfg.monitor, str) or not cfg.monitor):
        raise ConfigError("monitor", cfg.monitor, "a metric name or None")
    if cfg.mode not in MODES:
        raise ConfigError("mode", cfg.mode, f"one of {MODES}")
    for name, allowed in (
        ("async_mode", ASYNC_MODES),
        ("staging", STAGING),
        ("when_busy", WHEN_BUSY),
        ("metrics_reduce", REDUCTIONS),
    ):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(name, getattr(cfg, name), f"one of {allowed}")
    if cfg.staging == "overlap" and cfg.async_mode == "off":
        raise ConfigError("staging", cfg.staging, "'sync' when async_mode='off'")
    if (
        isinstance(cfg.timeout_s, bool)
        or not isinstance(cfg.timeout_s, (int, float))
        or not math.isfinite(cfg.timeout_s)
        or cfg.timeout_s <= 0
    ):
        raise ConfigError("timeout_s", cfg.timeout_s, "a finite number of seconds > 0")
    lease = cfg.lease_timeout_s
    if (
        isinstance(lease, bool)
        or not isinstance(lease, (int, float))
        or not math.isfinite(lease)
        or lease <= 0
    ):
        raise ConfigError("lease_timeout_s", lease, "a finite number of seconds > 0")
    for name in ("capture_rng", "fsync", "digests", "log_saves"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, getattr(cfg, name), "True or False")
    if (
        isinstance(cfg.write_threads, bool)
        or not isinstance(cfg.write_threads, int)
        or cfg.write_threads < 1
    ):
        raise ConfigError("write_threads", cfg.write_threads, "an int >= 1")
    for name in (
        "enabled",
        "save_on_train_end",
        "save_on_exception",
        "save_on_sigterm",
        "save_best_only",
        "save_best",
        "save_last",
    ):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, getattr(cfg, name), "True or False")
    if isinstance(cfg.resume, os.PathLike):
        object.__setattr__(cfg, "resume", os.fspath(cfg.resume))
    if cfg.resume == "":
        object.__setattr__(cfg, "resume", None)
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise ConfigError("resume", cfg.resume, "None, 'latest', 'best' or a path")
    if cfg.resume is not None:
        _check_location("resume", cfg.resume, writable=False)
    _check_count("save_every_n_steps", cfg.save_every_n_steps, low=0)
    _check_count("save_every_n_epochs", cfg.save_every_n_epochs, low=0)
    seconds = cfg.save_every_n_seconds
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise ConfigError("save_every_n_seconds", seconds, "None or a number of seconds >= 0")
    _check_count("keep_top_k", cfg.keep_top_k, low=-1)
    _check_count("keep_last_n", cfg.keep_last_n, low=0)
    _check_count("keep_every_n_steps", cfg.keep_every_n_steps, low=1)
    _check_count("keep_every_n_epochs", cfg.keep_every_n_epochs, low=1)
    # Rules that need a metric to rank by.
    if cfg.monitor is None:
        needs = "a monitor to rank by (set monitor)"
        if cfg.keep_top_k not in (None, -1, 0):
            raise ConfigError("keep_top_k", cfg.keep_top_k, needs)
        if cfg.save_best_only:
            raise ConfigError("save_best_only", True, needs)
        if cfg.resume == "best":
            raise ConfigError("resume_mode" if resume_mode_given else "resume", "best", needs)
        if cfg.average_best_models:
            raise ConfigError("average_best_models", True, needs)
    _check_guide_fields(cfg)
    _check_partial_loads(cfg)


def _check_partial_loads(cfg: CheckpointConfig) -> None:
    _check_count("resume_step", cfg.resume_step, low=0)
    if cfg.resume_step is not None and cfg.resume in (None, "best"):
        raise ConfigError("resume_step", cfg.resume_step, "resume='latest' or a path")
    for name in ("exclude_from_loading", "initial_load_only", "last_save_only"):
        keys = getattr(cfg, name)
        if isinstance(keys, list):
            object.__setattr__(cfg, name, keys := tuple(keys))
        if not (keys is None and name != "exclude_from_loading") and (
            not isinstance(keys, tuple)
            or not all(isinstance(k, str) and k for k in keys)
            or (keys == () and name != "exclude_from_loading")
        ):
            raise ConfigError(name, keys, "a list of app_state keys")
    if cfg.export_dtype is not None and cfg.export_dtype not in EXPORT_DTYPES:
        raise ConfigError("export_dtype", cfg.export_dtype, f"one of {EXPORT_DTYPES}")
    if cfg.export_dtype is not None and cfg.last_save_only is None:
        why = "a model-only final save beside it (last_save_only, e.g. ['model'])"
        raise ConfigError("export_dtype", cfg.export_dtype, why)


def _check_guide_fields(cfg: CheckpointConfig) -> None:
    """The SuperGradients fields: ``save_at_epochs``, ``average_best_models`` and the
    initial weights."""
    epochs = cfg.save_at_epochs
    if isinstance(epochs, list):
        object.__setattr__(cfg, "save_at_epochs", epochs := tuple(epochs))
    if not isinstance(epochs, tuple) or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in epochs
    ):
        raise ConfigError("save_at_epochs", epochs, "a list of epoch numbers >= 1")
    if isinstance(cfg.init_weights, os.PathLike):
        object.__setattr__(cfg, "init_weights", os.fspath(cfg.init_weights))
    if cfg.init_weights is not None:
        if not isinstance(cfg.init_weights, str) or not cfg.init_weights:
            raise ConfigError("init_weights", cfg.init_weights, "None or a path or URL")
        _check_location("init_weights", cfg.init_weights, writable=False)
    if not isinstance(cfg.init_weights_strict, bool) and cfg.init_weights_strict != "shape":
        raise ConfigError("init_weights_strict", cfg.init_weights_strict,
                          "True, False or 'shape'")  # fmt: skip
    for name in ("average_best_models", "init_weights_backbone_only"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, getattr(cfg, name), "True or False")
    into = cfg.init_weights_into
    if into is not None and (not isinstance(into, str) or not into):
        raise ConfigError("init_weights_into", into, "None or an app_state key")


def _check_location(field: str, value: str, *, writable: bool) -> None:
    """A URL's protocol must have an installed fsspec implementation (the message names
    the package); the engine writes only where commits and leases are safe
    (``WRITABLE_PROTOCOLS``: s3, gs, memory), other protocols are read. ``s3:/b`` (a
    slash missing) is refused, not taken for a local directory ``s3:``."""
    if value in ("latest", "best"):
        return
    try:
        location = as_location(value)
    except CheckpointError as e:
        raise ConfigError(field, value, f"a location fsspec can serve ({e})") from None
    if writable and isinstance(location, URL) and location.read_only:
        raise ConfigError(
            field,
            value,
            f"a writable location ({location.protocol}:// is read-only here: commits need "
            "whole-object uploads and conditional writes, known of s3://, gs:// and memory://)",
        )


def _check_count(field: str, value: object, *, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConfigError(field, value, f"None or an int >= {low}")


def _check_name(field: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(field, value, "a non-empty string" if not allow_empty else "a string")
    if value in (".", "..") or "/" in value or os.sep in value or "\0" in value:
        raise ConfigError(field, value, "a single directory name (no '/', not '.' or '..')")
