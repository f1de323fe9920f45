"""``CheckpointConfig``: a small frozen dataclass, validated on construction."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, fields
from typing import Any

from .errors import CheckpointError, ConfigError
from .location import URL, Location, as_location, is_url
from .metrics import REDUCTIONS
from .retention import RetentionPolicy

ASYNC_MODES = ("off", "thread", "process")
STAGING = ("sync", "overlap")
WHEN_BUSY = ("wait", "skip")
MODES = ("min", "max")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_UNSET: Any = object()  # resume_mode not given


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how checkpoints are written. Every field is checked in ``__post_init__``."""

    root_dir: str = "./experiments"
    """Base directory, or a URL (``s3://bucket/prefix``, ``gs://...``, any fsspec
    protocol); the experiment lives in ``<root_dir>/<experiment_name>/``."""

    local_dir: str | None = None
    """A local tier: checkpoints commit to ``<local_dir>/<experiment_name>/`` first (fast;
    a job on the same node resumes from there) and rank 0 uploads each to ``root_dir`` in
    the background (``docs/remote.md``). Every rank must see ``local_dir`` (one node)."""

    local_keep_last_n: int = 2
    """With ``local_dir``: the newest n checkpoints stay on local disk (never one whose
    upload has not finished); ``root_dir`` keeps what the retention fields say."""

    storage_options: Mapping[str, Any] | None = None
    """For URL locations: the fsspec file system's options (``{"endpoint_url": ...}``,
    credentials; fsspec's ``storage_options``). None: its defaults (for S3 the ``AWS_*``
    environment). Never written to ``config.yaml``."""

    experiment_name: str = ""
    """Experiment directory name. Empty: ``{model_name}_{dataset_name}_{YYYYmmdd_HHMMSS}``,
    chosen once by rank 0."""

    model_name: str = "model"
    """Used only to build the default experiment name."""

    dataset_name: str = "data"
    """Used only to build the default experiment name."""

    monitor: str | None = None
    """Metric that ranks checkpoints (``load(which="best")``); None: no best."""

    mode: str = "min"
    """``"min"`` or ``"max"``: which direction of ``monitor`` is better."""

    metrics_reduce: str = "mean"
    """Metrics that differ between ranks (a per-rank ``loss.item()``) become the marker's
    (and ``monitor``'s) value by: ``"mean"`` (of the ranks that passed it), ``"max"``,
    ``"min"``, ``"rank0"`` (rank 0's alone), or ``"same"`` (they must be alike: an error
    names the metric and each rank's value otherwise). Costs nothing more in ``save``."""

    async_mode: str = "process"
    """How shards are written: ``"off"`` (in-line; ``save`` returns once committed),
    ``"thread"`` (a background thread per rank writes a staged copy) or ``"process"`` (a
    persistent writer process per rank reads the staged copy from shared memory, so the
    write never holds the training's GIL). Scripts using ``"process"`` must guard their
    entry point with ``if __name__ == "__main__":`` (the writer is spawned)."""

    staging: str = "sync"
    """``"sync"``: ``save`` returns once the state is copied into the staging buffers.
    ``"overlap"``: ``save`` returns before the copy of parameters and optimizer state is
    done; the copy overlaps the next forward/backward and a step pre-hook on the
    optimizers of ``app_state`` waits for it. Parameters and optimizer state must then
    change only through those optimizers until their next step."""

    when_busy: str = "wait"
    """A ``save`` while the previous one is still writing: ``"wait"`` for it, or ``"skip"``
    this save (logged and counted in ``stats()``). Decided alike on every rank."""

    timeout_s: float = 600.0
    """Upper bound on every wait on another rank (barriers, gathers, the commit)."""

    lease_timeout_s: float = 30.0
    """The experiment's lease (``OWNER``) is renewed every quarter of this; a holder on
    another host whose heartbeat stopped this long is taken over (on the same host, a
    holder whose process is gone is taken over at once)."""

    capture_rng: bool = True
    """Save the torch (CPU and CUDA), numpy and python RNG states of every rank, and
    restore the calling rank's on load."""

    fsync: bool = True
    """fsync shards, the marker and the directories. Only tests of throughput turn it off;
    without it a crash may lose a checkpoint that was reported committed."""

    write_threads: int = 1
    """Threads per rank writing shard files (DCP ``FileSystemWriter.thread_count``)."""

    digests: bool = True
    """Hash every file while writing it (CRC-32, kept in the marker) so that ``verify``
    finds a flipped byte. Costs ~0.15 s of CPU per 512 MiB per rank on the write path
    (not on the blocking part); off: ``verify`` checks sizes only."""

    log_saves: bool = True
    """Rank 0 logs one line per committed save (size, blocked = waited + staged, time to
    commit, rate) to the ``dcp_engine.savelog`` logger, printed on stderr when the
    program configured no logging (``savelog.py``). False: no line."""

    # ---------------------------------------------------------------- training loop

    enabled: bool = True
    """False: the callbacks neither save nor resume (the ``enabled: false`` of the guides)."""

    resume: str | None = None
    """What a run starts from (``CheckpointManager.resume``, ``on_train_start``): None or
    ``""``: fresh; ``"latest"`` / ``"best"``: continue the experiment in place (without an
    ``experiment_name``: the newest ``{model_name}_{dataset_name}_*`` run under
    ``root_dir``); a checkpoint path: branch, i.e. a new experiment directory starts from
    that checkpoint and saves there, the source untouched."""

    save_every_n_steps: int | None = None
    """Save when ``on_step_end(step)`` sees ``step % n == 0`` (None or 0: off)."""

    save_every_n_epochs: int | None = None
    """Save when ``on_epoch_end(epoch)`` ends the n-th, 2n-th, ... epoch (None or 0: off)."""

    save_every_n_seconds: float | None = None
    """Save at the first step end at least this long after the previous save (rank 0's
    clock decides for all ranks). None or 0: off."""

    save_on_train_end: bool = True
    """``on_train_end`` saves the final state (unless that step is already saved)."""

    save_on_exception: bool = False
    """``on_exception`` saves the state as it is (off: it may be broken). Collective: only
    for failures that reach every rank alike."""

    save_on_sigterm: bool = False
    """Preemption: after a SIGTERM (on any rank), the callbacks' next step end saves,
    waits for the commit and ends the process with the signal; a second SIGTERM ends it
    at once. Costs one tiny collective per step."""

    save_best_only: bool = False
    """The step and epoch triggers save only on a new best of ``monitor``."""

    save_best: bool = True
    """Keep the ``checkpoints/best`` alias on the best checkpoint by ``monitor``."""

    save_last: bool = True
    """Keep the ``checkpoints/latest`` alias on the newest checkpoint."""

    # ---------------------------------------------------------------- retention

    keep_top_k: int | None = None
    """Keep the k best by ``monitor`` (``-1``: all, ``0``: none by metric)."""

    keep_last_n: int | None = None
    """Keep the n newest."""

    keep_every_n_steps: int | None = None
    """Keep, for good, every checkpoint whose step is a multiple of n."""

    keep_every_n_epochs: int | None = None
    """Keep, for good, the newest checkpoint of every epoch that is a multiple of n."""

    # ---------------------------------------------------------------- partial loads, export
    # (torchtitan's load_step, exclude_from_loading, initial_load_model_only,
    # last_save_model_only, export_dtype)

    resume_step: int | None = None
    """Resume from this step of the experiment instead of its newest (with ``resume``
    ``"latest"``, or a branch once it has checkpoints of its own; a fresh branch has none:
    ``CheckpointNotFoundError``, as for any step the experiment lacks). Saves still go only
    above the experiment's newest step (``TimelineError``): to go on from an older step,
    branch from it."""

    exclude_from_loading: tuple[str, ...] = ()
    """Keys of ``app_state`` that a resume leaves as they are (the checkpoint need not hold
    them), e.g. ``("optimizer", "lr_scheduler")`` to restart those from scratch."""

    initial_load_only: tuple[str, ...] | None = None
    """A branch (``resume=<path>``) before its first checkpoint loads only these keys of
    ``app_state`` from its source, e.g. ``("model",)``: a new training from those weights
    (the callbacks count steps from 0; once the branch has checkpoints of its own, a
    restart resumes from them whole). None: the whole state, from the source's position."""

    last_save_only: tuple[str, ...] | None = None
    """The callbacks' final save (``on_train_end``) writes only these keys of
    ``app_state``, e.g. ``("model",)``: weights for ``load_weights`` and ``dcp-engine
    export``, not a state to resume training from. None: the whole state. A final step
    that a periodic trigger saved already stays as it is (never overwritten)."""

    export_dtype: str | None = None
    """With ``last_save_only``: the floating-point tensors of that final save are written
    in this dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); None: as they are."""

    # ---------------------------------------------------------------- SuperGradients

    save_at_epochs: tuple[int, ...] = ()
    """Save at the end of these epochs, counted from 1 (``10``: after ten epochs), and keep
    those checkpoints for good (``save_ckpt_epoch_list``)."""

    average_best_models: bool = False
    """``on_train_end`` writes ``<experiment>/average_model.pth``: ``{key: mean state
    dict}`` of every module over the (up to) 10 best checkpoints by ``monitor``."""

    init_weights: str | None = None
    """A file or checkpoint (path or URL) that ``on_train_start`` loads through
    ``load_weights`` when the run starts fresh (SuperGradients' ``checkpoint_path``)."""

    init_weights_strict: bool | str = True
    """``load_weights``' ``strict`` for ``init_weights``: True, False or ``"shape"``
    (SuperGradients' ``strict_load``: ``no_key_matching``)."""

    init_weights_backbone_only: bool = False
    """Load only the backbone of ``init_weights`` (SuperGradients' ``load_backbone``)."""

    init_weights_into: str | None = None
    """The ``app_state`` entry ``init_weights`` loads into; None: its only module."""

    resume_mode: InitVar[Any] = _UNSET
    """Dream Trainer's name for ``resume``; not kept as a field."""

    def __post_init__(self, resume_mode: Any) -> None:
        if resume_mode is not _UNSET:  # both given: they must agree
            if self.resume not in (None, "", resume_mode):
                raise ConfigError(
                    "resume_mode", resume_mode, f"resume={self.resume!r} or no resume"
                )
            object.__setattr__(self, "resume", resume_mode)
        if isinstance(self.root_dir, os.PathLike):
            object.__setattr__(self, "root_dir", os.fspath(self.root_dir))
        if not isinstance(self.root_dir, str) or not self.root_dir:
            raise ConfigError("root_dir", self.root_dir, "a non-empty path")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options", self.storage_options, "None or a dict")
        _check_location("root_dir", self.root_dir, writable=True)
        if self.local_dir is not None:
            if isinstance(self.local_dir, os.PathLike):
                object.__setattr__(self, "local_dir", os.fspath(self.local_dir))
            if not isinstance(self.local_dir, str) or not self.local_dir or is_url(self.local_dir):
                raise ConfigError("local_dir", self.local_dir, "None or a local directory")
            if os.path.abspath(self.local_dir) == os.path.abspath(self.root_dir):
                raise ConfigError("local_dir", self.local_dir, "a directory other than root_dir")
        _check_count("local_keep_last_n", self.local_keep_last_n, low=1)
        tiered_resume = self.local_dir is not None and self.resume in ("latest", "best")
        if tiered_resume and not self.experiment_name:
            why = "each tier would look up its own newest run"
            raise ConfigError(
                "experiment_name", "", f"a name with local_dir and resume={self.resume!r} ({why})"
            )
        _check_name("experiment_name", self.experiment_name, allow_empty=True)
        _check_name("model_name", self.model_name, allow_empty=False)
        _check_name("dataset_name", self.dataset_name, allow_empty=False)
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ConfigError("monitor", self.monitor, "a metric name or None")
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {MODES}")
        for name, allowed in (
            ("async_mode", ASYNC_MODES),
            ("staging", STAGING),
            ("when_busy", WHEN_BUSY),
            ("metrics_reduce", REDUCTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"one of {allowed}")
        if self.staging == "overlap" and self.async_mode == "off":
            raise ConfigError("staging", self.staging, "'sync' when async_mode='off'")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise ConfigError("timeout_s", self.timeout_s, "a finite number of seconds > 0")
        lease = self.lease_timeout_s
        if (
            isinstance(lease, bool)
            or not isinstance(lease, (int, float))
            or not math.isfinite(lease)
            or lease <= 0
        ):
            raise ConfigError("lease_timeout_s", lease, "a finite number of seconds > 0")
        for name in ("capture_rng", "fsync", "digests", "log_saves"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        if (
            isinstance(self.write_threads, bool)
            or not isinstance(self.write_threads, int)
            or self.write_threads < 1
        ):
            raise ConfigError("write_threads", self.write_threads, "an int >= 1")
        for name in (
            "enabled",
            "save_on_train_end",
            "save_on_exception",
            "save_on_sigterm",
            "save_best_only",
            "save_best",
            "save_last",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        if isinstance(self.resume, os.PathLike):
            object.__setattr__(self, "resume", os.fspath(self.resume))
        if self.resume == "":
            object.__setattr__(self, "resume", None)
        if self.resume is not None and not isinstance(self.resume, str):
            raise ConfigError("resume", self.resume, "None, 'latest', 'best' or a path")
        if self.resume is not None:
            _check_location("resume", self.resume, writable=False)
        _check_count("save_every_n_steps", self.save_every_n_steps, low=0)
        _check_count("save_every_n_epochs", self.save_every_n_epochs, low=0)
        seconds = self.save_every_n_seconds
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ConfigError("save_every_n_seconds", seconds, "None or a number of seconds >= 0")
        _check_count("keep_top_k", self.keep_top_k, low=-1)
        _check_count("keep_last_n", self.keep_last_n, low=0)
        _check_count("keep_every_n_steps", self.keep_every_n_steps, low=1)
        _check_count("keep_every_n_epochs", self.keep_every_n_epochs, low=1)
        # Rules that need a metric to rank by.
        if self.monitor is None:
            needs = "a monitor to rank by (set monitor)"
            if self.keep_top_k not in (None, -1, 0):
                raise ConfigError("keep_top_k", self.keep_top_k, needs)
            if self.save_best_only:
                raise ConfigError("save_best_only", True, needs)
            if self.resume == "best":
                raise ConfigError(
                    "resume_mode" if resume_mode is not _UNSET else "resume", "best", needs
                )
            if self.average_best_models:
                raise ConfigError("average_best_models", True, needs)
        self._check_guide_fields()
        self._check_partial_loads()

    def _check_partial_loads(self) -> None:
        _check_count("resume_step", self.resume_step, low=0)
        if self.resume_step is not None and self.resume in (None, "best"):
            raise ConfigError("resume_step", self.resume_step, "resume='latest' or a path")
        for name in ("exclude_from_loading", "initial_load_only", "last_save_only"):
            keys = getattr(self, name)
            if isinstance(keys, list):
                object.__setattr__(self, name, keys := tuple(keys))
            if not (keys is None and name != "exclude_from_loading") and (
                not isinstance(keys, tuple)
                or not all(isinstance(k, str) and k for k in keys)
                or (keys == () and name != "exclude_from_loading")
            ):
                raise ConfigError(name, keys, "a list of app_state keys")
        if self.export_dtype is not None and self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError("export_dtype", self.export_dtype, f"one of {EXPORT_DTYPES}")
        if self.export_dtype is not None and self.last_save_only is None:
            why = "a model-only final save beside it (last_save_only, e.g. ['model'])"
            raise ConfigError("export_dtype", self.export_dtype, why)

    def check_state_keys(self, app_state: Mapping[str, Any]) -> None:
        """``ValueError`` naming a key of ``exclude_from_loading``, ``initial_load_only``
        or ``last_save_only`` that ``app_state`` lacks (checked when training starts, not
        at the final save)."""
        for name in ("exclude_from_loading", "initial_load_only", "last_save_only"):
            missing = [k for k in getattr(self, name) or () if k not in app_state]
            if missing:
                raise ValueError(
                    f"CheckpointConfig.{name} names {missing}, which app_state does not "
                    f"have (its keys: {sorted(app_state)})"
                )

    @property
    def retention(self) -> RetentionPolicy:
        """The retention policies of this config, composed."""
        return RetentionPolicy(
            keep_top_k=self.keep_top_k,
            monitor=self.monitor,
            mode=self.mode,
            keep_last_n=self.keep_last_n,
            keep_every_n_steps=self.keep_every_n_steps,
            keep_every_n_epochs=self.keep_every_n_epochs,
            keep_epochs=frozenset(n - 1 for n in self.save_at_epochs),
        )

    def _check_guide_fields(self) -> None:
        """The SuperGradients fields: ``save_at_epochs``, ``average_best_models`` and the
        initial weights."""
        epochs = self.save_at_epochs
        if isinstance(epochs, list):
            object.__setattr__(self, "save_at_epochs", epochs := tuple(epochs))
        if not isinstance(epochs, tuple) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in epochs
        ):
            raise ConfigError("save_at_epochs", epochs, "a list of epoch numbers >= 1")
        if isinstance(self.init_weights, os.PathLike):
            object.__setattr__(self, "init_weights", os.fspath(self.init_weights))
        if self.init_weights is not None:
            if not isinstance(self.init_weights, str) or not self.init_weights:
                raise ConfigError("init_weights", self.init_weights, "None or a path or URL")
            _check_location("init_weights", self.init_weights, writable=False)
        if not isinstance(self.init_weights_strict, bool) and self.init_weights_strict != "shape":
            raise ConfigError("init_weights_strict", self.init_weights_strict,
                              "True, False or 'shape'")  # fmt: skip
        for name in ("average_best_models", "init_weights_backbone_only"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        into = self.init_weights_into
        if into is not None and (not isinstance(into, str) or not into):
            raise ConfigError("init_weights_into", into, "None or an app_state key")

    # ---------------------------------------------------------------- from files

    @classmethod
    def from_dict(
        cls,
        block: Mapping[str, Any],
        *,
        where: str = "checkpoint",
        base_folder: str | None = None,
    ) -> CheckpointConfig:
        """A config from a ``checkpoint:`` block: field names, the reference guides'
        spellings (``dir``, ``save_frequency``, ``resume: true``...) or torchtitan's keys
        (``docs/torchtitan.md``; its ``folder`` is relative to ``root_dir``, else to
        ``base_folder``). ``UnknownKeyError`` names an unknown key (and ours, when it is
        another framework's spelling or a near-miss typo); ``UnsupportedKeyError`` says
        why a torchtitan key is not supported; ``ConfigError`` names a bad value's key."""
        from .config_keys import from_dict

        return from_dict(cls, block, where=where, base_folder=base_folder)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> CheckpointConfig:
        """A config from a YAML file: its top-level ``checkpoint:`` block if it has one
        (the rest of a training config is ignored), else the whole file as the block."""
        from .config_keys import from_yaml

        return from_yaml(cls, path)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> CheckpointConfig:
        """A config from a torchtitan job file (TOML): its ``[checkpoint]`` table with
        torchtitan's defaults for the keys it leaves out (``config_keys.TORCHTITAN_DEFAULTS``),
        ``folder`` relative to ``[job] dump_folder`` (default ``./torchtitan/outputs``)."""
        from .config_keys import from_toml

        return from_toml(cls, path)

    @property
    def root_path(self) -> Location:
        """``root_dir`` as a location (a ``Path``, or a ``URL`` with ``storage_options``)."""
        return self.location(self.root_dir)

    def location(self, value: str | os.PathLike[str]) -> Location:
        """A path or URL given with this config (``root_dir``, ``resume``), as a location;
        a URL gets ``storage_options``."""
        return as_location(value, self.storage_options if is_url(value) else None)

    def to_dict(self) -> dict[str, Any]:
        """The fields, without ``storage_options`` (it may hold credentials)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
            if f.name != "storage_options"
        }


CheckpointParameters = CheckpointConfig  # Dream Trainer's name for it (its guide's calls run)


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
