"""``CheckpointManager``: the facade over the layers (DESIGN.md, "Layers").

It checks its arguments and its own state (open, closed) and hands each call to the
layer that owns it: the experiment (name, lease, sweep), the catalog (entries, index,
aliases, retention), the save pipeline and the loader. Rank 0 alone decides and writes
the catalog, and tells the other ranks over the manager's side group, so that all ranks
raise the same error or go on together.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from . import state, tiers
from .comm import Comm
from .committer import PhaseHook, no_hook
from .config import CheckpointConfig
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .experiment import Experiment, Plan
from .index import CheckpointInfo, Which
from .loading import Loader
from .marker import clean_extra, clean_metrics
from .metrics import reduce_metrics
from .resolve import read_marker
from .saving import SaveHandle, SavePipeline, SaveStats
from .storage import Storage, storage_of

log = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointManager:
    """Saves ``app_state`` dicts as sharded DCP checkpoints and loads them back.

    ``process_group``: the ranks that checkpoint together (default: the default group if
    ``torch.distributed`` is initialised, else this process alone). The manager creates
    gloo side groups of its own over those ranks, so every rank constructs it (and its
    managers in the same order).

    The experiment directory follows ``config.resume`` (see ``CheckpointConfig.resume``);
    rank 0 takes its lease (``ExperimentLockedError`` while another job writes it) and
    writes ``run_config`` (default: this ``CheckpointConfig``) once as ``config.yaml``.
    ``storage`` (default: the one ``root_dir`` names) and ``hook`` (``hook(phase, step)`` between
    the commit's steps) are seams for tests that inject faults.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        process_group: dist.ProcessGroup | None = None,
        *,
        run_config: Mapping[str, Any] | None = None,
        storage: Storage | None = None,
        hook: PhaseHook = no_hook,
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        self.config = config
        self._closed = True  # until everything below exists
        # With a local tier, saves commit to local_dir and rank 0 uploads to root_dir.
        here = tiers.local_config(config) if config.local_dir is not None else config
        storage = storage_of(here.root_path, storage)
        if storage.per_process and config.async_mode == "process":
            raise CheckpointError(
                f"root_dir={config.root_dir!r}: a writer process cannot reach a file system "
                "that lives in this process; use async_mode='thread' or 'off'"
            )
        self._storage = storage
        self._comm = Comm.create(process_group, config.timeout_s)
        opened: list[Experiment] = []
        self._remote: tiers.RemoteTier | None = None

        def open_experiment() -> Plan:
            exp = Experiment.open(here, storage, run_config=run_config, hook=hook)
            opened.append(exp)
            if here is not config:
                try:
                    self._remote = tiers.RemoteTier.open(config, exp, hook, run_config)
                except BaseException:
                    exp.close(config.timeout_s)
                    raise
            return exp.plan

        plan = self._comm.decide(open_experiment, "opening the experiment")
        self._exp = opened[0] if opened else Experiment.follow(here, plan, storage)
        self.experiment_dir = self._exp.root
        """Where saves commit (with ``local_dir``: the local experiment)."""
        self.remote_dir = config.root_path / plan.name if here is not config else None
        """With ``local_dir``: the experiment in ``root_dir`` that rank 0 uploads to."""
        try:  # from here on a failure gives the lease back
            entries = self._comm.broadcast(self._exp.catalog.entries(), "reading the catalog")
            if self.rank != 0:
                self._exp.catalog.mirror(entries)
            self._saves = SavePipeline(here, self._comm, self._exp, storage, hook, process_group)
        except BaseException:
            self._close_experiments()
            raise
        remote = None if self._remote is None else self._remote.remote.catalog
        self._loader = Loader(config, self._comm, self._exp, self._prepare, remote=remote)
        self._closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ public

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest (lowest step) first. Rank 0 holds the truth (its
        collector deletes); the other ranks leave out what is no longer on disk."""
        if self._remote is not None:
            return self._remote.entries()
        entries = self._exp.catalog.entries()
        if self.rank == 0:
            return entries
        return [e for e in entries if self._storage.is_dir(e.path)]

    def stats(self) -> list[SaveStats]:
        """The figures of every save of this manager (committed or skipped), in order."""
        return self._saves.stats()

    def save(
        self,
        step: int,
        app_state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
        extra: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> SaveHandle:
        """Write ``app_state`` as checkpoint ``step`` on every rank and commit it.

        Collective: every rank calls it with the same step, which must be above every
        committed step of the experiment (``TimelineError`` otherwise: branch to go back).
        Returns a ``SaveHandle``: with ``async_mode="off"`` it is committed already;
        otherwise ``save`` returns once the state is staged (change it freely from then
        on) and the write and commit go on in the background (``handle.committed`` or
        ``wait()``). An error of the previous background save is raised here, on every
        rank. ``force=True``: never skipped (``when_busy="skip"`` waits instead).
        ``metrics``: this rank's; the marker records every rank's, reduced as
        ``config.metrics_reduce`` says (``handle.metrics``), within the ranks' one
        agreement. ``extra``: a small JSON-able dict kept in the marker
        (``CheckpointInfo.extra``), rank 0's; the callbacks keep the loop position there.
        ``dtype``: floating-point tensors are written in it (a weights export; loads into
        objects of another dtype are refused, ``load_weights`` and ``export`` convert).
        """
        self._check_open()
        handle = self._saves.save(
            step, app_state, epoch=epoch, metrics=metrics, extra=extra, force=force, dtype=dtype
        )
        remote = self._remote
        if remote is not None and not handle.skipped:
            handle.uploaded = remote.upload_of(step)
            handle.committed.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() is None
                else remote.forget(step, f.exception())  # type: ignore[arg-type]
            )  # fmt: skip
        return handle

    @property
    def branch_source(self) -> str | None:
        """The checkpoint this run branches from (``resume=<path>``) while its experiment
        had no checkpoint of its own when the manager opened it; None otherwise."""
        return self._exp.plan.source

    def resume(
        self, app_state: dict[str, Any], *, optional: Collection[str] = (), step: int | None = None
    ) -> CheckpointInfo | None:
        """Start the run as ``config.resume`` says: None on a fresh run (the staging is
        prepared), else the checkpoint loaded: ``"latest"``/``"best"`` of this experiment
        (none yet: a fresh start; only corrupt ones: ``IntegrityError``), or for a branch
        its source (only ``config.initial_load_only`` of it, if set), or, once the branch
        has checkpoints of its own, its own newest. ``step`` (default
        ``config.resume_step``): that step of this experiment instead. The keys of
        ``config.exclude_from_loading`` keep their values. Collective."""
        cfg = self.config
        cfg.check_state_keys(app_state)
        if cfg.resume is None:
            self.prepare(app_state)
            return None
        step = cfg.resume_step if step is None else step
        source = self._exp.plan.source
        which: Which = cfg.resume if cfg.resume in ("latest", "best") else "latest"
        keys = [k for k in app_state if k not in cfg.exclude_from_loading]
        if step is not None:
            which = step
        elif source is not None:
            which = source
            if cfg.initial_load_only is not None:
                keys = list(cfg.initial_load_only)
        part = {k: app_state[k] for k in keys}
        info = self.load(part, which, optional=optional)
        app_state.update(part)  # plain values are replaced in the dict loaded into
        rest = {k: v for k, v in app_state.items() if k not in part}
        if info is not None and rest:
            self.prepare(rest)
        if self.rank == 0 and info is not None and step is not None:
            newest = max(e.step for e in self.checkpoints())
            if info.step < newest:
                log.warning("resumed from step %d while step %d is committed in %s: saves up "
                            "to step %d will be refused; to go on from step %d, branch from it",
                            info.step, newest, self.experiment_dir, newest, info.step)  # fmt: skip
        return info

    def load(
        self,
        app_state: dict[str, Any],
        which: Which = "latest",
        *,
        optional: Collection[str] = (),
        verify: bool = True,
    ) -> CheckpointInfo | None:
        """Restore ``app_state`` from a checkpoint; None if the experiment has none.

        ``which``: ``"latest"``, ``"best"`` (by ``config.monitor``, else the monitor the
        experiment recorded), a step (int) or the path of a checkpoint directory. Objects
        are restored in place, tensors by copy and plain values replaced in
        ``app_state``; on any error nothing of ``app_state`` has changed. Keys in
        ``optional`` that the checkpoint lacks keep their value; any other missing key is
        an error. ``verify``: read every file back against its digest first, the ranks in
        parallel; ``"latest"``/``"best"`` then go past (and quarantine) a checkpoint that
        fails, a named step or path raises ``IntegrityError``. Collective.
        """
        self._check_open()
        self.wait()  # a save in flight finishes (or fails) before anything is resolved
        return self._loader.load(app_state, which, optional=optional, verify=verify)

    def verify(self, which: Which = "latest") -> CheckpointInfo:
        """Check every file of checkpoint ``which`` against its size and digest, each rank
        reading its share; ``IntegrityError`` on every rank naming each bad file with the
        expected and actual digests. Collective."""
        self._check_open()
        self.wait()
        found = self._loader.resolve(which, verify=False)
        if found is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.experiment_dir}")
        path, marker = found
        problems = self._loader.file_problems(path, marker, f"verify of {which!r}")
        if problems:
            raise IntegrityError(f"{path} is corrupt: " + "; ".join(problems))
        return CheckpointInfo.from_marker(path, marker)

    def prepare(self, app_state: Mapping[str, Any]) -> None:
        """Allocate and touch the staging buffers for ``app_state`` now, so that the first
        async save costs what every later one does (``load``/``resume`` call it). An
        optimizer without state yet is not stepped to create it: its buffers come right
        after its first step. Local (no collective); a no-op with ``async_mode="off"``."""
        self._check_open()
        try:
            self._prepare(app_state)
        except CheckpointError:
            raise
        except Exception as e:  # a state the first save will reject, on every rank
            log.debug("[rank=%d] staging not prepared: %s", self.rank, e)

    def _prepare(self, app_state: Mapping[str, Any]) -> None:
        pool = self._saves.pool
        if pool is None:
            return
        ready = {}
        later = weakref.WeakMethod(self._prepare_later)
        for key, value in app_state.items():
            if isinstance(value, torch.optim.Optimizer) and not value.state:
                self._saves.hooks.after_first_step(value, lambda: _call(later, app_state))
            else:
                ready[key] = value
        if ready:
            built = state.build_save_state(
                ready, rank=self.rank, world_size=self.world_size, capture_rng=False
            )
            pool.prepare(built.state_dict)

    def _prepare_later(self, app_state: Mapping[str, Any]) -> None:
        """After an optimizer's first step (a hook: never raises into ``step()``)."""
        if self._closed:
            return
        try:
            self._prepare(app_state)
        except Exception as e:  # the next save reports it, on every rank
            log.warning("[rank=%d] staging not prepared after the first step: %s", self.rank, e)

    def update_metrics(
        self, step: int, metrics: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
    ) -> None:
        """Attach ``metrics`` to the checkpoint of ``step`` after its ``save`` (a validation
        that ends after the step was saved). A save still in flight gets them in its marker
        at the commit; a committed one has its marker rewritten atomically, and ``best``
        and retention follow. ``extra`` is merged into the marker's alike. Rank 0's values
        count (``reduce_metrics`` first for per-rank ones); no collective."""
        self._check_open()
        clean, more = clean_metrics(metrics), clean_extra(extra)
        if self.rank != 0 or not (clean or more):
            return
        if self._saves.amend_inflight(step, clean, more):
            return  # into its marker at the commit (the upload copies that marker)
        if self._remote is not None:  # the remote copy, after its upload (queue order)
            self._remote.amend(step, clean, more)
        catalog = self._exp.catalog
        info = next((e for e in catalog.entries() if e.step == step), None)
        if info is None and self._remote is not None:
            return  # dropped locally: the remote copy gets them
        if info is None:
            log.warning(
                "[step=%d] no committed checkpoint of this step in %s: metrics %s not recorded",
                step,
                self._exp.layout.checkpoints_dir,
                clean,
            )
            return
        if catalog.amend(info, read_marker(info.path).amended(clean, more)) is None:
            log.warning("[step=%d] retention deleted the checkpoint before its metrics %s came",
                        step, clean)  # fmt: skip

    def discard(self, step: int) -> None:
        """Hand the checkpoint of ``step`` to retention, for callers that choose what to
        keep themselves (Lightning's ``ModelCheckpoint`` top-k): it is deleted once it has
        committed (never while in flight) and is neither the newest, the best nor the one
        the run resumed from; one of those goes once it no longer is. With ``local_dir``
        both tiers let it go. Rank 0's call counts; no collective."""
        self._check_open()
        if self.rank != 0:
            return
        self._exp.catalog.discard(step)
        if self._remote is not None:
            self._remote.remote.catalog.discard(step)

    def decide(self, fn: Callable[[], T], what: str = "a decision") -> T:
        """Run ``fn`` on rank 0 only and return its result (or raise its error) on every
        rank, over the manager's side group. Collective."""
        self._check_open()
        return self._comm.decide(fn, what)

    def any_rank(self, value: int, what: str = "a check") -> int:
        """The largest of every rank's ``value`` (e.g. a signal one rank received), on every
        rank. Collective, on the manager's side group."""
        self._check_open()
        return max(self._comm.all_gather(int(value), what))

    def reduce_metrics(
        self, metrics: Mapping[str, Any] | None, what: str = "metrics"
    ) -> dict[str, float]:
        """Every rank's ``metrics`` reduced as ``config.metrics_reduce`` says: the same
        dict on every rank (for ``update_metrics``, or a decision on a metric), or the same
        error. Collective: one small gather on the manager's side group."""
        self._check_open()
        try:
            mine, error = clean_metrics(metrics), None
        except TypeError as e:
            mine, error = {}, str(e)
        gathered = self._comm.all_gather((mine, error), what)
        failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e is not None]
        if failed:
            raise TypeError(f"{what}: {'; '.join(failed)}")
        return reduce_metrics([m for m, _ in gathered], self.config.metrics_reduce, what)

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error if it failed."""
        self._check_open()
        self._flush()

    def close(self) -> None:
        """Flush the save in flight (raising its error), then stop the writers, free the
        staging memory and give the lease back. Idempotent; also run at interpreter exit."""
        if self._closed:
            return
        try:
            self._flush()
        finally:
            self._closed = True
            self._saves.close()
            self._close_experiments()
            self._comm.release()

    def wait_uploads(self, timeout: float | None = None) -> bool:
        """With ``local_dir`` (rank 0): block until every upload to ``root_dir`` queued so
        far finished; False if ``timeout`` ran out; ``CheckpointError`` naming the uploads
        that failed since the last call (their local copies are kept). Elsewhere: True."""
        return self._remote is None or self._remote.wait(timeout)

    def _close_experiments(self) -> None:
        """The uploads finish (bounded by ``timeout_s``), then both leases go back."""
        try:
            if self._remote is not None:
                self._remote.close(self.config.timeout_s)
        finally:
            self._exp.close(self.config.timeout_s)

    def _flush(self) -> None:
        self._saves.flush()
        if not self._exp.catalog.flush(self.config.timeout_s):
            log.warning(
                "retention in %s is still deleting after %.0f s",
                self._exp.layout.checkpoints_dir,
                self.config.timeout_s,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the CheckpointManager of {self.experiment_dir} is closed")


def _call(method: weakref.WeakMethod[Any], arg: Any) -> None:
    fn = method()
    if fn is not None:
        fn(arg)


def _close_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    manager = ref()
    if manager is not None and not manager._closed:
        try:
            manager.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("closing %s at exit: %s", manager.experiment_dir, e)


__all__ = ["CheckpointManager", "SaveHandle", "SaveStats"]
