"""The background thread of the async modes: one save in flight at a time, its error
kept for the caller (raised at the next ``save``, ``wait`` or ``close``)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .errors import CheckpointError
from .handles import SaveHandle

log = logging.getLogger(__name__)


class Worker:
    """One daemon thread running one job at a time; the job's error waits for the caller.

    A daemon thread, so a job stuck on a dead peer can never hold interpreter exit.
    """

    def __init__(self, name: str, budget_s: float) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._budget_s = budget_s
        self._error: BaseException | None = None
        self._handle: SaveHandle | None = None  # of the job in flight, or the last one
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None], handle: SaveHandle) -> None:
        assert not self.busy, "one job in flight at a time"
        self._idle.clear()
        self._handle = handle
        self._jobs.put(job)

    def wait(self, what: str) -> float:
        """Block until no job is in flight; the seconds waited. Bounded: every collective
        of a job is, so a job past the budget is a bug or a dead peer, raised as such."""
        if not self.busy:
            return 0.0
        start = time.perf_counter()
        if not self._idle.wait(self._budget_s):
            raise CheckpointError(
                f"{what}: the previous save is still in flight after {self._budget_s:.0f} s"
            )
        return time.perf_counter() - start

    def take_error(self) -> BaseException | None:
        """The last job's error, once; None if its handle already gave it to the caller."""
        error, self._error = self._error, None
        handle, self._handle = self._handle, None
        return None if handle is not None and handle.observed else error

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and give it ``timeout`` s; an idle worker ends at once."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as e:
                self._error = e
                log.error("background save failed: %s", e)
            finally:
                # Drop the job before waiting for the next one: it holds the staged
                # buffers, which ``close`` must be able to free.
                job = None
                self._idle.set()


__all__ = ["Worker"]
