"""Rank 0's garbage collector: applies the retention policy after each commit, in a
background thread, so that deleting old checkpoints never holds training or a save.

Order of a collection (invariant 2): the policy picks from committed entries only; the
doomed entries leave the index first (``forget``), then each directory is retired
(``commit.retire``: rename to ``.tmp``, fsync, delete). A checkpoint that is already gone
is skipped; an error is logged and the next commit tries again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from . import commit, layout
from .index import CheckpointInfo
from .retention import RetentionPolicy

log = logging.getLogger(__name__)


class Collector:
    """One daemon thread; ``poke()`` after a commit, ``flush()`` to wait for it to be done."""

    def __init__(
        self,
        exp: layout.ExperimentLayout,
        policy: RetentionPolicy,
        *,
        entries: Callable[[], Sequence[CheckpointInfo]],
        protected: Callable[[], set[int]],
        forget: Callable[[list[int]], None],
        fsync: bool,
    ) -> None:
        self._exp, self._policy, self._fsync = exp, policy, fsync
        self._entries, self._protected, self._forget = entries, protected, forget
        self._cond = threading.Condition()
        self._dirty = False  # a commit happened since the last collection started
        self._running = False
        self._stopped = False
        self.deleted: list[int] = []  # steps deleted by this collector, in order
        self._thread = threading.Thread(target=self._run, name="dcp_engine_gc", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """True once no collection is pending or running (False if ``timeout`` ran out)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._running, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the pending collection, then end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopped)
                if self._stopped and not self._dirty:
                    return
                self._dirty, self._running = False, True
            try:
                self.collect()
            except Exception as e:  # never let a deletion problem fail training
                log.error("garbage collection in %s failed: %s", self._exp.checkpoints_dir, e)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def collect(self) -> list[int]:
        """One collection now, in the caller's thread; the steps it deleted."""
        entries = list(self._entries())
        doomed = self._policy.to_delete(entries, self._protected())
        if not doomed:
            return []
        deleted = delete(self._exp, doomed, forget=self._forget, fsync=self._fsync)
        self.deleted.extend(deleted)
        return deleted


def delete(
    exp: layout.ExperimentLayout,
    steps: list[int],
    *,
    forget: Callable[[list[int]], None],
    fsync: bool,
) -> list[int]:
    """Delete committed ``steps`` in the order above: ``forget`` takes them out of the
    index first, then each directory is retired. The steps deleted (one already gone is
    skipped)."""
    forget(steps)
    deleted = []
    for step in steps:
        if commit.retire(exp, step, fsync=fsync):
            deleted.append(step)
        else:
            log.info("step %d was already gone from %s", step, exp.checkpoints_dir)
    if deleted:
        log.info("retention: deleted %s", ", ".join(layout.step_dirname(s) for s in deleted))
    return deleted
