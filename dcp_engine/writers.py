"""Where the shard bytes are written.

A writer takes a state and a ``.tmp`` directory and returns once every rank's shards are
written and fsynced and rank 0 has written DCP's ``.metadata``. It does not commit: the
save pipeline does that after the writer returns (``saving.py``, ``committer.py``).

- ``InlineWriter`` (``async_mode="off"``): ``dcp.save`` of the live state on the caller's
  thread.
- ``ThreadWriter`` (``"thread"``): ``dcp.save`` of a staged state (``staging.py``) on the
  manager's background thread, over the manager's I/O side group.
- ``ProcessWriter`` (``"process"``): a persistent writer process per rank, started once,
  reading the staging buffers from shared memory (sent once, by handle) and joined to the
  other ranks' writers by a gloo group of their own, so the write never holds the
  training's GIL. Per save only the write items and the small non-tensor values cross
  the pipe. After a failed save the writers are started afresh (``renew``), so neither a
  late reply nor a broken writer group outlives the failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from .comm import Comm, quiet_dcp
from .digests import HashingFileSystem
from .errors import CheckpointError
from .staging import StagedSavePlanner, StagedState
from .storage import LocalStorage

log = logging.getLogger(__name__)


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

    def renew(self) -> None:
        """After a failed save, collectively: whatever the failure may have broken."""

    def close(self) -> None: ...


def _fs_writer(
    directory: Path | str, opts: WriteOptions, storage: LocalStorage
) -> tuple[FileSystemWriter, HashingFileSystem]:
    """DCP's file-system writer over the storage's shard file system, which sizes (and
    with ``opts.digests`` hashes) every file and keeps the OS errors of its writes."""
    writer = FileSystemWriter(
        directory, sync_files=opts.fsync, thread_count=opts.threads, overwrite=True
    )
    fs = storage.shard_filesystem(digests=opts.digests)
    writer.fs = fs
    return writer, fs


def _root_cause(
    error: BaseException, fs: HashingFileSystem, storage: LocalStorage, directory: Path | str,
    needed: int,
) -> BaseException:  # fmt: skip
    """The OS error a failed write met (torch.save reports it as "unexpected pos"), with
    the space it needed and what is free; ``error`` itself when no write failed."""
    if not fs.errors:
        return error
    os_error = fs.errors[0]
    text = os_error.strerror or str(os_error)
    if os_error.errno == errno.ENOSPC:
        try:
            free = storage.free_bytes(Path(directory).parent)
        except OSError:
            free = -1
        text += f": needed {fmt_bytes(needed)}, free {fmt_bytes(free) if free >= 0 else '?'}"
    return OSError(os_error.errno, f"{text} (writing {directory})")


def fmt_bytes(n: float) -> str:
    """``512 B``, ``12.0 MiB``, ``1.5 TiB``: for messages, logs and the command line."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tensor_bytes(values: Any) -> int:
    """The bytes of the tensors of a (nested) state: what a write of it needs at least."""
    if isinstance(values, torch.Tensor):
        local = values.to_local() if hasattr(values, "to_local") else values
        return int(local.numel() * local.element_size())
    if isinstance(values, dict):
        return sum(tensor_bytes(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return sum(tensor_bytes(v) for v in values)
    return 0


def relayed(e: BaseException, rank: int) -> bool:
    """Whether ``e`` only relays another rank's failure (DCP tells every rank of every
    failure): that rank's own error names the cause."""
    if isinstance(e, CheckpointException):
        return rank not in e.failures
    return bool(getattr(e, "relayed", False))


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


class InlineWriter:
    """Writes the live state on the calling thread through ``dcp.save``."""

    def __init__(self, comm: Comm, opts: WriteOptions, storage: LocalStorage) -> None:
        self._comm, self._opts, self._storage = comm, opts, storage

    def write(self, state: dict[str, Any], directory: Path) -> WriteResult:
        start = time.perf_counter()
        # DCP's own collectives (plan gather, write-result gather, finish) run on the side
        # group, whose timeout bounds them: a rank that never arrives fails every rank.
        writer, fs = _fs_writer(directory, self._opts, self._storage)
        try:
            with self._comm.dcp_call():
                dcp.save(
                    state,
                    storage_writer=writer,
                    process_group=self._comm.group,
                    no_dist=not self._comm.distributed,
                )
        except BaseException as e:
            cause = _root_cause(e, fs, self._storage, directory, tensor_bytes(state))
            if cause is e:
                raise
            raise cause from e
        return WriteResult(time.perf_counter() - start, dict(fs.digests))

    def renew(self) -> None:
        pass  # the side group it writes on is the pipeline's, renewed there

    def close(self) -> None:
        pass


def save_staged(
    staged: StagedState,
    directory: Path | str,
    *,
    group: Any,
    opts: WriteOptions,
    storage: LocalStorage,
) -> dict[str, dict[str, Any]]:
    """``dcp.save`` of a staged state (the same call in a thread and in a writer process);
    the digests of the files this rank wrote."""
    no_dist = group is None and not dist.is_initialized()
    writer, fs = _fs_writer(directory, opts, storage)
    try:
        with quiet_dcp(no_dist):
            dcp.save(
                staged.values,
                storage_writer=writer,
                planner=StagedSavePlanner(staged.items, staged.mappings),
                process_group=group,
                no_dist=no_dist,
            )
    except BaseException as e:
        cause = _root_cause(e, fs, storage, directory, tensor_bytes(staged.values))
        if cause is e:
            raise
        raise cause from e
    return dict(fs.digests)


class ThreadWriter:
    """Writes a staged state on the calling (background) thread over the I/O side group."""

    def __init__(self, io_comm: Comm, opts: WriteOptions, storage: LocalStorage) -> None:
        self._comm, self._opts, self._storage = io_comm, opts, storage

    def write(self, state: StagedState, directory: Path) -> WriteResult:
        start = time.perf_counter()
        with self._comm.dcp_call():
            digests = save_staged(state, directory, group=self._comm.group, opts=self._opts,
                                  storage=self._storage)  # fmt: skip
        return WriteResult(time.perf_counter() - start, digests)

    def renew(self) -> None:
        pass  # the I/O side group it writes on is the pipeline's, renewed there

    def close(self) -> None:
        pass


class ProcessWriter:
    """A persistent writer process for this rank. Constructed collectively (rendezvous)."""

    def __init__(
        self, comm: Comm, opts: WriteOptions, storage: LocalStorage, *, timeout_s: float
    ) -> None:
        self._comm, self._opts, self._storage = comm, opts, storage
        self._timeout_s = timeout_s
        self._start()

    def _start(self) -> None:
        comm, timeout_s = self._comm, self._timeout_s
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
            args=(child, comm.rank, comm.world_size, address, timeout_s, self._storage),
            name=f"dcp_engine_writer_rank{comm.rank}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._expect("ready", "starting")

    def renew(self) -> None:
        """A new writer process on every rank (collective): the old one may still be in a
        write whose reply would be taken for the next save's, or in a broken group."""
        self.close()
        self._start()

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
            text, relayed = payload
            error = CheckpointError(f"the writer process failed while {doing}: {text}")
            error.relayed = relayed  # type: ignore[attr-defined]
            raise error
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
    storage: LocalStorage,
) -> None:
    """The writer process: join the other writers, then write what the trainer stages."""
    torch.set_num_threads(1)
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
        conn.send(("error", (traceback.format_exc(limit=3), False)))
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
            staged = StagedState({**buffers, **small}, items, mappings)
            digests = save_staged(staged, directory, group=None, opts=opts, storage=storage)
            conn.send(("done", digests))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            conn.send(("error", (f"{type(e).__name__}: {e}"[:4000], relayed(e, rank))))
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
