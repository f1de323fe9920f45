"""The background half of a save (``SavePipeline``'s base class): every rank writes its
shards into the ``.tmp``, one gather carries each rank's digests or its error, rank 0
commits and tells the others, and the save's figures are recorded (and, on rank 0, its
line logged: ``savelog.py``). Runs on the saver thread in an async mode, in line with
``async_mode="off"``. A failure removes the ``.tmp`` (rank 0, once agreed) and is raised
on every rank; the side group is then marked broken, for renewal by the next save.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from . import savelog
from .comm import Comm
from .committer import PhaseHook
from .config import CheckpointConfig
from .errors import CheckpointError
from .experiment import Experiment
from .handles import SaveHandle, SaveStats
from .index import CheckpointInfo
from .location import Location
from .marker import SHARDS_RAW
from .native import write_metadata
from .overlap import OptimizerHooks
from .shards import BlobCache, LocalPlan, PlanCache, rank_write
from .storage import Storage
from .writers import RankWritten, ShardWriter, WriteOptions, summary


@dataclass(frozen=True)
class Job:
    """A save that every rank agreed on, from the write on."""

    handle: SaveHandle
    epoch: int | None
    entries: dict[str, Any]
    start: float
    waited: float
    """The wait for the previous save that held this rank (``SaveStats.waited_s``)."""
    local: LocalPlan
    replan: bool
    """Some rank's plan changed structure: DCP's global planning runs (collectively)."""

    @property
    def step(self) -> int:
        return self.handle.step


class Background:
    """The write and the commit of an agreed save (``Job``); ``SavePipeline`` sets up
    every attribute declared here."""

    config: CheckpointConfig
    rank: int
    world_size: int
    hooks: OptimizerHooks
    _exp: Experiment
    _storage: Storage
    _hook: PhaseHook
    _opts: WriteOptions
    _plans: PlanCache
    _blobs: BlobCache
    _writer: ShardWriter
    _lock: threading.Lock  # the stats and the metrics of a save in flight
    _stats: list[SaveStats]
    _late: dict[int, tuple[dict[str, float], dict[str, Any]]]
    """The metrics and extra of the save in flight (one at most), for its marker."""

    def _staging_dir(self, step: int) -> Location:
        return self._exp.layout.staging_dir(step, renames=self._storage.renames)

    def _abort(self, step: int, began: bool) -> None:
        if began and self._exp.catalog.committer is not None:
            self._exp.catalog.committer.abort(step)
        with self._lock:
            self._late.pop(step, None)

    def _write_and_commit(self, job: Job, comm: Comm, blocked: float) -> None:
        """Every rank writes its shards into ``.tmp``; once all are durable, rank 0 commits
        and every rank hears the outcome (over ``comm``). Resolves the job's handle.
        ``blocked``: how long ``save`` held the caller (async modes; ``off`` holds it until
        here)."""
        handle = job.handle
        try:
            info, write_s, commit_start = self._write_then_commit(job, comm)
        except BaseException as e:
            comm.broken = True  # its group may be dead: the next save renews it
            self._plans.forget()
            with self._lock:
                self._late.pop(job.step, None)
            handle.committed.set_exception(e)
            if not handle.staged.done():
                handle.staged.set_result(None)
            raise
        now = time.perf_counter()
        if job.local.staged is None:  # async_mode="off": the caller was held until now
            blocked = now - job.start
        else:  # and the optimizer steps that waited for a deferred copy
            blocked += self.hooks.wait_s
        stats = SaveStats(job.step, info.bytes, write_s=write_s, commit_s=now - commit_start,
                          total_s=now - job.start, waited_s=job.waited,
                          staged_s=blocked - job.waited, planned=job.replan)  # fmt: skip
        handle.stats = stats
        with self._lock:
            self._stats.append(stats)
        if self.rank == 0 and self.config.log_saves:
            savelog.report(stats)
        handle.committed.set_result(info)

    def _write_then_commit(self, job: Job, comm: Comm) -> tuple[CheckpointInfo, float, float]:
        step, what = job.step, f"save of step {job.step}"
        tmp = self._staging_dir(step)
        written: RankWritten | None = None
        error: str | None = None
        staged = job.local.staged
        try:
            # Planning first: it is collective when replanning, so every rank must reach
            # it whatever fails on it alone (a deferred copy, below).
            central = self._plans.central(job.local, comm, job.replan, what)
            if staged is not None:  # overlapped staging: the deferred copies
                try:
                    staged.finish_copies()
                finally:
                    self.hooks.done()
                    staged = None
                if not job.handle.staged.done():
                    job.handle.staged.set_result(None)
            rank_job, source = rank_write(job.local, central, tmp, self.rank, self._blobs)
            written = self._writer.write(rank_job, source)
            self._hook("written", step)
        except Exception as e:
            if staged is not None:  # the planning failed before the copies: none will run
                self.hooks.done()
            if comm.broken:  # the planning collective failed: no gather would work either
                self._abort(step, began=self.rank == 0)
                raise
            error = f"rank {self.rank}: {summary(e)}"
        commit_start = time.perf_counter()
        try:
            results: list[tuple[RankWritten | None, str | None]] = comm.all_gather(
                (written, error), what
            )
        except CheckpointError:  # a rank died or never came: no commit, no .tmp left
            self._abort(step, began=self.rank == 0)
            raise
        failed = [e for _, e in results if e is not None]
        if failed:
            self._abort(step, began=self.rank == 0)
            newest = self._exp.catalog.newest()
            latest = None if newest is None else newest.step
            raise CheckpointError(
                f"{what} failed while writing {tmp}: {'; '.join(failed)}; nothing was "
                f"committed, the newest checkpoint is still "
                f"{'(none)' if latest is None else f'step {latest}'}"
            )
        assert written is not None
        every = [w for w, _ in results if w is not None]
        info, entries = comm.decide(lambda: self._commit(job, every), what)
        if self.rank != 0:
            self._exp.catalog.mirror(entries)
        with self._lock:
            self._late.pop(step, None)
        return info, written.seconds, commit_start

    def _commit(
        self, job: Job, written: list[RankWritten]
    ) -> tuple[CheckpointInfo, list[CheckpointInfo]]:
        """Rank 0, every rank's shards durable: DCP's ``.metadata``, the marker, the
        rename, the catalog (index, aliases, retention in the background)."""
        catalog = self._exp.catalog
        assert catalog.committer is not None
        tmp = self._staging_dir(job.step)
        digests = {f.name: f.digest for w in written for f in w.files}
        try:
            data = self._plans.metadata_bytes([w.places for w in written])
            fs = self._storage.shard_filesystem(digests=self._opts.digests, fsync=self._opts.fsync)
            meta = write_metadata(fs, tmp, data)
        except BaseException:
            catalog.committer.abort(job.step)
            raise
        digests[meta.name] = meta.digest
        # Under the lock from the marker to the catalog: metrics that come while writing go
        # into the marker, and later ones find the checkpoint in the catalog.
        with self._lock:
            metrics, extra = self._late.pop(job.step, ({}, {}))
            try:
                path, marker = catalog.committer.finalize(
                    job.step, epoch=job.epoch, metrics=metrics, extra=extra,
                    entries=job.entries, digests=digests, world_size=self.world_size,
                    shards=SHARDS_RAW,
                )  # fmt: skip
            except BaseException:
                catalog.committer.abort(job.step)
                raise
            info = CheckpointInfo.from_marker(path, marker)
            catalog.add(info)  # committed from the rename on: never raises
        return info, catalog.entries()


__all__ = ["Background", "Job"]
