"""Run a function on N real processes joined by a real gloo process group (CPU).

The pattern of torch's ``MultiProcessTestCase``: start fresh processes (from a fork
server, see ``PRELOAD``), rendezvous through a FileStore in the test's temp dir (no port
races between pytest-xdist workers), collect each rank's return value or traceback, and
fail the test naming the rank.
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


# Ranks are forked from a server (one per pytest worker) that has imported only these:
# a rank starts in milliseconds instead of 2-3 s of imports, and nothing else of the test
# process reaches it but what spawn passes too (cwd, sys.path) and its environment, which
# ``_entry`` sets from the test's at the call (the server's is from its own start).
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "dcp_engine"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (the first use)
    return ctx


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RANK_TIMEOUT_S
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; the list of return values by rank."""
    outcomes = run_ranks_outcomes(fn, world_size, *args, timeout=timeout)
    errors = {r: v for r, (kind, v) in enumerate(outcomes) if kind != "ok"}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{msg}")
    return [v for _, v in outcomes]


def run_ranks_outcomes(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RANK_TIMEOUT_S
) -> list[tuple[str, Any]]:
    """Like ``run_ranks``, but a rank may fail or die: per rank ``("ok", value)``,
    ``("error", traceback)`` or ``("died", exit code)`` (e.g. -9 after a SIGKILL)."""
    ctx = _context()
    results: Any = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="dcp_engine_store_")
    store = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_entry, args=(fn, rank, world_size, store, results, dict(os.environ), args)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"ranks {sorted(set(range(world_size)) - set(out))} did not finish "
                    f"within {timeout}s; so far: {out}"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in out:
                        out[r] = ("died", p.exitcode)
                continue
            out[rank] = ("ok", pickle.loads(value)) if ok else ("error", value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store: str,
    results: Any,
    env: dict[str, str],
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.clear()  # the test's environment now, not the fork server's at its start
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
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


class multirank:
    """``@multirank(n)`` on a module-level rank body ``body(rank, world_size, *args)``
    keeps the body in the test file: ``body.run(*args)`` runs it on ``n`` real processes
    joined by a gloo group and returns every rank's value (``body.outcomes(*args)``:
    per rank ``("ok", value)``, ``("error", traceback)`` or ``("died", code)``)."""

    def __init__(self, world_size: int, *, timeout: float = RANK_TIMEOUT_S) -> None:
        self.world_size, self.timeout = world_size, timeout

    def __call__(self, body: Callable[..., Any]) -> Ranks:
        return Ranks(body, self.world_size, self.timeout)


class Ranks:
    """A rank body and its world size; pickled by reference, as a module-level function."""

    def __init__(self, body: Callable[..., Any], world_size: int, timeout: float) -> None:
        self.body, self.world_size, self.timeout = body, world_size, timeout
        self.__module__, self.__qualname__ = body.__module__, body.__qualname__
        self.__doc__ = body.__doc__

    def __call__(self, rank: int, world_size: int, *args: Any) -> Any:
        return self.body(rank, world_size, *args)

    def run(self, *args: Any, world_size: int | None = None) -> list[Any]:
        return run_ranks(self, world_size or self.world_size, *args, timeout=self.timeout)

    def outcomes(self, *args: Any, world_size: int | None = None) -> list[tuple[str, Any]]:
        return run_ranks_outcomes(self, world_size or self.world_size, *args,
                                  timeout=self.timeout)  # fmt: skip

    def __reduce__(self) -> tuple[Any, ...]:
        return (_lookup, (self.__module__, self.__qualname__))


def _lookup(module: str, qualname: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
