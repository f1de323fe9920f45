"""What checkpointing costs DINO training: the tiny DINO of ``launch/train_dino.py`` on 2
ranks (FSDP2, gloo, CPU), saved every ``--every`` steps synchronously (``off``), by a
thread, by writer processes (``process``, the default), and not at all (``none``: the
same run with every save trigger off). Runs the modes in turn, ``--reps`` times, in one
invocation, so that they share the machine's state.

    python -m benchmarks.dino_overhead [--steps 40] [--every 4] [--reps 3]

Per mode, from each run's ``train_log.jsonl`` (a time stamp per step), over all runs: the
mean step (wall time between consecutive steps, the first 4 steps left out: what the
saves cost training overall), the median step, and the median of the steps that contain
a save (the step after each save's trigger: the save's blocking part and whatever the
background write takes from training); each with its ratio to ``none``. Results:
``benchmarks/results/dino_overhead.json`` and ``.md``. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "off", "thread", "process")


def run(mode: str, root: Path, steps: int, every: int) -> list[tuple[int, float]]:
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
        else ["--checkpoint.save_every_n_steps", str(every), "--checkpoint.async_mode", mode]
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
    return [(s, t - t0) for (s, t), (_, t0) in zip(times[1:], times[:-1], strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    after_save: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            root = Path(tempfile.mkdtemp(prefix="dino_overhead_"))
            try:
                for step, dt in run(mode, root, args.steps, args.every):
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
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "args": vars(args),
        "modes": {
            m: {
                "mean_step_ms": statistics.fmean(steps[m]) * 1e3,
                "mean_step_ratio": statistics.fmean(steps[m]) / statistics.fmean(steps["none"]),
                "median_step_ms": statistics.median(steps[m]) * 1e3,
                "median_step_with_save_ms": statistics.median(after_save[m]) * 1e3
                if after_save[m]
                else None,
                "step_ratio": statistics.median(steps[m]) / base,
                "step_with_save_ratio": statistics.median(after_save[m]) / base
                if after_save[m]
                else None,
            }
            for m in MODES
        },
    }
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dino_overhead.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# DINO training with checkpoints every {args.every} steps (2 ranks, FSDP2, CPU)",
        "",
        f"{args.reps} runs of {args.steps} steps per mode; medians; ratios to `none`.",
        "",
        "| mode | mean step (ms) | ratio | median step (ms) | ratio "
        "| step with a save (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in result["modes"].items():
        with_save = r["median_step_with_save_ms"]
        cells = (
            ("-", "-")
            if with_save is None
            else (f"{with_save:.1f}", f"{r['step_with_save_ratio']:.3f}")
        )
        lines.append(
            f"| {m} | {r['mean_step_ms']:.1f} | {r['mean_step_ratio']:.3f} "
            f"| {r['median_step_ms']:.1f} | {r['step_ratio']:.3f} | {cells[0]} | {cells[1]} |"
        )
    (out / "dino_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
