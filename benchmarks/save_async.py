"""Saves: dcp-engine next to its peers and the floors, on one state, in one run.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.save_async throughput \
        [--mib-per-rank 512] [--reps 5] [--methods copy,raw_write,...]
    torchrun --standalone --nproc_per_node=1 -m benchmarks.save_async throughput --shape small
    torchrun --standalone --nproc_per_node=2 -m benchmarks.save_async stall

States: ``benchmarks/states.py`` (``train``: FSDP2 MLP + AdamW, 504 MiB per rank by
default; ``small``: 600 tensors, 64 MiB, one process); methods: ``benchmarks/peers.py``.
After one warm-up save per method, the medians of ``--reps`` saves (each save's figure is
its slowest rank's, CPU the sum over every process of the job):

``throughput`` (idle between saves): blocking (until the call returns) and its ratio to
T_copy (``copy``: one copy into reused buffers); staged (until the state may change
again); committed (durable) and its ratio to ``raw_write`` (the same bytes, one file per
rank, fsync); CPU seconds per GiB of state, of every process of the job (the ranks,
their writer processes and any other child) from the call until committed, and its ratio
to ``raw_write``'s; the extra PSS of the job after the first and the last save.

``stall`` (training between saves; ``train`` only): per method, the median training step
in the ``--window`` steps after each save against the median step without saves.

Run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``make bench`` does): otherwise glibc keeps
freed large buffers of one method in its heap for the next, and the memory columns lie.
Results: ``<out>/<name>.json``, ``.md`` and ``.png`` (``save_train``, ``save_small``,
``save_async_stall``). Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import threading
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from . import plots
from .measure import GiB, MiB, describe, fmt, machine, median, slowest, summed, tree_cpu_s
from .measure import tree_memory as memory
from .measure import write as write_result
from .peers import (
    METHODS,
    SAVE_DEFAULT,
    STALL_DEFAULT,
    Method,
    side_group,
    stager_options,
)
from .states import State, build
from .states import train_step as step

# ----------------------------------------------------------------------------- throughput

ISSUE_MIB = 504
ISSUE_NOTE = (
    f" The issue's size is {ISSUE_MIB} MiB per rank (`--mib-per-rank 512`, "
    "`make bench BENCH_MIB=512`); `make bench` runs a smaller one by default to stay near "
    "10 minutes on 2 cores."
)


def run_throughput(
    state: State, root: Path, names: list[str], reps: int, growth: int, total_bytes: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rank = dist.get_rank()
    for name in names:
        cls = METHODS[name]
        gc.collect()
        base = memory("pss")
        method = cls(state, root)
        runs: dict[str, list[float]] = {k: [] for k in ("blocking", "staged", "committed", "cpu")}
        extra: list[float] = []
        info: dict[str, Any] = {}
        # The engine may save `growth` times, to show its memory over many saves; the
        # timings are the medians of the `reps` saves after the warm-up, alike for all.
        n_saves = max(reps + 1, growth) if cls.kind == "engine" else reps + 1
        for i in range(n_saves):
            dist.barrier()
            c0, t0 = tree_cpu_s(), time.perf_counter()
            method.start()
            t1 = time.perf_counter()
            method.staged()
            t2 = time.perf_counter()
            method.done()
            t3, c3 = time.perf_counter(), tree_cpu_s()
            for k, v in (("blocking", t1 - t0), ("staged", t2 - t0), ("committed", t3 - t0)):
                runs[k].append(slowest(v))
            runs["cpu"].append(summed(c3 - c0))
            extra.append(slowest(memory("pss") - base))
            info = method.info() or info
            method.cleanup()
            if rank == 0:
                print(
                    f"{name} #{i}: blocking {runs['blocking'][-1] * 1e3:.1f} ms, committed "
                    f"{runs['committed'][-1]:.3f} s, cpu {runs['cpu'][-1]:.2f} s",
                    flush=True,
                )
        method.close()
        del method  # its buffers must not count in the next method's baseline
        measured = {k: v[1 : reps + 1] for k, v in runs.items()}
        rows.append(
            {
                "method": name,
                "kind": cls.kind,
                "saves": n_saves,
                "first_blocking_s": runs["blocking"][0],
                "blocking_s": median(measured["blocking"]),
                "staged_s": median(measured["staged"]),
                "committed_s": median(measured["committed"]),
                "cpu_s": median(measured["cpu"]),
                "cpu_s_per_gib": median(measured["cpu"]) / (total_bytes / GiB),
                "extra_pss_first_bytes": extra[0],
                "extra_pss_last_bytes": extra[-1],
                "runs": measured,
                "engine_stats_last": info,
            }
        )
    ref = {r["method"]: r for r in rows}
    t_copy = ref["copy"]["blocking_s"] if "copy" in ref else None
    raw = ref.get("raw_write")
    for r in rows:
        r["blocking_vs_copy"] = r["blocking_s"] / t_copy if t_copy else None
        r["committed_vs_raw"] = r["committed_s"] / raw["committed_s"] if raw else None
        r["cpu_vs_raw"] = r["cpu_s"] / raw["cpu_s"] if raw and raw["cpu_s"] > 0 else None
    return rows


def report_throughput(result: dict[str, Any]) -> list[str]:
    per_rank = result["state_bytes_per_rank"] / MiB
    lines = [
        f"# Saves, {result['shape']} state: {per_rank:.0f} MiB per rank "
        f"({result['tensors_per_rank']} tensors), {result['world_size']} rank(s), "
        f"median of {result['reps']} after a warm-up",
        "",
        f"{describe(result)}. Measured, not asserted: the machine is shared and noisy; "
        "compare ratios within this run."
        + ISSUE_NOTE
        * (result["shape"] == "train" and abs(per_rank - ISSUE_MIB) > 1),
        "",
        "| method | blocking ms | / T_copy | staged ms | committed s | / raw write "
        "| CPU s | CPU s per GiB | / raw write | first blocking ms | extra PSS first / last MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {fmt(r['blocking_s'] * 1e3, 1)} | {fmt(r['blocking_vs_copy'])} "
            f"| {fmt(r['staged_s'] * 1e3, 1)} | {fmt(r['committed_s'], 3)} "
            f"| {fmt(r['committed_vs_raw'])} | {fmt(r['cpu_s'])} | {fmt(r['cpu_s_per_gib'])} "
            f"| {fmt(r['cpu_vs_raw'])} | {fmt(r['first_blocking_s'] * 1e3, 1)} "
            f"| {r['extra_pss_first_bytes'] / MiB:.0f} / {r['extra_pss_last_bytes'] / MiB:.0f} |"
        )
    lines += [
        "",
        "- blocking: until the call returns; `/ T_copy`: over `copy` (one copy of the rank's "
        "tensors into reused buffers). staged: until the state may change again (later than "
        "blocking only with staging in the background: `engine_overlap`, the stager's thread).",
        "- committed: until durable (fsynced; the engine: `handle.committed`, DCP async: the "
        "upload future); `/ raw write`: over `raw_write` (the same bytes, one file per rank, "
        "fsync), 1.00 = the storage floor.",
        "- CPU: user + system seconds of every process of the job (each rank and all its "
        "descendants, writer processes included) from the call until committed, per GiB of "
        "state; `/ raw write`: over `raw_write`'s.",
        "- extra PSS: the job's proportional set size after the first and the last save over "
        "before the method started (staging buffers that stay).",
        "- dcp_async_save_stager: `StagingOptions("
        + ", ".join(f"{k}={v}" for k, v in result["stager_options"].items())
        + ")` (pinned memory and non-blocking copies need an accelerator).",
    ]
    return lines


# ----------------------------------------------------------------------------- stall


class Waiter:
    """``method.done()`` in a thread: the time the save became durable."""

    def __init__(self, method: Method) -> None:
        self.at, self.error = 0.0, cast(BaseException | None, None)
        self.thread = threading.Thread(target=self._run, args=(method,), daemon=True)
        self.thread.start()

    def _run(self, method: Method) -> None:
        try:
            method.done()
        except BaseException as e:
            self.error = e
        self.at = time.perf_counter()

    def join(self) -> float:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.at


def run_stall(
    state: State, root: Path, names: list[str], saves: int, window: int
) -> list[dict[str, Any]]:
    for _ in range(3):
        step(state)
    base = median([slowest(step(state)) for _ in range(saves * window)])
    if dist.get_rank() == 0:
        print(f"step without saves: {base:.3f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        method = METHODS[name](state, root)
        method.start()  # warm-up save, not measured
        method.done()
        method.cleanup()
        after: list[float] = []
        committed: list[float] = []
        for _ in range(saves):
            dist.barrier()
            t0 = time.perf_counter()
            method.start()
            blocked = time.perf_counter() - t0
            waiter = Waiter(method)  # learns when the save is durable, while training runs
            steps = [step(state) for _ in range(window)]
            steps[0] += blocked  # the save stalls the step it precedes
            committed.append(slowest(waiter.join() - t0))
            after.extend(slowest(s) for s in steps)
            method.cleanup()
        method.close()
        rows.append(
            {
                "method": name,
                "kind": METHODS[name].kind,
                "step_after_save_s": median(after),
                "step_without_saves_s": base,
                "ratio": median(after) / base,
                "committed_while_training_s": median(committed),
                "runs_step_after_save_s": after,
            }
        )
        if dist.get_rank() == 0:
            print(f"{name}: step after save {rows[-1]['ratio']:.3f} x", flush=True)
    return rows


def report_stall(result: dict[str, Any]) -> list[str]:
    lines = [
        f"# Training step after a save: {result['state_bytes_per_rank'] / MiB:.0f} MiB per "
        f"rank, {result['world_size']} ranks, {result['reps']} saves",
        "",
        f"{describe(result)}. Measured, not asserted.",
        "",
        "| method | step after save s | step without saves s | ratio | committed while "
        "training s |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['step_after_save_s']:.3f} | "
            f"{r['step_without_saves_s']:.3f} | {r['ratio']:.3f} | "
            f"{r['committed_while_training_s']:.3f} |"
        )
    lines += [
        "",
        f"Window: the {result['window']} steps after each save; the blocking part of "
        "a save is added to the step after it. `raw_write` blocks (the storage floor).",
    ]
    return lines


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=["throughput", "stall"])
    p.add_argument("--shape", choices=["train", "small"], default="train")
    p.add_argument(
        "--mib-per-rank",
        type=float,
        default=512,
        help="train state per rank (512: 504 MiB, the issue's figure)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--window", type=int, default=3, help="stall: steps after each save")
    p.add_argument(
        "--growth-saves",
        type=int,
        default=0,
        help="throughput: the engine's methods save this often (memory growth)",
    )
    p.add_argument("--name", help="result file name (default: save_<shape>, save_async_stall)")
    p.add_argument("--dir", default="/tmp/dcp_engine_bench_save")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    default = SAVE_DEFAULT if args.cmd == "throughput" else STALL_DEFAULT
    names = args.methods.split(",") if args.methods else default
    unknown = [n for n in names if n not in METHODS]
    if unknown or (args.cmd == "stall" and args.shape != "train"):
        p.error(f"unknown methods {unknown}" if unknown else "stall needs --shape train")
    name = args.name or (f"save_{args.shape}" if args.cmd == "throughput" else "save_async_stall")

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    root = Path(args.dir)
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    side_group()  # collective: created by every rank, before any method runs
    state = build(args.shape, args.mib_per_rank)
    per_rank = state.nbytes()
    total = int(summed(per_rank))
    started = time.perf_counter()
    if args.cmd == "throughput":
        rows = run_throughput(state, root, names, args.reps, args.growth_saves, total)
    else:
        rows = run_stall(state, root, names, args.reps, args.window)
    result = {
        "benchmark": f"save {args.cmd}",
        "shape": args.shape,
        "world_size": dist.get_world_size(),
        "reps": args.reps,
        "state_bytes_per_rank": per_rank,
        "state_bytes_total": total,
        "tensors_per_rank": state.count(),
        "machine": machine(),
        "args": vars(args),
        "stager_options": stager_options(),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    if args.cmd == "stall":
        result["window"] = args.window
    if dist.get_rank() == 0:
        out = Path(args.out)
        lines = report_throughput(result) if args.cmd == "throughput" else report_stall(result)
        write_result(out, name, result, lines)
        plots.plot_file(out / f"{name}.json")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
