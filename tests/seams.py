"""Faults injected through the engine's seams, as DCP's own tests do with a faulty storage
writer: a ``FaultyStorage`` handed to ``CheckpointManager(storage=...)`` (it travels to the
writer process, so everything here pickles) and phase hooks (``hook=``) that kill the
process between two steps of the commit. Nothing in ``dcp_engine/`` reads a fault
variable.

Waiting is on events: a ``Gate`` is a file that a write waits for (an event across the
processes of a job, writer processes included), opened by the test when it is ready.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcp_engine import LocalStorage
from dcp_engine.digests import HashingFileSystem, HashingStream
from dcp_engine.layout import parse_tmp_dirname

GATE_TIMEOUT_S = 120.0


class Gate:
    """A one-way event across processes: ``wait()`` returns once ``open()`` was called."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()

    def is_open(self) -> bool:
        return os.path.exists(self.path)

    def wait(self, timeout: float = GATE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_open():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {self.path} never opened")
            time.sleep(0.005)


class FaultyStorage(LocalStorage):
    """``LocalStorage`` with faults at the save of ``step`` (None: every save):

    - ``error``: an ``OSError`` with this errno (``errno.ENOSPC``...) raised by the first
      shard write past ``after_bytes`` bytes of that save, once (the disk is then freed);
    - ``kill_after_bytes``: SIGKILL of the writing process past that many bytes;
    - ``gate``: every shard file of that save waits for the gate before it is written,
      and ``started`` (a gate) is opened when the first one begins waiting;
    - ``free``: the free space the pre-save check sees, at most;
    - ``slow_s``: every shard file takes this long to write (a slow disk).
    """

    def __init__(
        self,
        *,
        step: int | None = None,
        error: int | None = None,
        after_bytes: int = 0,
        kill_after_bytes: int | None = None,
        gate: Gate | None = None,
        started: Gate | None = None,
        free: int | None = None,
        slow_s: float = 0.0,
    ) -> None:
        self.step, self.error, self.after_bytes = step, error, after_bytes
        self.kill_after_bytes, self.gate, self.started = kill_after_bytes, gate, started
        self.free, self.slow_s = free, slow_s
        self.fired = False
        self._written: dict[int | None, int] = {}

    def shard_filesystem(self, *, digests: bool = True, fsync: bool = True) -> HashingFileSystem:
        return FaultyFileSystem(self, digests, fsync)

    def free_bytes(self, path: Path) -> int:
        real = super().free_bytes(path)
        return real if self.free is None else min(real, self.free)

    def applies(self, step: int | None) -> bool:
        return self.step is None or step == self.step

    def wrote(self, step: int | None, n: int) -> None:
        """Account ``n`` bytes about to be written at the save of ``step``; fault past
        the budget."""
        if not self.applies(step):
            return
        total = self._written[step] = self._written.get(step, 0) + n
        if self.kill_after_bytes is not None and total > self.kill_after_bytes:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.error is not None and not self.fired and total > self.after_bytes:
            self.fired = True
            raise OSError(self.error, os.strerror(self.error))  # as the disk would


class FaultyStream(HashingStream):
    storage: FaultyStorage | None = None
    step: int | None = None

    def _raw_write(self, view: memoryview) -> int | None:
        if self.storage is not None:
            self.storage.wrote(self.step, len(view))
        return super()._raw_write(view)


class FaultyFileSystem(HashingFileSystem):
    stream_class = FaultyStream

    def __init__(self, storage: FaultyStorage, digests: bool, fsync: bool) -> None:
        super().__init__(storage, hashing=digests, fsync=fsync)
        self.storage: FaultyStorage = storage

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[Any, None, None]:
        step = parse_tmp_dirname(Path(path).parent.name)
        writing = "w" in mode and self.storage.applies(step)
        if writing and self.storage.gate is not None:
            if self.storage.started is not None:
                self.storage.started.open()
            self.storage.gate.wait()
        if writing and self.storage.slow_s:
            time.sleep(self.storage.slow_s)  # the disk, not a wait for another process
        with super().create_stream(path, mode) as stream:
            if writing and isinstance(stream, FaultyStream):
                stream.storage, stream.step = self.storage, step
            yield stream


class KillAt:
    """A phase hook: SIGKILL this process at ``phase`` of the save of ``step``."""

    def __init__(self, phase: str, step: int | None = None) -> None:
        self.phase, self.step = phase, step

    def __call__(self, phase: str, step: int) -> None:
        if phase == self.phase and (self.step is None or step == self.step):
            os.kill(os.getpid(), signal.SIGKILL)


def no_hook(phase: str, step: int) -> None:
    """The engine's default phase hook."""


ENOSPC, EIO, EACCES = errno.ENOSPC, errno.EIO, errno.EACCES
