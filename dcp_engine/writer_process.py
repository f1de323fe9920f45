"""The writer process of ``async_mode="process"``: ``python -m dcp_engine.writer_process FD``.

Its own interpreter (never the training script's ``__main__``), talking to its training
process over the socket ``FD``. Messages in:

- ``("storage", storage)`` once;
- ``("buffers", shared)`` at every new staging layout (``staging.SharedArena.handle``:
  the shared-memory name and every tensor's offset, dtype and shape);
- ``("write", RankWrite, WriteOptions)`` per save;
- ``("unmap",)`` before the pool is rebuilt, ``("stop",)`` at the end.

Out: ``("ready", pid)``; per write ``("done", RankWritten)`` or ``("error", (errno or
None, text))``; ``("unmapped", None)`` and ``("stopped", None)`` once the staging
segment is unmapped. It exits when the training process closes the socket (or dies).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from .staging import attach_shared
from .storage import LocalStorage, Storage
from .writers import RankWrite, RankWritten, write_rank


def serve(conn: Connection) -> None:
    torch.set_num_threads(1)
    conn.send(("ready", os.getpid()))
    storage: Storage = LocalStorage()
    buffers: dict[str, memoryview] = {}
    while True:
        try:
            msg: tuple[Any, ...] = conn.recv()
        except (EOFError, OSError):  # the training process is gone
            return
        kind = msg[0]
        if kind == "stop":
            # Unmap the staging segment before saying so: the training process may kill
            # this one while its interpreter tears down, and a segment still mapped by a
            # killed process would outlive the job's close.
            buffers.clear()
            gc.collect()
            conn.send(("stopped", None))
            return
        if kind == "storage":
            storage = msg[1]
        elif kind == "buffers":
            buffers = attach_shared(msg[1])
        elif kind == "unmap":
            buffers = {}
            gc.collect()
            conn.send(("unmapped", None))
        elif kind == "write":
            _, job, opts = msg
            try:
                written: RankWritten = write_rank(job, _lookup(buffers, job), storage, opts)
                conn.send(("done", written))
            except OSError as e:
                conn.send(("error", (e.errno, e.strerror or str(e))))
            except Exception as e:
                conn.send(("error", (None, f"{type(e).__name__}: {e}"[:4000])))


def _lookup(buffers: dict[str, memoryview], job: RankWrite) -> Callable[[int], memoryview]:
    # one item per fqn: the buffer is the chunk
    return lambda pos: buffers[job.entries[pos][0]]


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
