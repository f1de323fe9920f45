"""Preemption (``save_on_sigterm``): the SIGTERM a scheduler sends before it kills a job.

The first SIGTERM is only noted (``SigtermWatch``); the callbacks' next step end agrees on
it with every rank, saves, waits for the commit, closes the manager and raises
``Preempted``: a ``SystemExit``, so the program's ``finally`` blocks, context managers and
``atexit`` handlers run as it unwinds, and the process exits with ``128 + signum``. A
second SIGTERM ends the process at once, by the signal (nothing of Python runs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised by ``on_step_end`` after a SIGTERM (``save_on_sigterm``), once the step is
    committed and the manager closed: ``finally`` blocks, context managers and ``atexit``
    handlers run as it unwinds, and the process exits with ``128 + signum`` (143), as a
    process ended by the signal is reported. ``step``: the step saved."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"preempted by signal {self.signum}: step {self.step} is committed"


class SigtermWatch:
    """A SIGTERM handler of this process while installed: ``signum`` is the first signal
    seen (0: none); a second one ends the process at once, by the signal."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("save_on_sigterm needs on_train_start on the main thread")
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        log.warning("signal %d: saving at the next step end, then raising Preempted "
                    "(send it again to end at once)", signum)  # fmt: skip

    def uninstall(self) -> None:
        """The handler from before ``install`` again (idempotent)."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed, self._previous = False, None


__all__ = ["Preempted", "SigtermWatch"]
