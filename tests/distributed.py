"""Run a function on N real processes joined by a real gloo process group (CPU).

The pattern of torch's ``MultiProcessTestCase``: spawn, rendezvous through a FileStore in
the test's temp dir (no port races between pytest-xdist workers), collect each rank's
return value or traceback, and fail the test naming the rank.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

RANK_TIMEOUT_S = 180


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RANK_TIMEOUT_S
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; the list of return values by rank."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="dcp_engine_store_")
    store = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, store, results, args))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"ranks {sorted(set(range(world_size)) - set(out) - set(errors))} "
                    f"did not finish within {timeout}s; errors so far: {errors}"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in out and r not in errors
                ]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode}"
                continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{msg}")
    return [out[r] for r in range(world_size)]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store: str,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=dt.timedelta(seconds=120),
        )
        value = fn(rank, world_size, *args)
        # Plain pickle bytes: tensors by value, not by shared-memory handles that die with us.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
