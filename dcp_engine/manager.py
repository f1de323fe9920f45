"""``CheckpointManager``: save, commit, index and load, across the ranks of a job.

Every rank writes its own shards (``writers.py``); rank 0 alone decides (which
directory, whether a step may be saved, what is committed) and broadcasts its decision on
the manager's side group, so that all ranks raise the same error or go on together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from . import commit, index, layout, state
from .comm import Comm
from .config import CheckpointConfig
from .errors import CheckpointError, CheckpointNotFoundError, NotACheckpointError
from .index import CheckpointInfo
from .writers import InlineWriter, ShardWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

Which = str | int | os.PathLike[str]


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

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else math.inf


class CheckpointManager:
    """Saves ``app_state`` dicts as sharded DCP checkpoints and loads them back.

    ``process_group``: the ranks that checkpoint together (default: the default group if
    ``torch.distributed`` is initialised, else this process alone). The manager creates a
    gloo side group over those ranks, so it must be constructed by all of them.
    """

    def __init__(
        self, config: CheckpointConfig, process_group: dist.ProcessGroup | None = None
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        self.config = config
        self._comm = Comm.create(process_group, config.timeout_s)
        self._closed = False
        self._stats: list[SaveStats] = []
        name = self._decide(
            lambda: config.experiment_name or _default_name(config), "choosing the experiment"
        )
        self.experiment_dir = config.root_path / name
        self._layout = layout.ExperimentLayout(self.experiment_dir)
        self._entries: list[CheckpointInfo] = self._decide(
            self._open_experiment, f"opening {self.experiment_dir}"
        )
        self._writer: ShardWriter = InlineWriter(
            self._comm, fsync=config.fsync, threads=config.write_threads
        )

    # ------------------------------------------------------------------ public

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest (lowest step) first."""
        return list(self._entries)

    def stats(self) -> list[SaveStats]:
        """One entry per committed save of this manager, in order."""
        return list(self._stats)

    def save(
        self,
        step: int,
        app_state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write ``app_state`` as checkpoint ``step`` on every rank and commit it.

        Collective: every rank calls it with the same step. Returns once committed.
        """
        self._check_open()
        _check_step(step)
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError(f"epoch must be an int or None, got {epoch!r}")
        clean = commit.clean_metrics(metrics)
        return self._save(step, app_state, epoch, clean)

    def load(self, app_state: dict[str, Any], which: Which = "latest") -> CheckpointInfo | None:
        """Restore ``app_state`` from a checkpoint; None if there is none (a fresh run).

        ``which``: ``"latest"``, ``"best"`` (by ``config.monitor``), a step (int) or the path
        of a checkpoint directory. Objects are restored in place, tensors by copy and plain
        values replaced in ``app_state``; on any error nothing of ``app_state`` has changed.
        Collective: every rank calls it.
        """
        self._check_open()
        found = self._decide(lambda: self._resolve(which), f"load of {which!r}")
        if found is None:
            log.info(
                "[rank=%d] no committed checkpoint in %s: starting fresh",
                self.rank,
                self._layout.checkpoints_dir,
            )
            return None
        path, info_json = Path(found[0]), found[1]
        info = CheckpointInfo.from_marker(path, info_json)
        start = time.perf_counter()
        plan = self._everywhere(lambda: self._plan_load(app_state, path), f"load of {path}")
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
        plan.apply()
        if self.rank == 0:
            log.info(
                "[rank=0][step=%d] loaded %s (%s) in %.2f s",
                info.step,
                path,
                _fmt_bytes(info.bytes),
                time.perf_counter() - start,
            )
        return info

    def wait(self) -> None:
        """Block until every save in flight is committed (saves are in-line in this version)."""
        self._check_open()

    def close(self) -> None:
        """Flush, then release the writers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._comm.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ save

    def _save(
        self, step: int, app_state: Mapping[str, Any], epoch: int | None, metrics: dict[str, float]
    ) -> CheckpointInfo:
        start = time.perf_counter()
        cfg = self.config
        what = f"save of step {step}"
        saved = self._everywhere(
            lambda: state.build_save_state(
                app_state, rank=self.rank, world_size=self.world_size, capture_rng=cfg.capture_rng
            ),
            what,
        )
        shape = {k: v for k, v in saved.entries.items() if k != state.RNG_KEY}
        gathered = self._comm.all_gather((step, shape), what)
        self._decide(lambda: self._prepare(step, gathered), what)
        tmp = self._layout.tmp_dir(step)
        try:
            written = self._writer.write(saved.state_dict, tmp)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"{what} failed while writing {tmp} ({_summary(e)}); nothing was committed, "
                f"latest is still {self._latest_name()}"
            ) from e
        commit_start = time.perf_counter()
        info = self._decide(lambda: self._commit(step, epoch, metrics, saved.entries), what)
        self._entries = sorted([*self._entries, info], key=lambda c: c.step)
        now = time.perf_counter()
        stats = SaveStats(
            step=step,
            bytes=info.bytes,
            blocked_s=now - start,
            write_s=written.seconds,
            commit_s=now - commit_start,
            total_s=now - start,
        )
        self._stats.append(stats)
        if self.rank == 0:
            log.info(
                "[rank=0][step=%d] saved %s in %.2f s (%.2f GB/s), blocked %.0f ms",
                step,
                _fmt_bytes(stats.bytes),
                stats.total_s,
                stats.gbps,
                stats.blocked_s * 1e3,
            )
        return info

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
        self, step: int, epoch: int | None, metrics: dict[str, float], entries: dict[str, Any]
    ) -> CheckpointInfo:
        """Rank 0, after every rank's shards are durable: marker, rename, index, ``latest``."""
        fsync = self.config.fsync
        tmp, final = self._layout.tmp_dir(step), self._layout.step_dir(step)
        if not layout.dcp_metadata_path(tmp).is_file():
            missing = layout.DCP_METADATA_FILE
            raise CheckpointError(f"save of step {step}: DCP wrote no {missing} in {tmp}")
        marker = commit.build_marker(
            step=step,
            epoch=epoch,
            metrics=metrics,
            world_size=self.world_size,
            entries=entries,
            files=commit.file_sizes(tmp),
        )
        commit.write_marker(tmp, marker, fsync=fsync)
        commit.publish(tmp, final, fsync=fsync)
        # Committed from here on: the index and the alias are conveniences rebuilt at start.
        info = CheckpointInfo.from_marker(final, marker)
        entries_after = sorted([*self._entries, info], key=lambda c: c.step)
        try:
            index.write_index(self._layout, entries_after, fsync=fsync)
        except OSError as e:
            log.warning(
                "[step=%d] committed, but %s could not be updated (%s); it will be "
                "rebuilt from the markers",
                step,
                self._layout.index_path,
                e,
            )
        if entries_after[-1].step == step:
            commit.move_alias(self._layout.checkpoints_dir, "latest", final.name, fsync=fsync)
        return info

    # ------------------------------------------------------------------ load

    def _resolve(self, which: Which) -> tuple[str, dict[str, Any]] | None:
        """Rank 0: the checkpoint directory ``which`` names, and its marker; None if fresh."""
        if which in ("latest", "best"):
            committed = index.scan(self._layout).committed
            candidates = committed if which == "latest" else self._by_metric(committed)
            for info in reversed(candidates):
                try:
                    return str(info.path), commit.read_marker(info.path)
                except NotACheckpointError as e:
                    log.warning("skipping %s: %s", info.path, e)
            return None
        if isinstance(which, int) and not isinstance(which, bool):
            _check_step(which)
            path = self._layout.step_dir(which)
            if not path.exists():
                raise CheckpointNotFoundError(self._missing_step_message(which))
        elif isinstance(which, (str, os.PathLike)):
            path = Path(which)
            if not path.exists():
                raise CheckpointNotFoundError(f"checkpoint path {path} does not exist")
            path = path.resolve()
        else:
            raise TypeError(f"which must be 'latest', 'best', a step or a path, got {which!r}")
        info = index.inspect_checkpoint_dir(path)
        return str(path), commit.read_marker(info.path)

    def _by_metric(self, entries: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Entries with a finite ``monitor`` value, worst first (so the best is last)."""
        monitor = self.config.monitor
        if monitor is None:
            raise CheckpointError("which='best' needs CheckpointConfig.monitor (a metric name)")
        ranked = [e for e in entries if math.isfinite(e.metrics.get(monitor, math.nan))]
        if entries and not ranked:
            raise CheckpointError(
                f"no committed checkpoint in {self._layout.checkpoints_dir} has a finite "
                f"{monitor!r} metric; cannot pick the best"
            )
        sign = 1.0 if self.config.mode == "max" else -1.0
        return sorted(ranked, key=lambda e: (sign * e.metrics[monitor], e.step))

    def _missing_step_message(self, step: int) -> str:
        committed = [e.step for e in index.scan(self._layout).committed]
        tmp = self._layout.tmp_dir(step)
        latest = f"latest committed is step {committed[-1]}" if committed else "none is committed"
        if tmp.exists():
            return f"checkpoint {tmp} is incomplete (no {layout.MARKER_FILE} marker); {latest}"
        return f"no checkpoint for step {step} in {self._layout.checkpoints_dir}; {latest}"

    def _plan_load(self, app_state: dict[str, Any], path: Path) -> state.LoadPlan:
        marker = commit.read_marker(path)
        metadata = FileSystemReader(path).read_metadata()
        return state.build_load_plan(
            app_state,
            marker["entries"],
            metadata,
            rank=self.rank,
            restore_rng=self.config.capture_rng,
            where=str(path),
        )

    # ------------------------------------------------------------------ plumbing

    def _open_experiment(self) -> list[CheckpointInfo]:
        """Rank 0 at start: create the directories, reconcile the index with the markers."""
        self._layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        return index.reconcile(self._layout, fsync=self.config.fsync).committed

    def _decide(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        result: Any = None
        error: Exception | None = None
        if self._comm.is_coordinator:
            try:
                result = fn()
            except Exception as e:
                error = e
        if self._comm.distributed:
            payload = ("err", f"{type(error).__name__}: {error}") if error else ("ok", result)
            mine = payload if self._comm.is_coordinator else None
            kind, value = self._comm.broadcast(mine, what)
            if kind == "err" and error is None:
                raise CheckpointError(f"{what} failed on rank 0: {value}")
            result = value
        if error is not None:
            raise error
        return result

    def _everywhere(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if it fails on any, raise on all (before a collective)."""
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, e
        if self._comm.distributed:
            mine = None if error is None else f"{type(error).__name__}: {error}"
            errors = self._comm.all_gather(mine, what)
            bad = [(r, e) for r, e in enumerate(errors) if e is not None]
            if bad and error is None:
                raise CheckpointError(f"{what} failed on rank {bad[0][0]}: {bad[0][1]}")
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def _latest_name(self) -> str:
        return self._entries[-1].path.name if self._entries else "(none)"

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the CheckpointManager of {self.experiment_dir} is closed")


def _summary(e: BaseException) -> str:
    """One line per failed rank instead of DCP's concatenated tracebacks."""
    if isinstance(e, CheckpointException):
        return "; ".join(
            f"rank {r}: {type(f).__name__}: {f}" for r, f in sorted(e.failures.items())
        )
    return f"{type(e).__name__}: {e}"


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _default_name(config: CheckpointConfig) -> str:
    return f"{config.model_name}_{config.dataset_name}_{time.strftime('%Y%m%d_%H%M%S')}"


def _describe(entries: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v['kind']}" for k, v in sorted(entries.items())) + "}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


__all__ = ["CheckpointManager", "SaveStats"]
