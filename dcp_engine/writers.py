"""Where the shard bytes are written.

A writer takes a state and a ``.tmp`` directory and returns once every rank's shards are
written and fsynced and rank 0 has written DCP's ``.metadata``. It does not commit: the
manager does that after the writer returns (``commit.py``).

- ``InlineWriter`` (``async_mode="off"``): ``dcp.save`` of the live state on the caller's
  thread.
- ``ThreadWriter`` (``"thread"``): ``dcp.save`` of a staged state (``staging.py``) on the
  manager's background thread, over the manager's I/O side group.
- ``ProcessWriter`` (``"process"``): a persistent writer process per rank, started once,
  reading the staging buffers from shared memory (sent once, by handle) and joined to the
  other ranks' writers by a gloo group of their own, so the write never holds the
  training's GIL. Per save only the write items and the small non-tensor values cross
  the pipe.

``Worker`` is the background thread: one job in flight, its error kept for the caller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing.connection
import os
import queue
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from . import faults, layout
from .comm import Comm
from .digests import HashingFileSystem
from .errors import CheckpointError
from .staging import StagedSavePlanner, StagedState

log = logging.getLogger(__name__)

SLOW_WRITE_ENV = "DCP_ENGINE_SLOW_WRITE_S"
"""Fault injection for tests: seconds every write sleeps before writing (a slow disk)."""


@dataclass(frozen=True)
class WriteResult:
    seconds: float
    """Wall time of the DCP save on this rank (planning, writing, fsync, .metadata)."""
    digests: dict[str, dict[str, Any]]
    """This rank's files: name -> size and digest, computed while writing."""


@dataclass(frozen=True)
class WriteOptions:
    fsync: bool = True
    """fsync every shard file (DCP ``sync_files``)."""
    threads: int = 1
    """Threads per rank writing shard files (DCP ``thread_count``)."""
    digests: bool = True
    """Hash every file while writing it (``digests.py``)."""


class ShardWriter(Protocol):
    def write(self, state: Any, directory: Path) -> WriteResult: ...

    def close(self) -> None: ...


def _injected_delay() -> None:
    delay = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _fs_writer(directory: Path | str, opts: WriteOptions) -> FileSystemWriter:
    """DCP's file-system writer; with ``opts.digests`` it hashes every file it writes
    (``writer.fs.digests``)."""
    writer = FileSystemWriter(
        directory, sync_files=opts.fsync, thread_count=opts.threads, overwrite=True
    )
    if opts.digests or faults.active():
        writer.fs = HashingFileSystem()
    step = layout.parse_tmp_dirname(Path(directory).name)
    faults.set_context(step=-1 if step is None else step)
    return writer


class InlineWriter:
    """Writes the live state on the calling thread through ``dcp.save``."""

    def __init__(self, comm: Comm, opts: WriteOptions) -> None:
        self._comm, self._opts = comm, opts

    def write(self, state: dict[str, Any], directory: Path) -> WriteResult:
        start = time.perf_counter()
        _injected_delay()
        # DCP's own collectives (plan gather, write-result gather, finish) run on the side
        # group, whose timeout bounds them: a rank that never arrives fails every rank.
        writer = _fs_writer(directory, self._opts)
        with self._comm.dcp_call():
            dcp.save(
                state,
                storage_writer=writer,
                process_group=self._comm.group,
                no_dist=not self._comm.distributed,
            )
        return WriteResult(time.perf_counter() - start, _digests_of(writer))

    def close(self) -> None:
        pass


def save_staged(
    staged: StagedState, directory: Path | str, *, group: Any, opts: WriteOptions
) -> dict[str, dict[str, Any]]:
    """``dcp.save`` of a staged state (the same call in a thread and in a writer process);
    the digests of the files this rank wrote."""
    no_dist = group is None and not dist.is_initialized()
    writer = _fs_writer(directory, opts)
    with warnings.catch_warnings():
        if no_dist:  # one rank: exactly the intent DCP warns that it assumes
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            staged.values,
            storage_writer=writer,
            planner=StagedSavePlanner(staged.items, staged.mappings),
            process_group=group,
            no_dist=no_dist,
        )
    return _digests_of(writer)


def _digests_of(writer: FileSystemWriter) -> dict[str, dict[str, Any]]:
    fs = writer.fs
    return dict(fs.digests) if isinstance(fs, HashingFileSystem) else {}


class ThreadWriter:
    """Writes a staged state on the calling (background) thread over the I/O side group."""

    def __init__(self, io_comm: Comm, opts: WriteOptions) -> None:
        self._comm, self._opts = io_comm, opts

    def write(self, state: StagedState, directory: Path) -> WriteResult:
        start = time.perf_counter()
        _injected_delay()
        with self._comm.dcp_call():
            digests = save_staged(state, directory, group=self._comm.group, opts=self._opts)
        return WriteResult(time.perf_counter() - start, digests)

    def close(self) -> None:
        pass


class ProcessWriter:
    """A persistent writer process for this rank. Constructed collectively (rendezvous)."""

    def __init__(self, comm: Comm, opts: WriteOptions, *, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._opts = opts
        self._sent_generation = -1  # the pool layout whose buffers the writer holds
        self._store: Any = None
        host = os.environ.get("MASTER_ADDR", "127.0.0.1") if comm.distributed else "127.0.0.1"
        if comm.is_coordinator:
            # The writers' rendezvous store lives in rank 0's training process.
            self._store = dist.TCPStore(
                host, 0, is_master=True, wait_for_workers=False,
                timeout=dt.timedelta(seconds=timeout_s),
            )  # fmt: skip
            address = (host, self._store.port, f"dcp_engine_writers/{os.getpid()}/{time.time_ns()}")
        else:
            address = None
        address = comm.broadcast(address, "starting the writer processes")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_writer_main,
            args=(child, comm.rank, comm.world_size, address, timeout_s),
            name=f"dcp_engine_writer_rank{comm.rank}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._expect("ready", "starting")

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def write(self, state: StagedState, directory: Path) -> WriteResult:
        start = time.perf_counter()
        # The staged tensors are the pool's shared-memory buffers: their handles go to the
        # writer once per pool layout, never their bytes.
        buffers = {k: v for k, v in state.values.items() if isinstance(v, torch.Tensor)}
        if state.generation != self._sent_generation:
            self._send(("buffers", buffers))
            self._sent_generation = state.generation
        small = {k: v for k, v in state.values.items() if k not in buffers}
        self._send(("save", str(directory), state.items, small, state.mappings, self._opts))
        digests = self._expect("done", f"writing {directory}")
        return WriteResult(time.perf_counter() - start, digests)

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            raise CheckpointError(f"the writer process ({self._describe()}) is gone: {e}") from e

    def _expect(self, what: str, doing: str) -> Any:
        """The writer's answer; bounded by timeout_s, and by the writer's life."""
        deadline = time.monotonic() + self._timeout_s + 30
        while not self._conn.poll(0.2):
            if not self._proc.is_alive():
                raise CheckpointError(f"the writer process died while {doing} ({self._describe()})")
            if time.monotonic() > deadline:
                raise CheckpointError(f"the writer process did not answer within "
                                      f"{self._timeout_s:.0f} s while {doing}")  # fmt: skip
        try:
            kind, payload = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError) as e:
            raise CheckpointError(
                f"the writer process died while {doing} ({self._describe()})"
            ) from e
        if kind == "error":
            raise CheckpointError(f"the writer process failed while {doing}: {payload}")
        if kind != what:
            raise CheckpointError(f"the writer process answered {kind!r} while {doing}")
        return payload

    def _describe(self) -> str:
        code = self._proc.exitcode
        return f"pid {self._proc.pid}, " + ("alive" if code is None else f"exit code {code}")

    def close(self) -> None:
        """Stop the writer; kill it if it does not stop. Never raises."""
        if self._proc.is_alive():
            with contextlib.suppress(Exception):
                self._conn.send(("stop",))
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._store = None


def _writer_main(
    conn: multiprocessing.connection.Connection,
    rank: int,
    world_size: int,
    address: tuple[str, int, str],
    timeout_s: float,
) -> None:
    """The writer process: join the other writers, then write what the trainer stages."""
    torch.set_num_threads(1)
    faults.set_context(rank=rank)
    # DCP writes each tensor with torch.save, which by default computes a CRC32 of every
    # record that no reader checks (torch's miniz is built without read-side CRC checks):
    # about a quarter of the write's CPU time here. This process is ours, so the global
    # switch is safe; thread mode leaves the trainer's setting alone.
    if hasattr(torch.serialization, "set_crc32_options"):
        torch.serialization.set_crc32_options(False)
    host, port, prefix = address
    timeout = dt.timedelta(seconds=timeout_s)
    try:
        if world_size > 1:
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
            dist.init_process_group(
                "gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                world_size=world_size, timeout=timeout,
            )  # fmt: skip
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=3)))
        return
    buffers: dict[str, torch.Tensor] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the trainer is gone
            break
        if msg[0] == "stop":
            break
        if msg[0] == "buffers":
            buffers = msg[1]
            continue
        _, directory, items, small, mappings, opts = msg
        try:
            _injected_delay()
            staged = StagedState({**buffers, **small}, items, mappings)
            digests = save_staged(staged, directory, group=None, opts=opts)
            conn.send(("done", digests))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            conn.send(("error", f"{type(e).__name__}: {e}"[:4000]))
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class Worker:
    """One daemon thread running one job at a time; the job's error waits for the caller.

    A daemon thread, so a job stuck on a dead peer can never hold interpreter exit.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None]) -> None:
        assert not self.busy, "one job in flight at a time"
        self._idle.clear()
        self._jobs.put(job)

    def wait(self, timeout: float) -> bool:
        """True once no job is in flight (False if ``timeout`` ran out first)."""
        return self._idle.wait(timeout)

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

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
