"""``CheckpointConfig``: a small frozen dataclass, validated on construction."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, UnknownKeyError
from .location import URL, Location, as_location, is_url
from .metrics import REDUCTIONS
from .retention import RetentionPolicy

ASYNC_MODES = ("off", "thread", "process")
STAGING = ("sync", "overlap")
WHEN_BUSY = ("wait", "skip")
MODES = ("min", "max")


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

    def __post_init__(self) -> None:
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
                raise ConfigError("resume", "best", needs)

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
        )

    # ---------------------------------------------------------------- from files

    @classmethod
    def from_dict(cls, block: Mapping[str, Any], *, where: str = "checkpoint") -> CheckpointConfig:
        """A config from a ``checkpoint:`` block in the style of the reference guides
        (``dir``/``save_dir``/``ckpt_root_dir``, ``save_frequency``/``save_freq``,
        ``save_latest``, ``resume: true``, ...) or from field names. An unknown key raises
        ``UnknownKeyError`` naming it and the nearest known key; a bad value raises
        ``ConfigError`` naming the key as written."""
        if not isinstance(block, Mapping):
            raise ConfigError("checkpoint", block, "a mapping of keys to values", where=where)
        kwargs: dict[str, Any] = {}
        written: dict[str, str] = {}  # field -> key as written
        for key, value in block.items():
            if not isinstance(key, str):
                raise UnknownKeyError(repr(key), where, None)
            field = KEY_ALIASES.get(key)
            if field is None:
                near = difflib.get_close_matches(key, sorted(KEY_ALIASES), n=1, cutoff=0.6)
                raise UnknownKeyError(key, where, near[0] if near else None)
            if field in written:
                raise ConfigError(
                    field, value, f"one of {written[field]!r} and {key!r}, not both",
                    where=f"{where}.{key}",
                )  # fmt: skip
            written[field] = key
            kwargs[field] = _from_file_value(field, value)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            as_written = written.get(e.field)
            if as_written is None:
                raise
            expected = str(e).split("expected ", 1)[-1]
            raise ConfigError(
                e.field, kwargs[e.field], expected, where=f"{where}.{as_written}"
            ) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> CheckpointConfig:
        """A config from a YAML file: its top-level ``checkpoint:`` block if it has one
        (the rest of a training config is ignored), else the whole file as the block."""
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
            return cls.from_dict(data["checkpoint"] or {}, where=f"{path}: checkpoint")
        return cls.from_dict(data, where=str(path))

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
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "storage_options"}


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


def _from_file_value(field: str, value: Any) -> Any:
    """The spellings files use for a value: ``resume: true`` (SuperGradients) is latest,
    ``resume: false`` fresh; ``async_mode: off``, which YAML reads as false, is "off"."""
    if field == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if field == "async_mode" and value is False:
        return "off"  # YAML 1.1 reads `async_mode: off` as false
    return value


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


def _check_name(field: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(field, value, "a non-empty string" if not allow_empty else "a string")
    if value in (".", "..") or "/" in value or os.sep in value or "\0" in value:
        raise ConfigError(field, value, "a single directory name (no '/', not '.' or '..')")
