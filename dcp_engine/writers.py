"""Where the shard bytes are written: one rank's share of a save into its file(s).

A writer takes a ``RankWrite`` (the rank's final DCP write items as plain entries, its
serialised non-tensor values and the ``.tmp`` directory) and returns once the rank's
files are written and fsynced, with every item's place and every file's digest. It
neither plans nor commits: ``shards.py`` plans and gathers, ``saving.py`` commits.

- ``LocalWriter`` (``async_mode="off"`` and ``"thread"``): on the calling thread (the
  caller's, or the manager's background thread), from the live tensors or the staging
  buffers.
- ``ProcessWriter`` (``"process"``): a writer process per rank, its own interpreter
  (``python -m dcp_engine.writer_process``: the training script is never re-imported, so
  a script without a ``__main__`` guard works), started in the background when the
  manager is built; the first save waits for it only if it is not ready yet. It maps the
  staging pool's shared memory by name (once per pool layout), so per save only the
  write items and the small serialised values cross the pipe, and the write never holds
  the training's GIL. It takes part in no collective: the trainer's background thread
  does the gathering. After a failed save it is started afresh (``renew``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import native
from .errors import CheckpointError
from .location import Location
from .native import Entry, FileWritten, Place, to_dtype
from .storage import Storage
from .units import fmt_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteOptions:
    fsync: bool = True
    """fsync every shard file."""
    threads: int = 1
    """Files (and threads) per rank: the items are split among them by size."""
    digests: bool = True
    """Hash every file while writing it (``digests.py``)."""


@dataclass(frozen=True)
class RankWrite:
    """One rank's share of a save (plain data: it crosses the pipe to a writer process)."""

    directory: Location
    rank: int
    entries: list[Entry]
    """The rank's final write items (after DCP's global planning), as ``native.Entry``."""
    blobs: dict[int, bytes]
    """Position in ``entries`` -> the serialised bytes of each non-tensor item."""
    needed: int
    """The bytes this rank writes (for a full disk's message)."""


@dataclass(frozen=True)
class RankWritten:
    places: list[Place]
    """Where each entry went (``native.Place``), in the order of ``RankWrite.entries``."""
    files: list[FileWritten]
    """Every file this rank wrote, with its size and digest."""
    seconds: float


TensorOf = Callable[[int], torch.Tensor | memoryview]
"""An entry's tensor, or the bytes of a staging buffer holding exactly its chunk."""


@dataclass(frozen=True)
class Source:
    """Where a rank's tensors are: ``tensor_of`` in this process; in process mode the
    staging pool's shared memory (``shared``: its name and layout, ``generation``)."""

    tensor_of: TensorOf
    shared: Any = None
    generation: int = -1


class ShardWriter(Protocol):
    def write(self, job: RankWrite, source: Source) -> RankWritten: ...

    def renew(self) -> None:
        """After a failed save: whatever the failure may have broken."""

    def close(self) -> None: ...


def split(entries: list[Entry], n: int) -> list[list[int]]:
    """Positions of the entries among ``n`` files, balanced by size (serialised values
    round robin)."""
    if n <= 1 or len(entries) <= 1:
        return [list(range(len(entries)))]
    buckets: list[list[int]] = [[] for _ in range(n)]
    sizes = [0] * n
    for pos, (_, dtype, shape) in enumerate(entries):
        if not dtype:
            buckets[pos % n].append(pos)
            continue
        k = sizes.index(min(sizes))
        buckets[k].append(pos)
        sizes[k] += torch.Size(shape).numel() * to_dtype(dtype).itemsize
    return [b for b in buckets if b]


def write_rank(
    job: RankWrite, tensor_of: TensorOf, storage: Storage, opts: WriteOptions
) -> RankWritten:
    """Write one rank's share (on this thread, or ``opts.threads`` threads)."""
    start = time.perf_counter()
    fs = storage.shard_filesystem(digests=opts.digests, fsync=opts.fsync)

    def data_of(pos: int) -> Any:
        blob = job.blobs.get(pos)
        return blob if blob is not None else tensor_of(pos)

    def one(k: int, positions: list[int]) -> tuple[list[tuple[int, Place]], FileWritten]:
        name = native.shard_name(job.rank, k)
        return native.write_rank_file(fs, job.directory, name, positions, job.entries, data_of)

    buckets = split(job.entries, opts.threads)
    try:
        if len(buckets) == 1:
            done = [one(0, buckets[0])]
        else:
            with ThreadPoolExecutor(len(buckets), thread_name_prefix="dcp_engine_write") as ex:
                done = list(ex.map(one, range(len(buckets)), buckets))
    except OSError as e:
        raise root_cause(e, storage, job) from e
    places: list[Place] = [("", 0, 0)] * len(job.entries)
    for placed, _ in done:
        for pos, place in placed:
            places[pos] = place
    return RankWritten(places, [f for _, f in done], time.perf_counter() - start)


def root_cause(e: OSError, storage: Storage, job: RankWrite) -> OSError:
    """The OS error of a failed write, naming the directory; a full disk with the space
    the rank needed and what is free."""
    text = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        try:
            free = storage.free_bytes(job.directory.parent)
        except OSError:
            free = -1
        text += f": needed {fmt_bytes(job.needed)}, free {fmt_bytes(free) if free >= 0 else '?'}"
    return OSError(e.errno, f"{text} (writing {job.directory})")


def summary(e: BaseException) -> str:
    """One line per failed rank instead of DCP's concatenated tracebacks."""
    if isinstance(e, CheckpointException):
        parts = []
        for r, failure in sorted(e.failures.items()):
            # (exception, frames) in recent torch, the exception alone in older ones
            f: Any = failure[0] if isinstance(failure, tuple) and failure else failure
            parts.append(f"rank {r}: {type(f).__name__}: {f}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


class LocalWriter:
    """Writes on the calling thread (the caller's in ``"off"``, the background's in
    ``"thread"``)."""

    def __init__(self, opts: WriteOptions, storage: Storage) -> None:
        self._opts, self._storage = opts, storage

    def write(self, job: RankWrite, source: Source) -> RankWritten:
        return write_rank(job, source.tensor_of, self._storage, self._opts)

    def renew(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessWriter:
    """This rank's writer process, started in the background at construction."""

    def __init__(self, opts: WriteOptions, storage: Storage, *, timeout_s: float) -> None:
        self._opts, self._storage, self._timeout_s = opts, storage, timeout_s
        self._start()

    def _start(self) -> None:
        self._ready = False
        self._sent_generation = -1  # the pool layout whose buffers the writer maps
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        # Whatever this process can import (the storage class of a test, say), the writer
        # can: it unpickles the storage. The training script itself is never imported.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dcp_engine.writer_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        theirs.close()
        self._conn = Connection(mine.detach())
        self._send(("storage", self._storage))

    def renew(self) -> None:
        """A new writer process: the old one may still be in a write whose reply would be
        taken for the next save's."""
        self.close()
        self._start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def write(self, job: RankWrite, source: Source) -> RankWritten:
        """Write ``job`` from the staging pool's shared memory (its name and layout sent
        once per pool layout)."""
        if source.shared is None:
            raise CheckpointError("a writer process writes from shared staging buffers only")
        if not self._ready:
            self._expect("ready", "starting")
            self._ready = True
        if source.generation != self._sent_generation:
            self._send(("buffers", source.shared))
            self._sent_generation = source.generation
        self._send(("write", job, self._opts))
        written: RankWritten = self._expect("done", f"writing {job.directory}")
        return written

    def unmap(self) -> None:
        """Make the writer drop its mapping of the staging segment (before the pool is
        rebuilt: the old and the new segment never take shared memory together)."""
        if self._sent_generation < 0:
            return  # it maps nothing
        self._send(("unmap",))
        self._expect("unmapped", "unmapping the staging segment")
        self._sent_generation = -1

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            raise CheckpointError(f"the writer process ({self._describe()}) is gone: {e}") from e

    def _expect(self, what: str, doing: str) -> Any:
        """The writer's answer; bounded by timeout_s, and by the writer's life."""
        deadline = time.monotonic() + self._timeout_s + 30
        while not self._conn.poll(0.2):
            if self._proc.poll() is not None:
                raise CheckpointError(f"the writer process died while {doing} ({self._describe()})")
            if time.monotonic() > deadline:
                raise CheckpointError(f"the writer process did not answer within "
                                      f"{self._timeout_s + 30:.0f} s while {doing}")  # fmt: skip
        try:
            kind, payload = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError) as e:
            raise CheckpointError(
                f"the writer process died while {doing} ({self._describe()})"
            ) from e
        if kind == "error":
            code, text = payload
            if code is not None:  # an OS error: the same errno, for the caller
                raise OSError(code, text)
            raise CheckpointError(f"the writer process failed while {doing}: {text}")
        if kind != what:
            raise CheckpointError(f"the writer process answered {kind!r} while {doing}")
        return payload

    def _describe(self) -> str:
        code = self._proc.poll()
        return f"pid {self._proc.pid}, " + ("alive" if code is None else f"exit code {code}")

    def close(self) -> None:
        """Stop the writer without waiting for its interpreter to tear down: it unmaps the
        staging segment and says so (waited for 5 s at most), then it is killed if it
        has not exited. A writer stuck in a write (``renew`` after a failure) is killed
        in it; its mapping of the segment then lasts until this process exits. Never
        raises."""
        with contextlib.suppress(Exception):
            self._conn.send(("stop",))
            # It unmaps the staging segment, says so, then tears its interpreter down:
            # only the first part is waited for.
            deadline = time.monotonic() + 5.0  # milliseconds, unless the machine is swamped
            while self._proc.poll() is None and time.monotonic() < deadline:
                if self._conn.poll(0.02) and self._conn.recv()[0] == "stopped":
                    break
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.05)
        if self._proc.poll() is None:
            self._proc.kill()  # past its unmapping (or stuck): nothing it holds is needed
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)


__all__ = ["LocalWriter", "ProcessWriter", "RankWrite", "RankWritten", "Source", "WriteOptions"]
