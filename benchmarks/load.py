"""Loads: dcp-engine next to ``dcp.load`` and a raw read of the same files, in one run.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.load [--mib-per-rank 512] [--reps 5]

The ``train`` state of ``benchmarks/states.py`` (FSDP2 MLP + AdamW) is saved once by
``dcp.save`` and once by the engine (``async_mode="off"``), then loaded back into the
live state (warm page cache: one warm-up load per method, then the median of
``--reps``; each load's time is its slowest rank's):

- ``raw_read``: this rank's ``.distcp`` files of the DCP checkpoint read into a reused,
  pre-faulted buffer (the floor);
- ``dcp_load``: ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``;
- ``engine_load``: ``CheckpointManager.load(app_state, which=step)`` (verifies every
  file's digest first, the default); ``engine_load_noverify``: ``verify=False``;
- ``open_checkpoint``: ``dcp_engine.open_checkpoint(path).load(app_state)`` (verified).

Figures: GB/s (the whole state's bytes over the time), the time over ``raw_read``'s, the
CPU seconds of the job per GiB, and the peak extra RSS of a rank (its process tree,
sampled every 2 ms in a thread) over the state bytes per rank (1.0: one extra copy).
Results: ``<out>/load.json``, ``.md``, ``.png``. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcp_engine as de

from . import plots
from .measure import GiB, MiB, PeakRSS, describe, fmt, machine, median, slowest, summed, tree_cpu_s
from .measure import write as write_result
from .states import State, build

KINDS = {
    "raw_read": "floor",
    "dcp_load": "peer",
    "engine_load": "engine",
    "engine_load_noverify": "engine",
    "open_checkpoint": "engine",
}


def raw_reader(files: list[Path]) -> Callable[[], None]:
    size = max(f.stat().st_size for f in files)
    buf = torch.ones(size, dtype=torch.uint8)  # pre-faulted, reused
    view = buf.numpy().data

    def read() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                n, want = 0, f.stat().st_size
                while n < want:
                    got = fh.readinto(view[n:want])
                    if not got:
                        break
                    n += got

    return read


def methods(
    state: State, dcp_dir: Path, mgr: de.CheckpointManager, ckpt: Path, step: int
) -> dict[str, Callable[[], None]]:
    rank = dist.get_rank()

    def dcp_load() -> None:
        sd = state.dcp_state()
        dcp.load(sd, checkpoint_id=dcp_dir)
        state.set_dcp_state(sd)

    def engine_load() -> None:
        mgr.load(state.app, which=step)

    def engine_load_noverify() -> None:
        mgr.load(state.app, which=step, verify=False)

    def open_ckpt() -> None:
        with de.open_checkpoint(ckpt) as ck:
            ck.load(state.app)

    return {
        "raw_read": raw_reader(sorted(dcp_dir.glob(f"__{rank}_*.distcp"))),
        "dcp_load": dcp_load,
        "engine_load": engine_load,
        "engine_load_noverify": engine_load_noverify,
        "open_checkpoint": open_ckpt,
    }


def run(
    fns: dict[str, Callable[[], None]], reps: int, per_rank: int, total: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, fn in fns.items():
        times: list[float] = []
        cpus: list[float] = []
        extra: list[float] = []
        for i in range(reps + 1):
            gc.collect()
            dist.barrier()
            with PeakRSS() as peak:
                c0, t0 = tree_cpu_s(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), tree_cpu_s()
            if i == 0:  # warm-up
                continue
            times.append(slowest(t1 - t0))
            cpus.append(summed(c1 - c0))
            extra.append(slowest(peak.extra))
        t = median(times)
        rows.append(
            {
                "method": name,
                "kind": KINDS[name],
                "load_s": t,
                "gb_per_s": total / t / 1e9,
                "cpu_s": median(cpus),
                "cpu_s_per_gib": median(cpus) / (total / GiB),
                "peak_extra_rss_bytes": median(extra),
                "peak_extra_rss_vs_state": median(extra) / per_rank,
                "runs": {"load_s": times, "cpu_s": cpus, "peak_extra_rss_bytes": extra},
            }
        )
        if dist.get_rank() == 0:
            print(
                f"{name}: {t:.3f} s, {total / t / 1e9:.2f} GB/s, peak extra RSS "
                f"{median(extra) / MiB:.0f} MiB",
                flush=True,
            )
    raw = next((r for r in rows if r["method"] == "raw_read"), None)
    for r in rows:
        r["time_vs_raw"] = r["load_s"] / raw["load_s"] if raw else None
    return rows


def report(result: dict[str, Any]) -> list[str]:
    lines = [
        f"# Loads: {result['state_bytes_per_rank'] / MiB:.0f} MiB per rank "
        f"({result['world_size']} ranks, FSDP2 MLP + AdamW), warm cache, median of "
        f"{result['reps']} after a warm-up",
        "",
        f"{describe(result)}. Measured, not asserted: compare ratios within this run.",
        "",
        "| method | load s | GB/s | time / raw read | CPU s per GiB | peak extra RSS MiB "
        "| / state per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {fmt(r['load_s'], 3)} | {fmt(r['gb_per_s'])} "
            f"| {fmt(r['time_vs_raw'])} | {fmt(r['cpu_s_per_gib'])} "
            f"| {r['peak_extra_rss_bytes'] / MiB:.0f} | {fmt(r['peak_extra_rss_vs_state'])} |"
        )
    lines += [
        "",
        "- GB/s: the whole state's bytes (all ranks) over the slowest rank's time; "
        "`time / raw read`: over `raw_read` (this rank's files of the DCP checkpoint read "
        "into a reused buffer), 1.00 = the floor.",
        "- peak extra RSS: a rank's process tree, the peak during the load over the RSS "
        "before it (sampled every 2 ms; the larger rank), and over the state bytes per rank.",
        "- `engine_load` and `open_checkpoint` read every file twice (the digest check, then "
        "the load); `engine_load_noverify` skips the check.",
        f"- checkpoint bytes (all files, all ranks): DCP {result['dcp_file_bytes_total'] / MiB:.0f}"
        f" MiB, engine {result['engine_file_bytes_total'] / MiB:.0f} MiB.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib-per-rank", type=float, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default="/tmp/dcp_engine_bench_load")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, root = dist.get_rank(), Path(args.dir)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    state = build("train", args.mib_per_rank)
    per_rank = state.nbytes()
    total = int(summed(per_rank))
    dcp_dir = root / "dcp"
    dcp.save(state.dcp_state(), storage_writer=dcp.FileSystemWriter(dcp_dir))
    cfg = de.CheckpointConfig(
        root_dir=str(root), experiment_name="engine", async_mode="off", capture_rng=False
    )
    started = time.perf_counter()
    with de.CheckpointManager(cfg) as mgr:
        ckpt = mgr.save(0, state.app).result().path
        dist.barrier()
        rows = run(methods(state, dcp_dir, mgr, ckpt, 0), args.reps, per_rank, total)
        engine_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    dcp_bytes = sum(f.stat().st_size for f in dcp_dir.rglob("*") if f.is_file())
    result = {
        "benchmark": "load",
        "world_size": dist.get_world_size(),
        "reps": args.reps,
        "state_bytes_per_rank": per_rank,
        "state_bytes_total": total,
        "tensors_per_rank": state.count(),
        "dcp_file_bytes_total": dcp_bytes,
        "engine_file_bytes_total": engine_bytes,
        "machine": machine(),
        "args": vars(args),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    if rank == 0:
        out = Path(args.out)
        write_result(out, "load", result, report(result))
        plots.plot_file(out / "load.json")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
