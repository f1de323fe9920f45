"""The save pipeline: agree, stage, write, commit; ``save`` returns a ``SaveHandle``.

Every rank builds (and, in an async mode, stages) its state, rank 0 begins the ``.tmp``,
and ONE gather tells every rank whether all of that worked on every rank: a bad argument,
a staging failure, a refused step or a busy writer on any rank fails (or skips) the save
on all of them alike. Then every rank writes its shards (in the background in an async
mode, over a side group of its own), a second gather carries each rank's digests or its
error (with the OS error's text), and rank 0 commits and tells the others. A failure
after the ``.tmp`` was begun removes it (rank 0, once the failure is agreed), is raised
on every rank (at once in sync mode; in an async mode by the handle, and at the next
``save``, ``wait`` or ``close``), and marks the side groups for renewal so that the next
save runs on fresh ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import state, trees
from .agreement import Answer, verdict
from .background import Background, Job
from .comm import Comm, wire_error
from .committer import PhaseHook
from .config import CheckpointConfig
from .errors import CheckpointError
from .experiment import Experiment
from .handles import SaveHandle, SaveStats
from .marker import clean_extra, clean_metrics
from .metrics import reduce_metrics
from .overlap import OptimizerHooks
from .shards import BlobCache, LocalPlan, PlanCache, live_plan, staged_plan
from .staging import StagedState, StagingPool, WriteItems, mutated_by_optimizers_only
from .storage import Storage
from .worker import Worker
from .writers import (
    LocalWriter,
    ProcessWriter,
    ShardWriter,
    WriteOptions,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Built:
    """One rank's save, ready to write."""

    shape: dict[str, Any]
    metrics: dict[str, float]
    extra: dict[str, Any]
    saved: state.SaveState
    local: LocalPlan


class SavePipeline(Background):
    """One manager's saves. Only one is in flight at a time."""

    def __init__(
        self,
        config: CheckpointConfig,
        comm: Comm,
        experiment: Experiment,
        storage: Storage,
        hook: PhaseHook,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        self.config, self._comm, self._exp = config, comm, experiment
        self._storage, self._hook = storage, hook
        self.rank, self.world_size = comm.rank, comm.world_size
        self._lock = threading.Lock()  # stats and the metrics of a save in flight
        self._stats: list[SaveStats] = []
        # The metrics and extra of the save in flight (one at most), for its marker.
        self._late: dict[int, tuple[dict[str, float], dict[str, Any]]] = {}
        self._io = comm
        self._worker: Worker | None = None
        self.pool: StagingPool | None = None
        opts = WriteOptions(
            fsync=config.fsync, threads=config.write_threads, digests=config.digests
        )
        self._opts = opts
        self._plans = PlanCache()
        self._items = WriteItems()  # off mode's (the staging pool has its own)
        self._blobs = BlobCache()
        self._writer: ShardWriter
        if config.async_mode == "off":
            self._writer = LocalWriter(opts, storage)
            self.hooks = OptimizerHooks(None, config.timeout_s)
            return
        self._io = Comm.create(process_group, config.timeout_s, purpose="io")
        self.pool = StagingPool(shared=config.async_mode == "process")
        budget = 4 * config.timeout_s + 60  # each collective of a save is bounded
        self._worker = Worker(f"dcp_engine_saver_rank{self.rank}", budget)
        self.hooks = OptimizerHooks(self.pool, config.timeout_s)
        if config.async_mode == "thread":
            self._writer = LocalWriter(opts, storage)
        else:  # started in the background: the first save waits for it only if need be
            writer = ProcessWriter(opts, storage, timeout_s=config.timeout_s)
            self.pool.before_rebuild = writer.unmap
            self._writer = writer

    # ------------------------------------------------------------------ foreground

    def save(
        self,
        step: int,
        app_state: Mapping[str, Any],
        *,
        epoch: int | None,
        metrics: Any,
        extra: Mapping[str, Any] | None,
        force: bool,
        dtype: torch.dtype | None = None,
    ) -> SaveHandle:
        start = time.perf_counter()
        handle = SaveHandle(step)
        what = f"save of step {step}"
        wait = self._worker is not None and (force or self.config.when_busy == "wait")
        waited = self._worker.wait(what) if wait and self._worker is not None else 0.0
        self._comm.renew()
        busy = self._worker is not None and self._worker.busy
        previous = None if busy or self._worker is None else self._worker.take_error()
        built: _Built | None = None
        error: Exception | None = None
        began = False
        try:
            if previous is not None:
                raise CheckpointError(f"{what} refused: the previous save failed: {previous}")
            if not busy:  # this rank's buffers are free: stage now, agree once below
                built = self._build(step, app_state, epoch, metrics, extra, dtype)
                if self.rank == 0:
                    self._begin(step)
                    began = True
        except (CheckpointError, ValueError, TypeError) as e:  # the caller's to fix, as is
            error = e
        except Exception as e:  # e.g. a tensor that cannot be copied: name where it failed
            error = CheckpointError(f"{what} failed on rank {self.rank}: {type(e).__name__}: {e}")
            error.__cause__ = e
        mine = Answer(
            step,
            {} if built is None else built.shape,
            busy,
            None if error is None else wire_error(error),
            renew=previous is not None or self._io.broken,
            plan_cached=built is not None and self._plans.has(built.local.key),
            metrics={} if built is None else built.metrics,
            waited=waited,
        )
        try:
            gathered: list[Answer] = self._comm.all_gather(mine, what)
        except CheckpointError:
            self._abort(step, began)
            raise
        refused = verdict(gathered, what)
        skip = any(g.busy for g in gathered)
        if refused is None and not skip:
            try:  # the marker's metrics, from every rank's (alike on every rank)
                handle.metrics = reduce_metrics(
                    [g.metrics for g in gathered], self.config.metrics_reduce, what
                )
            except CheckpointError as e:
                refused = e
        if refused is not None or error is not None or skip:
            self._abort(step, began)
            if built is not None and built.local.staged is not None:
                self.hooks.done()  # no copy will run: nothing for an optimizer to wait on
        if error is not None:
            raise error from previous
        if refused is not None:
            raise refused
        if skip:
            return self._skipped(handle, gathered, start)
        if any(g.renew for g in gathered):  # a failed save broke the I/O group somewhere
            self._io.broken = True
            self._io.renew()
            self._writer.renew()
        assert built is not None
        with self._lock:
            self._late[step] = (handle.metrics, built.extra)
        replan = not all(g.plan_cached for g in gathered)
        # The ranks stage in step: the longest wait for a previous save held every rank.
        waited = min(max(g.waited for g in gathered), time.perf_counter() - start)
        job = Job(handle, epoch, built.saved.entries, start, waited, built.local, replan)
        staged = built.local.staged
        if staged is None:
            self._write_and_commit(job, self._comm, 0.0)
            if not handle.staged.done():  # written and committed: the state is free
                handle.staged.set_result(None)
            return handle
        blocked = time.perf_counter() - start
        if not staged.pending:
            handle.staged.set_result(None)
        assert self._worker is not None
        self._worker.submit(lambda: self._write_and_commit(job, self._io, blocked), handle)
        return handle

    def _build(
        self,
        step: int,
        app_state: Mapping[str, Any],
        epoch: int | None,
        metrics: Any,
        extra: Mapping[str, Any] | None,
        dtype: torch.dtype | None = None,
    ) -> _Built:
        """Arguments checked, the state dict built and (async) staged; gathered after, so
        that a bad argument or a failed copy on one rank fails every rank instead of
        leaving the others in a collective."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"epoch must be an int or None, got {epoch!r}")
        clean, marker_extra = clean_metrics(metrics), clean_extra(extra)
        saved = state.build_save_state(
            app_state,
            rank=self.rank,
            world_size=self.world_size,
            capture_rng=self.config.capture_rng,
        )
        if dtype is not None:  # a weights export: the RNG blobs are not floating point
            saved.state_dict = trees.cast(saved.state_dict, dtype)
        shape = {k: v for k, v in saved.entries.items() if k != state.RNG_KEY}
        coordinator = self.rank == 0
        if self.pool is None:
            local = live_plan(saved.state_dict, self._items, coordinator=coordinator)
        else:
            local = staged_plan(self._stage(saved, app_state), coordinator=coordinator)
        return _Built(shape, clean, marker_extra, saved, local)

    def _stage(self, saved: state.SaveState, app_state: Mapping[str, Any]) -> StagedState:
        assert self.pool is not None
        if self.config.staging == "overlap":
            self.hooks.hook(app_state)
            staged = self.pool.stage(saved.state_dict, defer=mutated_by_optimizers_only(app_state))
        else:
            staged = self.pool.stage(saved.state_dict)
        if staged.pending:
            self.hooks.pending()
        return staged

    def _begin(self, step: int) -> None:
        """Rank 0: the free space, the timeline, the ``.tmp``."""
        catalog = self._exp.catalog
        assert catalog.committer is not None
        newest = catalog.newest()
        catalog.committer.begin(step, None if newest is None else newest.step,
                                last_bytes=0 if newest is None else newest.bytes)  # fmt: skip

    def _skipped(self, handle: SaveHandle, gathered: list[Answer], start: float) -> SaveHandle:
        busy = [r for r, g in enumerate(gathered) if g.busy]
        if self.rank == 0:
            log.warning(
                "[rank=0][step=%d] save skipped: the previous save is still writing on "
                "ranks %s (when_busy='skip')",
                handle.step,
                busy,
            )
        blocked = time.perf_counter() - start
        stats = SaveStats(handle.step, 0, 0.0, 0.0, blocked, skipped=True, staged_s=blocked)
        with self._lock:
            self._stats.append(stats)
        handle._skip(stats)
        return handle

    # ------------------------------------------------------------------ metrics, flush

    def amend_inflight(self, step: int, metrics: dict[str, float], extra: dict[str, Any]) -> bool:
        """Rank 0: metrics for the save of ``step`` still in flight go into its marker at
        the commit. False if that save is not in flight (it committed, or never began)."""
        with self._lock:
            if step not in self._late:
                return False
            old_metrics, old_extra = self._late[step]
            self._late[step] = ({**old_metrics, **metrics}, {**old_extra, **extra})
            return True

    def stats(self) -> list[SaveStats]:
        with self._lock:
            return list(self._stats)

    def flush(self) -> None:
        """Wait for the save in flight; raise its error (once)."""
        if self._worker is None:
            return
        self._worker.wait("flush")
        error = self._worker.take_error()
        if error is not None:
            raise CheckpointError(f"the background save failed: {error}") from error

    def close(self) -> None:
        self.hooks.remove()
        if self._worker is not None:
            self._worker.stop()
        self._writer.close()
        if self.pool is not None:
            self.pool.release()
        if self._io is not self._comm:
            self._io.release()


__all__ = ["SaveHandle", "SavePipeline", "SaveStats"]
