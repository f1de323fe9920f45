"""``CheckpointManager``: save, commit, index and load, across the ranks of a job.

Every rank writes its own shards (``writers.py``); rank 0 alone decides (which
directory, whether a step may be saved, what is committed) and broadcasts its decision on
the manager's side group, so that all ranks raise the same error or go on together.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from . import commit, faults, index, layout, retention, state
from .collector import Collector
from .comm import Comm, unwire_error, wire_error
from .config import CheckpointConfig
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .index import CheckpointInfo
from .staging import StagedState, StagingPool, mutated_by_optimizers_only
from .writers import (
    InlineWriter,
    ProcessWriter,
    ShardWriter,
    ThreadWriter,
    Worker,
    WriteOptions,
    WriteResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class SaveStats:
    """The figures of one save, the same on every rank (``bytes`` is the whole checkpoint)."""

    step: int
    bytes: int
    blocked_s: float
    """How long ``save`` held the caller."""
    write_s: float
    """DCP write of the shards on this rank, fsync included."""
    commit_s: float
    """Marker, rename, directory fsyncs, index and alias (rank 0's work, waited for)."""
    total_s: float
    """From the call until committed."""
    skipped: bool = False
    """``when_busy="skip"``: the save was not made because the previous one was writing."""

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else math.inf


class CheckpointManager:
    """Saves ``app_state`` dicts as sharded DCP checkpoints and loads them back.

    ``process_group``: the ranks that checkpoint together (default: the default group if
    ``torch.distributed`` is initialised, else this process alone). The manager creates a
    gloo side group over those ranks, so it must be constructed by all of them.

    The experiment directory follows ``config.resume`` (see ``CheckpointConfig.resume``);
    ``run_config`` (the training config) is written once, by rank 0, as its
    ``config.yaml`` (default: this ``CheckpointConfig``).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        process_group: dist.ProcessGroup | None = None,
        *,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        self.config = config
        self._comm = Comm.create(process_group, config.timeout_s)
        faults.set_context(rank=self.rank)
        self._closed = False
        self._stats: list[SaveStats] = []
        name, source = self._comm.decide(
            lambda: _choose_experiment(config), "choosing the experiment"
        )
        self.experiment_dir = config.root_path / name
        self._branch_source = None if source is None else Path(source)
        self._layout = layout.ExperimentLayout(self.experiment_dir)
        self._entries: list[CheckpointInfo] = self._comm.decide(
            lambda: self._open_experiment(run_config), f"opening {self.experiment_dir}"
        )
        self._lock = threading.Lock()  # entries, stats and protected steps, shared
        self._index_lock = threading.Lock()  # index.json writes (commit and collector)
        self._protected: set[int] = set()  # steps this run loaded: never collected
        # Metrics that arrive for a save still in flight go into its marker at the commit;
        # the lock spans the commit's marker-to-entry window and every amendment.
        self._metrics_lock = threading.Lock()
        self._inflight: int | None = None  # step of the async save in flight
        self._late: dict[int, dict[str, float]] = {}
        self._extra: dict[int, dict[str, Any]] = {}  # rank 0: the marker's "extra" by step
        self._best_alias: str | None = None  # where rank 0 last pointed ``best``
        self._collector: Collector | None = None
        if self.rank == 0 and not config.retention.keeps_all:
            self._collector = Collector(
                self._layout, config.retention, entries=self.checkpoints,
                protected=self._protected_steps, forget=self._forget, fsync=config.fsync,
            )  # fmt: skip
        self._worker: Worker | None = None
        self._pool: StagingPool | None = None
        self._staged = threading.Event()  # set while no staging copy is pending
        self._staged.set()
        self._hooks: dict[int, Any] = {}  # overlapped staging: optimizer -> step pre-hook
        self._first_step_hooks: dict[int, Any] = {}  # optimizer -> prepare after 1st step
        self._hook_wait_s = 0.0
        self._writer: ShardWriter = self._start_writer(process_group)
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
        with self._lock:
            entries = list(self._entries)
        if self.rank != 0:
            entries = [e for e in entries if e.path.is_dir()]
        return entries

    def stats(self) -> list[SaveStats]:
        """One entry per save of this manager (committed or skipped), in order."""
        with self._lock:
            return list(self._stats)

    def save(
        self,
        step: int,
        app_state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Write ``app_state`` as checkpoint ``step`` on every rank and commit it.

        Collective: every rank calls it with the same step. With ``async_mode="off"`` it
        returns the committed checkpoint; otherwise it returns None as soon as the state is
        staged, and the write and commit go on in the background (``wait()`` for them). An
        error of the previous background save is raised here, on every rank.
        ``force=True``: never skipped (``when_busy="skip"`` waits instead).
        ``extra``: a small JSON-able dict kept in the marker (``CheckpointInfo.extra``),
        rank 0's; the callbacks keep the loop position there.
        """
        self._check_open()
        clean_extra = _check_extra(extra)
        if self.rank == 0:
            with self._metrics_lock:
                self._extra[step] = clean_extra
        if self._worker is None:
            return self._save(step, app_state, epoch, metrics)
        self._save_async(step, app_state, epoch, metrics, force)
        return None

    def resume(
        self, app_state: dict[str, Any], *, optional: Collection[str] = ()
    ) -> CheckpointInfo | None:
        """Start the run as ``config.resume`` says: None on a fresh run (the staging is
        prepared), else the checkpoint loaded (``"latest"``, ``"best"``, or the branch's
        source). ``"latest"``/``"best"`` in an experiment without checkpoints start fresh.
        Collective."""
        which = self.config.resume
        if which is None:
            self.prepare(app_state)
            return None
        return self.load(app_state, self._branch_source or which, optional=optional)

    def load(
        self,
        app_state: dict[str, Any],
        which: index.Which = "latest",
        *,
        optional: Collection[str] = (),
        verify: bool = True,
    ) -> CheckpointInfo | None:
        """Restore ``app_state`` from a checkpoint; None if there is none (a fresh run).

        ``which``: ``"latest"``, ``"best"`` (by ``config.monitor``), a step (int) or the path
        of a checkpoint directory. Objects are restored in place, tensors by copy and plain
        values replaced in ``app_state``; on any error nothing of ``app_state`` has changed.
        Keys in ``optional`` that the checkpoint lacks keep their value (entries added to
        the state since it was saved); any other missing key is an error.
        ``verify``: read every file back against its digest first, the ranks in parallel;
        ``"latest"``/``"best"`` then skip (and log) a checkpoint that fails, a named step
        or path raises ``IntegrityError``. Collective: every rank calls it.
        """
        self._check_open()
        self.wait()  # a save in flight finishes (or fails) before anything is resolved
        found = self._resolve(which, verify)
        if found is None:
            log.info(
                "[rank=%d] no committed checkpoint in %s: starting fresh",
                self.rank,
                self._layout.checkpoints_dir,
            )
            self.prepare(app_state)
            return None
        path, marker = Path(found[0]), found[1]
        info = CheckpointInfo.from_marker(path, marker)
        start = time.perf_counter()
        plan, error = None, None
        try:
            plan = self._plan_load(app_state, path, marker, optional)
        except Exception as e:
            error = e
        try:
            self._comm.agree(error, f"load of {path}")
        except BaseException:
            if plan is not None:  # another rank failed: undo this rank's side effects
                plan.rollback()
            raise
        assert plan is not None
        try:
            with self._comm.dcp_call():
                dcp.load(
                    plan.read,
                    storage_reader=FileSystemReader(path),
                    process_group=self._comm.group,
                    no_dist=not self._comm.distributed,
                )
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            plan.rollback()
            raise CheckpointError(f"reading checkpoint {path} failed: {_summary(e)}") from e
        try:
            self._comm.everywhere(plan.apply, f"restoring {path}")
        except BaseException:
            plan.rollback()
            raise
        self.prepare(app_state)
        if path.resolve().parent == self._layout.checkpoints_dir.resolve():
            with self._lock:
                self._protected.add(info.step)  # the run resumed from it: retention keeps it
        if self.rank == 0:
            log.info(
                "[rank=0][step=%d] loaded %s (%s) in %.2f s",
                info.step,
                path,
                _fmt_bytes(info.bytes),
                time.perf_counter() - start,
            )
        return info

    def verify(self, which: index.Which = "latest") -> CheckpointInfo:
        """Check every file of checkpoint ``which`` against its size and digest, each rank
        reading its share of the files; ``IntegrityError`` on every rank naming each bad
        file with the expected and actual digests. Collective."""
        self._check_open()
        self.wait()
        found = self._resolve(which, verify=False)
        if found is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.experiment_dir}")
        path, marker = found
        problems = self._file_problems(path, marker, f"verify of {which!r}")
        if problems:
            raise IntegrityError(f"{path} is corrupt: " + "; ".join(problems))
        return CheckpointInfo.from_marker(path, marker)

    def _file_problems(self, path: Path, marker: dict[str, Any], what: str) -> list[str]:
        """Every rank checks every world_size-th file; all ranks get all the problems."""
        names = sorted(marker["files"])[self.rank :: self.world_size]
        mine = commit.file_problems(path, marker, digests=True, names=names)
        return [p for ps in self._comm.all_gather(mine, what) for p in ps]

    def _resolve(self, which: index.Which, verify: bool) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0 lists the candidates (sizes checked); with ``verify`` every rank reads
        its share of each candidate's files until one matches its digests."""
        what = f"load of {which!r}"
        cfg = self.config
        found = self._comm.decide(
            lambda: index.candidates(self._layout, which, monitor=cfg.monitor, mode=cfg.mode),
            what,
        )
        if not verify:
            return (Path(found[0][0]), found[0][1]) if found else None
        for path, marker in found:
            problems = self._file_problems(Path(path), marker, what)
            if not problems:
                return Path(path), marker
            message = f"{path} is corrupt: " + "; ".join(problems)
            if which not in ("latest", "best"):
                raise IntegrityError(message)
            if self.rank == 0:
                log.warning("skipping %s for which=%r: %s", Path(path).name, which, message)
        if found:  # there were checkpoints, and none is intact: never start over silently
            raise IntegrityError(
                f"none of the {len(found)} committed checkpoints in {self.experiment_dir} "
                "matches its digests (see the warnings above); load one by path with "
                "verify=False to accept it as it is"
            )
        return None

    def prepare(self, app_state: Mapping[str, Any]) -> None:
        """Allocate and touch the staging buffers for ``app_state`` now, so that the first
        async save costs what every later one does. ``load()`` calls it, a fresh run's
        ``load()`` too; call it after building the state if the run never loads. An
        optimizer without state yet (before its first step) is not stepped to create it:
        its buffers are allocated right after its first step. Local (no collective); a
        no-op with ``async_mode="off"``."""
        self._check_open()
        if self._pool is None:
            return
        ready = {}
        for key, value in app_state.items():
            if isinstance(value, torch.optim.Optimizer) and not value.state:
                self._prepare_after_first_step(value, app_state)
            else:
                ready[key] = value
        try:
            built = state.build_save_state(
                ready, rank=self.rank, world_size=self.world_size, capture_rng=False
            )
        except Exception as e:  # the first save reports it, on every rank
            log.debug("[rank=%d] staging not prepared: %s", self.rank, e)
            return
        self._pool.prepare(built.state_dict)

    def update_metrics(
        self, step: int, metrics: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
    ) -> None:
        """Attach ``metrics`` to the checkpoint of ``step`` after its ``save`` (e.g. a
        validation that ends after the step was saved). A save still in flight gets them
        in its marker at the commit; a committed one has its marker rewritten atomically
        (the metrics are not part of what the files' integrity covers), and ``best`` and
        retention follow. ``extra`` is merged into the marker's ``extra`` alike. Rank 0's
        values count; no collective."""
        self._check_open()
        clean = commit.clean_metrics(metrics)
        more = _check_extra(extra)
        if self.rank != 0 or not (clean or more):
            return
        with self._metrics_lock:
            if step == self._inflight and self._worker is not None and self._worker.busy:
                self._late.setdefault(step, {}).update(clean)
                self._extra.setdefault(step, {}).update(more)
                return
            if not any(e.step == step for e in self.checkpoints()):
                log.warning("[step=%d] no committed checkpoint of this step in %s: metrics %s "
                            "not recorded", step, self._layout.checkpoints_dir, clean)  # fmt: skip
                return
            path = self._layout.step_dir(step)
            marker = commit.read_marker(path)
            marker["metrics"] = {**marker["metrics"], **clean}
            marker["extra"] = {**marker.get("extra", {}), **more}
            commit.write_marker(path, marker, fsync=self.config.fsync)
            info = CheckpointInfo.from_marker(path, marker)
            with self._lock:
                self._entries = [info if e.step == step else e for e in self._entries]
        self._after_commit(info, f"[step={step}] metrics updated, but")

    def decide(self, fn: Callable[[], T], what: str = "a decision") -> T:
        """Run ``fn`` on rank 0 only and return its result (or raise its error) on every
        rank, over the manager's side group. Collective. For choices that must be alike on
        every rank but depend on a clock or on per-rank values (when to save)."""
        self._check_open()
        return self._comm.decide(fn, what)

    def any_rank(self, value: int, what: str = "a check") -> int:
        """The largest of every rank's ``value`` (e.g. a signal one rank received), on every
        rank. Collective, on the manager's side group."""
        self._check_open()
        return max(self._comm.all_gather(int(value), what))

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error if it failed."""
        self._check_open()
        self._flush()

    def close(self) -> None:
        """Flush the save in flight (raising its error), then stop the writers and free the
        staging memory. Idempotent; also run at interpreter exit."""
        if self._closed:
            return
        try:
            self._flush()
        finally:
            self._closed = True
            for handle in [*self._hooks.values(), *self._first_step_hooks.values()]:
                handle.remove()
            self._hooks.clear()
            self._first_step_hooks.clear()
            if self._worker is not None:
                self._worker.stop()
            if self._collector is not None:
                self._collector.stop(self.config.timeout_s)
            self._writer.close()
            if self._pool is not None:
                self._pool.release()
            self._comm.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ save

    def _build(
        self, step: int, app_state: Mapping[str, Any], epoch: int | None, metrics: Any
    ) -> tuple[state.SaveState, dict[str, float]]:
        """Arguments checked and the state dict built; run under agreement, so that a bad
        argument on one rank fails every rank instead of leaving them in a collective."""
        _check_step(step)
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"epoch must be an int or None, got {epoch!r}")
        clean = commit.clean_metrics(metrics)
        saved = state.build_save_state(
            app_state,
            rank=self.rank,
            world_size=self.world_size,
            capture_rng=self.config.capture_rng,
        )
        return saved, clean

    def _save(
        self, step: int, app_state: Mapping[str, Any], epoch: int | None, metrics: Any
    ) -> CheckpointInfo:
        start = time.perf_counter()
        what = f"save of step {step}"
        saved, metrics = self._comm.everywhere(
            lambda: self._build(step, app_state, epoch, metrics), what
        )
        shape = {k: v for k, v in saved.entries.items() if k != state.RNG_KEY}
        gathered = self._comm.all_gather((step, shape), what)
        self._comm.decide(lambda: self._prepare(step, gathered), what)
        info, kept, written, commit_start = self._write_then_commit(
            self._comm, saved.state_dict, step, epoch, metrics, saved.entries
        )
        now = time.perf_counter()
        self._record(info, kept, SaveStats(
            step=step, bytes=info.bytes, blocked_s=now - start, write_s=written.seconds,
            commit_s=now - commit_start, total_s=now - start,
        ))  # fmt: skip
        return info

    # ------------------------------------------------------------------ async save

    def _save_async(
        self,
        step: int,
        app_state: Mapping[str, Any],
        epoch: int | None,
        metrics: Any,
        force: bool = False,
    ) -> None:
        """Foreground: agree, stage, hand over. Only the control group is used here; the
        background uses the I/O group, and never while this runs (one save in flight)."""
        assert self._worker is not None and self._pool is not None
        start = time.perf_counter()
        what = f"save of step {step}"
        cfg = self.config
        if cfg.when_busy == "wait" or force:
            self._wait_worker(what)
        busy = self._worker.busy
        previous = None if busy else self._worker.take_error()
        saved: state.SaveState | None = None
        error: Exception | None = None
        try:
            saved, metrics = self._build(step, app_state, epoch, metrics)
            if previous is not None:
                error = CheckpointError(f"{what} refused: the previous save failed: {previous}")
        except Exception as e:
            error = e
        shape = (
            {} if saved is None else {k: v for k, v in saved.entries.items() if k != state.RNG_KEY}
        )
        mine = None if error is None else wire_error(error)
        gathered = self._comm.all_gather((step, shape, busy, mine), what)
        failed = [(r, g[3]) for r, g in enumerate(gathered) if g[3] is not None]
        if failed:
            # Every rank raises, and no rank keeps an error to raise again later.
            self._wait_worker(what)
            self._worker.take_error()
            if error is not None:
                raise error from previous
            r, wired = failed[0]
            raise unwire_error(wired, f"{what} failed on rank {r}")
        assert saved is not None
        if any(g[2] for g in gathered):
            busy_ranks = [r for r, g in enumerate(gathered) if g[2]]
            if self.rank == 0:
                log.warning("[rank=0][step=%d] save skipped: the previous save is still "
                            "writing on ranks %s (when_busy='skip')", step, busy_ranks)  # fmt: skip
            blocked = time.perf_counter() - start
            with self._lock:
                self._stats.append(SaveStats(step, 0, blocked, 0.0, 0.0, blocked, skipped=True))
            return
        self._comm.decide(lambda: self._prepare(step, [(g[0], g[1]) for g in gathered]), what)
        if cfg.staging == "overlap":
            self._hook_optimizers(app_state)
            staged = self._pool.stage(saved.state_dict, defer=mutated_by_optimizers_only(app_state))
        else:
            staged = self._pool.stage(saved.state_dict)
        if staged.pending:
            self._staged.clear()
        self._hook_wait_s = 0.0
        blocked = time.perf_counter() - start
        with self._metrics_lock:
            self._inflight = step
        self._worker.submit(
            lambda: self._write_and_commit(
                step, epoch, metrics, saved.entries, staged, start, blocked
            )
        )

    def _write_and_commit(
        self,
        step: int,
        epoch: int | None,
        metrics: dict[str, float],
        entries: dict[str, Any],
        staged: StagedState,
        start: float,
        blocked: float,
    ) -> None:
        """Background: finish the staging copy, write, commit (rank 0), learn the outcome."""
        try:
            staged.finish_copies()
        finally:
            self._staged.set()
        info, kept, written, commit_start = self._write_then_commit(
            self._io, staged, step, epoch, metrics, entries
        )
        now = time.perf_counter()
        self._record(info, kept, SaveStats(
            step=step, bytes=info.bytes, blocked_s=blocked + self._hook_wait_s,
            write_s=written.seconds, commit_s=now - commit_start, total_s=now - start,
        ))  # fmt: skip

    def _write_then_commit(
        self,
        comm: Comm,
        data: Any,
        step: int,
        epoch: int | None,
        metrics: dict[str, float],
        entries: dict[str, Any],
    ) -> tuple[CheckpointInfo, list[int], WriteResult, float]:
        """Every rank writes its shards into ``.tmp``; once all are durable, rank 0
        commits and every rank hears the outcome (over ``comm``). Returns the entry, the
        steps committed, this rank's write and when the commit began."""
        tmp = self._layout.tmp_dir(step)
        what = f"save of step {step}"
        try:
            written = self._writer.write(data, tmp)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"{what} failed while writing {tmp} ({_summary(e)}); nothing was committed, "
                f"latest is still {self._latest_name()}"
            ) from e
        faults.kill_point("barrier", step=step)
        commit_start = time.perf_counter()
        digests = _merge(comm.all_gather(written.digests, what))
        info, kept = comm.decide(lambda: self._commit(step, epoch, metrics, entries, digests), what)
        return info, kept, written, commit_start

    def _record(self, info: CheckpointInfo, kept: list[int], stats: SaveStats) -> None:
        """Every rank: the new entry, and rank 0's entries as they were at the commit."""
        with self._lock:
            alive = set(kept)
            self._entries = [e for e in self._entries if e.step in alive and e.step != info.step]
            self._entries = sorted([*self._entries, info], key=lambda c: c.step)
            self._stats.append(stats)
        if self.rank == 0:
            log.info("[rank=0][step=%d] saved %s in %.2f s (%.2f GB/s), blocked %.0f ms",
                     stats.step, _fmt_bytes(stats.bytes), stats.total_s, stats.gbps,
                     stats.blocked_s * 1e3)  # fmt: skip

    def _hook_optimizers(self, app_state: Mapping[str, Any]) -> None:
        """Overlapped staging: an optimizer step waits for the copy of what it mutates."""
        for value in app_state.values():
            if isinstance(value, torch.optim.Optimizer) and id(value) not in self._hooks:
                self._hooks[id(value)] = value.register_step_pre_hook(self._before_step)

    def _prepare_after_first_step(
        self, optimizer: torch.optim.Optimizer, app_state: Mapping[str, Any]
    ) -> None:
        """Once: after ``optimizer``'s first step, allocate the buffers of its new state.
        (DCP would create the state by stepping it with zero gradients, which moves e.g.
        Adam's step count: a run's trajectory must not depend on the checkpointer.)"""
        if id(optimizer) in self._first_step_hooks:
            return
        manager = weakref.ref(self)  # the hook must not keep the manager alive

        def after_step(*_: Any) -> None:
            handle.remove()
            mgr = manager()
            if mgr is not None and not mgr._closed:
                mgr._first_step_hooks.pop(id(optimizer), None)
                mgr.prepare(app_state)

        handle = optimizer.register_step_post_hook(after_step)
        self._first_step_hooks[id(optimizer)] = handle

    def _before_step(self, *_: Any) -> None:
        if self._staged.is_set():
            return
        start = time.perf_counter()
        if not self._staged.wait(self.config.timeout_s):
            raise CheckpointError(
                f"the staging copy did not finish within {self.config.timeout_s:.0f} s"
            )
        self._hook_wait_s += time.perf_counter() - start

    def _wait_worker(self, what: str) -> None:
        assert self._worker is not None
        budget = 4 * self.config.timeout_s + 60  # each of its collectives is bounded
        if not self._worker.wait(budget):
            raise CheckpointError(
                f"{what}: the previous save is still in flight after {budget:.0f} s"
            )

    def _flush(self) -> None:
        if self._worker is not None:
            self._wait_worker("flush")
            error = self._worker.take_error()
            if error is not None:
                raise CheckpointError(f"the background save failed: {error}") from error
        if self._collector is not None and not self._collector.flush(self.config.timeout_s):
            log.warning("retention in %s is still deleting after %.0f s",
                        self._layout.checkpoints_dir, self.config.timeout_s)  # fmt: skip

    def _start_writer(self, process_group: dist.ProcessGroup | None) -> ShardWriter:
        cfg = self.config
        opts = WriteOptions(fsync=cfg.fsync, threads=cfg.write_threads, digests=cfg.digests)
        if cfg.async_mode == "off":
            return InlineWriter(self._comm, opts)
        self._io = Comm.create(process_group, cfg.timeout_s, purpose="io")
        self._pool = StagingPool(shared=cfg.async_mode == "process")
        self._worker = Worker(name=f"dcp_engine_saver_rank{self.rank}")
        if cfg.async_mode == "thread":
            return ThreadWriter(self._io, opts)
        return ProcessWriter(self._comm, opts, timeout_s=cfg.timeout_s)

    def _prepare(self, step: int, gathered: list[tuple[int, dict[str, Any]]]) -> None:
        """Rank 0: every rank saves the same step and keys, the step is free, ``.tmp`` is new."""
        steps = sorted({s for s, _ in gathered})
        if len(steps) > 1:
            raise CheckpointError(f"ranks disagree on the step to save: {steps}")
        for r, (_, entries) in enumerate(gathered):
            if entries != gathered[0][1]:
                raise CheckpointError(
                    f"save of step {step}: rank {r} has app_state {_describe(entries)}, "
                    f"rank 0 has {_describe(gathered[0][1])}"
                )
        self._check_free_space(step)
        final = self._layout.step_dir(step)
        if final.exists() or final.is_symlink():
            raise CheckpointError(
                f"step {step} is already committed at {final}; a committed checkpoint is never "
                "overwritten (save under a new step, or delete it first)"
            )
        tmp = self._layout.tmp_dir(step)
        if tmp.exists():
            # Ours by name, and no save is in flight (one at a time): a torn earlier attempt.
            log.warning("removing torn %s from an earlier attempt at step %d", tmp, step)
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def _commit(
        self,
        step: int,
        epoch: int | None,
        metrics: dict[str, float],
        entries: dict[str, Any],
        digests: dict[str, dict[str, Any]],
    ) -> tuple[CheckpointInfo, list[int]]:
        """Rank 0, after every rank's shards are durable: marker, rename, index, aliases,
        then retention (in the background). Returns the entry and the steps committed."""
        fsync = self.config.fsync
        tmp, final = self._layout.tmp_dir(step), self._layout.step_dir(step)
        if not layout.dcp_metadata_path(tmp).is_file():
            missing = layout.DCP_METADATA_FILE
            raise CheckpointError(f"save of step {step}: DCP wrote no {missing} in {tmp}")
        with self._metrics_lock:
            metrics = {**metrics, **self._late.pop(step, {})}
            extra = self._extra.pop(step, {})
            marker = commit.build_marker(
                step=step,
                epoch=epoch,
                metrics=metrics,
                world_size=self.world_size,
                entries=entries,
                files=commit.file_sizes(tmp),
                digests=digests,
                extra=extra,
            )
            commit.write_marker(tmp, marker, fsync=fsync)
            faults.kill_point("marker", step=step)
            commit.publish(tmp, final, fsync=fsync)
            faults.kill_point("rename", step=step)
            # Committed from here on: the index and the aliases are conveniences rebuilt
            # at start.
            info = CheckpointInfo.from_marker(final, marker)
            with self._lock:
                self._entries = sorted([*self._entries, info], key=lambda c: c.step)
            self._inflight = None
        entries_after = self._after_commit(info, f"[step={step}] committed, but")
        return info, [e.step for e in entries_after]

    def _after_commit(self, info: CheckpointInfo, context: str) -> list[CheckpointInfo]:
        """Rank 0, once ``info`` is committed (or its metrics changed): the index and the
        aliases, then retention in the background."""
        entries = self._publish(context, newest=info)
        if self._collector is not None:
            self._collector.poke()
        return entries

    def _publish(self, context: str, newest: CheckpointInfo | None = None) -> list[CheckpointInfo]:
        """Rank 0: ``index.json`` from the entries now, ``latest`` on ``newest`` if it is
        the newest, ``best`` on the best. Serialised: the commit (background) and
        ``update_metrics``/retention may publish at once. Returns the entries."""
        cfg, checkpoints_dir = self.config, self._layout.checkpoints_dir
        with self._index_lock:
            entries = self.checkpoints()
            top = retention.best(entries, cfg.monitor, cfg.mode)
            best = None if top is None else top.step
            try:
                index.write_index(self._layout, entries, best=best, fsync=cfg.fsync)
            except OSError as e:
                log.warning("%s %s could not be updated (%s); it will be rebuilt from the "
                            "markers", context, self._layout.index_path, e)  # fmt: skip
            if newest is not None:
                faults.kill_point("index", step=newest.step)
            if cfg.save_last and newest is not None and entries[-1].step == newest.step:
                commit.move_alias(checkpoints_dir, "latest", newest.path.name, fsync=cfg.fsync)
            if cfg.save_best and top is not None and top.path.name != self._best_alias:
                moved = commit.move_alias(checkpoints_dir, "best", top.path.name, fsync=cfg.fsync)
                self._best_alias = top.path.name if moved else self._best_alias
        return entries

    def _forget(self, steps: list[int]) -> None:
        """Rank 0 (collector): drop ``steps`` from the entries and the index, before their
        directories are deleted."""
        with self._lock:
            self._entries = [e for e in self._entries if e.step not in steps]
        self._publish("retention:")

    def _protected_steps(self) -> set[int]:
        with self._lock:
            return set(self._protected)

    # ------------------------------------------------------------------ load

    def _plan_load(
        self,
        app_state: dict[str, Any],
        path: Path,
        marker: dict[str, Any],
        optional: Collection[str],
    ) -> state.LoadPlan:
        metadata = FileSystemReader(path).read_metadata()
        return state.build_load_plan(
            app_state,
            marker["entries"],
            metadata,
            rank=self.rank,
            restore_rng=self.config.capture_rng,
            where=str(path),
            optional=optional,
        )

    # ------------------------------------------------------------------ plumbing

    def _open_experiment(self, run_config: Mapping[str, Any] | None) -> list[CheckpointInfo]:
        """Rank 0 at start: create the directories, write ``config.yaml`` once, reconcile
        the index with the markers."""
        cfg = self.config
        self._layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._sweep()
        path = self._layout.config_path
        if not path.exists():
            import yaml

            data = dict(run_config) if run_config is not None else {"checkpoint": cfg.to_dict()}
            try:
                text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
            except yaml.YAMLError as e:
                raise CheckpointError(f"run_config cannot be written to {path}: {e}") from e
            commit.atomic_write_bytes(path, text.encode(), fsync=cfg.fsync)
        return index.reconcile(
            self._layout, monitor=cfg.monitor, mode=cfg.mode, fsync=cfg.fsync
        ).committed

    def _sweep(self) -> None:
        """Rank 0 at start (no save of this manager can be in flight yet): remove the
        ``step_X.tmp`` directories that crashed saves and retirements left."""
        for child in sorted(self._layout.checkpoints_dir.iterdir()):
            if layout.parse_tmp_dirname(child.name) is not None and not child.is_symlink():
                log.warning("removing %s, left by a save or a deletion that did not finish",
                            child)  # fmt: skip
                shutil.rmtree(child, ignore_errors=True)

    def _check_free_space(self, step: int) -> None:
        """Rank 0, before a save: fail fast rather than fill the disk (the last save's
        size is the estimate)."""
        with self._lock:
            last = self._entries[-1].bytes if self._entries else 0
        if last == 0:
            return
        free = faults.free_bytes(psutil.disk_usage(str(self._layout.checkpoints_dir)).free)
        if free < last:
            raise CheckpointError(
                f"save of step {step} refused: {self._layout.checkpoints_dir} has "
                f"{_fmt_bytes(free)} free, and the last checkpoint took {_fmt_bytes(last)}; "
                f"free at least {_fmt_bytes(last - free)} (or keep fewer checkpoints)"
            )

    def _latest_name(self) -> str:
        return self._entries[-1].path.name if self._entries else "(none)"

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the CheckpointManager of {self.experiment_dir} is closed")


def _close_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    manager = ref()
    if manager is not None and not manager._closed:
        try:
            manager.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("closing %s at exit: %s", manager.experiment_dir, e)


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        return dict(json.loads(json.dumps(dict(extra), allow_nan=True)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable (it goes into the marker): {e}") from e


def _merge(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The digests of every rank's files (each file is written by one rank)."""
    merged: dict[str, dict[str, Any]] = {}
    for digests in per_rank:
        merged.update(digests)
    return merged


def _summary(e: BaseException) -> str:
    """One line per failed rank instead of DCP's concatenated tracebacks."""
    if isinstance(e, CheckpointException):
        parts = []
        for r, failure in sorted(e.failures.items()):
            # (exception, frames) in recent torch, the exception alone in older ones
            f: Any = failure[0] if isinstance(failure, tuple) and failure else failure
            parts.append(f"rank {r}: {type(f).__name__}: {f}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _default_name(config: CheckpointConfig) -> str:
    return layout.default_experiment_name(config.model_name, config.dataset_name)


def _choose_experiment(config: CheckpointConfig) -> tuple[str, str | None]:
    """Rank 0: the experiment directory's name, and the checkpoint a branch starts from.

    - fresh (``resume=None``): ``experiment_name`` or a new default name;
    - ``"latest"``/``"best"``: continue in place: ``experiment_name``, else the newest
      default-named run of this model and dataset that has a committed checkpoint;
    - a path: branch into a new directory (never the source's own experiment).
    """
    resume, name = config.resume, config.experiment_name
    if resume is None:
        return name or _default_name(config), None
    if resume in ("latest", "best"):
        return name or _newest_run(config) or _default_name(config), None
    source = index.checkpoint_dir_of(resume)
    source_exp = layout.experiment_of(source).resolve()
    if not name:
        name = _default_name(config)
    if (config.root_path / name).resolve() == source_exp:
        name = f"{name}_branch_{time.strftime('%Y%m%d_%H%M%S')}"
    log.info("resume=%s: branching from %s into %s", resume, source, config.root_path / name)
    return name, str(source)


def _newest_run(config: CheckpointConfig) -> str | None:
    try:
        names = sorted((p.name for p in config.root_path.iterdir() if p.is_dir()), reverse=True)
    except FileNotFoundError:
        return None
    for name in names:
        ours = layout.is_default_experiment_name(name, config.model_name, config.dataset_name)
        if ours and index.scan(layout.ExperimentLayout(config.root_path / name)).committed:
            return name
    return None


def _describe(entries: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v['kind']}" for k, v in sorted(entries.items())) + "}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


__all__ = ["CheckpointManager", "SaveStats"]
