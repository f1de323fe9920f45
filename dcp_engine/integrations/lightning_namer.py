"""Rank 0's name keeper for the Lightning integration: one thread, changes in order.

Invariants:
- a name file is written only after its checkpoint committed, and a name moves to a new
  step (``last.ckpt``) only then, so ``last.ckpt`` always names a committed checkpoint;
- a removal waits for the save that was in flight when Lightning asked for it, so a
  checkpoint is never handed to retention before its replacement exists (and never while
  in flight itself); if that save failed, nothing is removed;
- a checkpoint is handed to retention (``discard``) only when no name is left on it; the
  names of each checkpoint are kept in its marker, so this holds across restarts;
- after a failure (a name file that cannot be written) nothing more is changed: the
  error is raised at the next save or at ``teardown``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from ..index import CheckpointInfo
from ..manager import CheckpointManager
from . import lightning_names as names
from .lightning_payload import Overrides

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Named:
    name: str
    step: int
    gate: Future[Any] | None
    overrides: Overrides
    new: bool
    """The first name of a new save (the save's marker lists it already)."""


@dataclass(frozen=True)
class _Removed:
    name: str
    gate: Future[Any] | None


class Namer:
    """The names of one manager's checkpoints (rank 0), changed by one thread."""

    def __init__(self, manager: CheckpointManager, *, fsync: bool) -> None:
        self._mgr, self._fsync = manager, fsync
        self._experiment = names.normalize(str(manager.experiment_dir))
        self._steps: dict[int, list[str]] = {}  # the names each marker lists
        self._owner: dict[str, int] = {}  # the step each name file points at
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Named | _Removed | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dcp_engine_names", daemon=True)
        self._thread.start()

    def adopt(self, entries: Iterable[CheckpointInfo]) -> None:
        """The names the experiment's markers list (a restart). A name listed on two
        steps (a crash between a commit and the move of its name) stays with the newer;
        a checkpoint left without names goes to retention."""
        for info in sorted(entries, key=lambda e: e.step):
            listed = info.extra.get(names.NAMES_KEY)
            if isinstance(listed, list):
                self._steps[info.step] = [str(n) for n in listed]
                self._owner.update({str(n): info.step for n in listed})
        for step, listed in list(self._steps.items()):
            if not listed:
                self._mgr.discard(step)
            for name in [n for n in listed if self._owner[n] != step]:
                self._drop(name, step)

    # ------------------------------------------------------------------ requests

    def named(
        self, name: str, step: int, gate: Future[Any] | None, overrides: Overrides, *, new: bool
    ) -> None:
        """``name`` points at ``step`` once ``gate`` (its save) has committed."""
        self._queue.put(_Named(name, step, gate, overrides, new))

    def removed(self, name: str, gate: Future[Any] | None) -> None:
        """``name`` goes once ``gate`` (the save in flight) has committed."""
        self._queue.put(_Removed(name, gate))

    def check(self) -> None:
        """Raise the failure of the thread, if any."""
        if self._error is not None:
            raise CheckpointError(f"naming Lightning checkpoints failed: {self._error}") from (
                self._error
            )

    def stop(self) -> None:
        """Apply everything requested so far, end the thread, raise its failure."""
        self._queue.put(None)
        self._thread.join()
        self.check()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            if self._error is not None:
                continue  # names stay as they are: nothing is deleted after a failure
            try:
                if isinstance(op, _Named):
                    self._name(op)
                else:
                    self._remove(op)
            except Exception as e:
                log.error("naming Lightning checkpoints: %s failed: %s", op.name, e)
                self._error = e

    def _name(self, op: _Named) -> None:
        if not _committed(op.gate):
            return  # the save failed: the engine raises it; no name for it
        with self._lock:
            listed = self._steps.setdefault(op.step, [])
            added = op.name not in listed
            if added:
                listed.append(op.name)
            now = list(listed)
        if added and not op.new:
            self._persist(op.step, now)
        ref = names.NameFile(self._experiment, op.step, op.overrides)
        names.write(op.name, ref, fsync=self._fsync)
        with self._lock:
            old = self._owner.get(op.name)
            self._owner[op.name] = op.step
        if old is not None and old != op.step:
            self._drop(op.name, old)

    def _remove(self, op: _Removed) -> None:
        if not _committed(op.gate):
            log.warning("keeping %s: the save Lightning removed it after has failed", op.name)
            return
        if names.is_link(op.name):  # save_last="link": only the link goes
            names.remove(op.name)
            return
        with self._lock:
            step = self._owner.pop(op.name, None)
        if step is None:
            ref = _read_or_none(op.name)
            if ref is not None and names.normalize(ref.experiment) == self._experiment:
                step = ref.step
        names.remove(op.name)
        if step is None:
            log.info("removed %s; its checkpoint is not this run's to delete", op.name)
            return
        self._drop(op.name, step)

    def _drop(self, name: str, step: int) -> None:
        """``name`` no longer points at ``step``; the checkpoint goes when none does."""
        with self._lock:
            listed = self._steps.get(step)
            if listed is None or name not in listed:
                return
            listed.remove(name)
            left = list(listed)
        self._persist(step, left)
        if not left:
            log.info("step %d has no name left: handed to retention", step)
            self._mgr.discard(step)

    def _persist(self, step: int, listed: list[str]) -> None:
        self._mgr.update_metrics(step, {}, extra={names.NAMES_KEY: listed})


def _committed(gate: Future[Any] | None) -> bool:
    """Whether the save ``gate`` stands for committed (waits for it). Reads the outcome
    through ``Future``'s own method: the engine's future would otherwise count the error
    as seen by the caller, and not raise it at the next save."""
    if gate is None:
        return True
    wait([gate])
    return not gate.cancelled() and Future.exception(gate, 0) is None


def _read_or_none(path: str) -> names.NameFile | None:
    try:
        return names.read(path)
    except (OSError, CheckpointError):
        return None


__all__ = ["Namer"]
