"""``CheckpointConfig``: a small frozen dataclass, validated on construction."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, fields
from typing import Any

from .config_checks import check
from .errors import ConfigError
from .location import Location, as_location, is_url
from .retention import RetentionPolicy

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
    waits for the commit, closes and raises ``Preempted`` (a ``SystemExit`` with status
    128 + the signal), so the caller's ``finally`` blocks and ``atexit`` handlers run; a
    second SIGTERM ends the process at once. Costs one tiny collective per step."""

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
        check(self, resume_mode_given=resume_mode is not _UNSET)

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

    def final_state(self, app_state: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]:
        """What a final save writes and in which dtype: the ``last_save_only`` keys of
        ``app_state`` in ``export_dtype`` (a ``torch.dtype``, or None: as they are); without
        ``last_save_only``, all of it as it is. ``ValueError`` names a key it lacks."""
        if self.last_save_only is None:
            return app_state, None
        self.check_state_keys(app_state)
        import torch  # here: the config itself is read where torch is not imported

        dtype = None if self.export_dtype is None else getattr(torch, self.export_dtype)
        return {k: app_state[k] for k in self.last_save_only}, dtype

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
