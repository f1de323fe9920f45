"""Where the shard bytes are written.

A writer takes a DCP state dict and a ``.tmp`` directory and returns once every rank's
shards are written and fsynced and rank 0 has written DCP's ``.metadata``. It does not
commit: the manager does that after the writer returns (``commit.py``).

This version has the in-line writer (``async_mode="off"``): the write runs on the calling
thread. Background writers plug in behind the same ``write`` signature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from .comm import Comm


@dataclass(frozen=True)
class WriteResult:
    seconds: float
    """Wall time of the DCP save on this rank (planning, writing, fsync, .metadata)."""


class ShardWriter(Protocol):
    def write(self, state_dict: dict[str, Any], directory: Path) -> WriteResult: ...

    def close(self) -> None: ...


class InlineWriter:
    """Writes on the calling thread through ``dcp.save`` on the manager's side group."""

    def __init__(self, comm: Comm, *, fsync: bool, threads: int) -> None:
        self._comm = comm
        self._fsync = fsync
        self._threads = threads

    def write(self, state_dict: dict[str, Any], directory: Path) -> WriteResult:
        start = time.perf_counter()
        writer = FileSystemWriter(
            directory, sync_files=self._fsync, thread_count=self._threads, overwrite=True
        )
        # DCP's own collectives (plan gather, write-result gather, finish) run on the side
        # group, whose timeout bounds them: a rank that never arrives fails every rank.
        with self._comm.dcp_call():
            dcp.save(
                state_dict,
                storage_writer=writer,
                process_group=self._comm.group,
                no_dist=not self._comm.distributed,
            )
        return WriteResult(seconds=time.perf_counter() - start)

    def close(self) -> None:
        pass
