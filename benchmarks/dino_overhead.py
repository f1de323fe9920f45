"""What checkpointing costs DINO training: the tiny DINO of ``launch/train_dino.py`` on 2
ranks (FSDP2, gloo, CPU), saved every ``--every`` steps synchronously (``off``), by a
thread, by writer processes (``process``, the default), by a thread with overlapped
staging (``overlap``: ``async_mode=thread, staging=overlap``), and not at all (``none``:
the same run with every save trigger off: the 1.0 reference). Runs the modes in turn,
``--reps`` times, in one invocation, so that they share the machine's state.

    python -m benchmarks.dino_overhead [--steps 40] [--every 4] [--reps 3] [--modes ...]

Per mode, from each run's ``train_log.jsonl`` (a time stamp per step), over all runs: the
mean step (wall time between consecutive steps, the first 4 steps left out: what the
saves cost training overall), the median step, and the median of the steps that contain
a save (the step after each save's trigger: the save's blocking part and whatever the
background write takes from training); each with its ratio to ``none``. Results:
``benchmarks/results/dino_overhead.json``, ``.md`` and ``.png``. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import plots
from .measure import describe, machine, write

REPO = Path(__file__).absolute().parents[1]
MODES = ("none", "off", "thread", "process", "overlap")
ENGINE_ARGS = {
    "off": ["--checkpoint.async_mode", "off"],
    "thread": ["--checkpoint.async_mode", "thread"],
    "process": ["--checkpoint.async_mode", "process"],
    "overlap": ["--checkpoint.async_mode", "thread", "--checkpoint.staging", "overlap"],
}
SETTINGS = {
    "none": "no saves",
    "off": "async_mode=off (sync)",
    "thread": "async_mode=thread",
    "process": "async_mode=process",
    "overlap": "async_mode=thread, staging=overlap",
}


def run(mode: str, root: Path, steps: int, every: int) -> tuple[list[tuple[int, float]], int]:
    """One training run; (step, seconds since the previous step) and the bytes of its
    newest checkpoint (0 without saves)."""
    saves = (
        [
            "--checkpoint.save_every_n_steps",
            "null",
            "--checkpoint.save_frequency",
            "null",
            "--checkpoint.save_on_train_end",
            "false",
        ]
        if mode == "none"
        else ["--checkpoint.save_every_n_steps", str(every), *ENGINE_ARGS[mode]]
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "launch/train_dino.py"),
        "--max-steps",
        str(steps),
        "--no-bar",
        "--checkpoint.dir",
        str(root),
        "--checkpoint.experiment_name",
        mode,
        *saves,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: {(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (root / mode / "train_log.jsonl").open()]
    times = [(r["step"], r["time"]) for r in rows]
    ckpts = sorted((root / mode / "checkpoints").glob("step_*"), key=lambda c: c.stat().st_mtime)
    size = sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else 0
    return [(s, t - t0) for (s, t), (_, t0) in zip(times[1:], times[:-1], strict=True)], size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated; 'none' first")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    modes = ["none", *(m for m in args.modes.split(",") if m != "none")]
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown modes {unknown}")
    steps: dict[str, list[float]] = {m: [] for m in modes}
    after_save: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, int] = {}
    started = time.perf_counter()
    for rep in range(args.reps):
        for mode in modes:
            root = Path(tempfile.mkdtemp(prefix="dino_overhead_"))
            try:
                timeline, sizes[mode] = run(mode, root, args.steps, args.every)
                for step, dt in timeline:
                    if step <= 4:
                        continue
                    steps[mode].append(dt)
                    if (step - 1) % args.every == 0:  # the step whose end saved
                        after_save[mode].append(dt)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(
                f"rep {rep + 1}/{args.reps} {mode}: median step "
                f"{statistics.median(steps[mode]) * 1e3:.1f} ms",
                flush=True,
            )
    base = statistics.median(steps["none"])
    mean_base = statistics.fmean(steps["none"])
    result: dict[str, Any] = {
        "benchmark": "dino_overhead",
        "machine": machine(),
        "args": vars(args),
        "wall_s": time.perf_counter() - started,
        "checkpoint_bytes": sizes,
        "modes": {
            m: {
                "engine_args": ENGINE_ARGS.get(m, []),
                "mean_step_ms": statistics.fmean(steps[m]) * 1e3,
                "mean_step_ratio": statistics.fmean(steps[m]) / mean_base,
                "median_step_ms": statistics.median(steps[m]) * 1e3,
                "median_step_with_save_ms": statistics.median(after_save[m]) * 1e3
                if after_save[m]
                else None,
                "step_ratio": statistics.median(steps[m]) / base,
                "step_with_save_ratio": statistics.median(after_save[m]) / base
                if after_save[m]
                else None,
            }
            for m in modes
        },
    }
    size = max(sizes.values(), default=0)
    lines = [
        f"# DINO training with checkpoints every {args.every} steps (2 ranks, FSDP2, CPU)",
        "",
        f"{args.reps} runs of {args.steps} steps per mode, modes interleaved; a checkpoint "
        f"is {size / 2**20:.1f} MiB. Ratios to `none` (the same run without saves: 1.000). "
        f"{describe(result)}. Measured, not asserted.",
        "",
        "| mode | engine settings | mean step (ms) | ratio | median step (ms) | ratio "
        "| step with a save (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in result["modes"].items():
        with_save = r["median_step_with_save_ms"]
        cells = (
            ("-", "-")
            if with_save is None
            else (f"{with_save:.1f}", f"{r['step_with_save_ratio']:.3f}")
        )
        settings = SETTINGS[m]
        lines.append(
            f"| {m} | {settings} | {r['mean_step_ms']:.1f} | {r['mean_step_ratio']:.3f} "
            f"| {r['median_step_ms']:.1f} | {r['step_ratio']:.3f} | {cells[0]} | {cells[1]} |"
        )
    lines += [
        "",
        "Mean step: the wall time between consecutive steps after step 4, over all runs (what "
        "the saves cost training overall); step with a save: the median of the steps whose "
        "end triggered a save (for `none`, the same steps without one).",
    ]
    out = Path(args.out)
    write(out, "dino_overhead", result, lines)
    plots.plot_file(out / "dino_overhead.json")


if __name__ == "__main__":
    main()
