"""What every benchmark measures the same way: CPU time and memory of the whole job, the
slowest rank's time, the machine, and the files a run writes (JSON + Markdown).

CPU: a rank samples itself and every process below it (the engine's writer processes,
DCP's process executor, multiprocessing helpers): ``user + system`` of each live process
plus that of the processes it has reaped. Each process of the tree is then counted
exactly once, alive or reaped, so the difference of two samples is the CPU the rank's
part of the job used in between, whatever started or ended there. The rank itself and
the children it reaped come from ``getrusage`` (microseconds, exited threads included);
live descendants from ``/proc`` via psutil (clock ticks: 10 ms). The job's figure is that
difference summed over the ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

GiB = 2**30
ENV = ("MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS")
MiB = 2**20


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and all its descendants, reaped ones
    included (see the module's docstring)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_memory(kind: str = "rss") -> int:
    """Resident bytes of this process and its descendants: ``rss`` (cheap, counts shared
    pages in every process that maps them) or ``pss`` (shared pages split)."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss if kind == "pss" else p.memory_info().rss
    return total


class PeakRSS:
    """Peak extra RSS of the process tree while the ``with`` block runs, sampled every
    ``period_s`` in a thread (``extra``: the peak over the RSS at entry)."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s, self.base, self.peak = period_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory("rss"))
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = tree_memory("rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory("rss"))

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _reduce(x: float, op: dist.ReduceOp.RedOpType) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def slowest(x: float) -> float:
    """The largest value over the ranks (a save is done when its slowest rank is)."""
    return _reduce(x, dist.ReduceOp.MAX)


def summed(x: float) -> float:
    """The sum over the ranks (CPU seconds of the whole job)."""
    return _reduce(x, dist.ReduceOp.SUM)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "env": {k: os.environ[k] for k in ENV if k in os.environ},
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe(result: dict[str, Any]) -> str:
    """One line naming the machine and torch of a result."""
    m = result["machine"]
    return f"{m['machine']}, {m['cores']} cores, torch {m['torch']}, {m['when']}"


def write(out: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """``<out>/<name>.json`` and ``.md``; the Markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def save_figures(handle: Any) -> dict[str, Any]:
    """The engine's own figures of a save (its ``SaveStats``), once it has them."""
    stats = None if handle is None else handle.stats
    if stats is None:
        return {}
    keys = ("blocked_s", "write_s", "commit_s", "total_s", "bytes")
    return {k: getattr(stats, k, None) for k in keys}


def fmt(x: float | None, digits: int = 2) -> str:
    """A table cell: ``-`` for a missing or non-finite value."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return "-"
    return f"{x:.{digits}f}"
