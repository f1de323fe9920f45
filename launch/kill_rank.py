"""Run a torchrun command and SIGKILL one of its ranks at a random moment after the
experiment's first committed checkpoint (a crash, not a clean exit).

    python launch/kill_rank.py --experiment DIR [--rank 1] [--seed S] [--max-delay 3] \
        -- torchrun ... launch/train_dino.py ...

Exit status: 0 if the rank was killed and the job then failed, 1 if the job ended before
the kill or survived it, 2 on bad usage. Prints the moment chosen and the steps committed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcp_engine import find_checkpoints


def find_rank(job: psutil.Process, rank: int) -> psutil.Process | None:
    """The training process of ``rank`` among the job's descendants (not its writers:
    those are children of a rank, started by multiprocessing)."""
    for proc in job.children(recursive=True):
        try:
            env = proc.environ()
            if env.get("RANK") == str(rank) and "multiprocessing" not in " ".join(proc.cmdline()):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _committed(experiment: Path) -> list[int]:
    return sorted(c.step for c in find_checkpoints(experiment)) if experiment.exists() else []


def run_and_kill(
    command: list[str],
    experiment: Path,
    rank: int,
    seed: int,
    max_delay: float,
    timeout: float = 600.0,
) -> tuple[int, str]:
    rng = random.Random(seed)
    job = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not _committed(experiment):
            if job.poll() is not None:
                return 1, f"the job ended (exit {job.returncode}) before any checkpoint"
            if time.monotonic() > deadline:
                return 1, "no checkpoint before the timeout"
            time.sleep(0.05)
        delay = rng.uniform(0.0, max_delay)
        time.sleep(delay)
        victim = find_rank(psutil.Process(job.pid), rank)
        if job.poll() is not None or victim is None:
            return 1, f"the job ended before the kill ({delay:.2f} s after the first commit)"
        committed = _committed(experiment)
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return 1, f"rank {rank} ended before the kill ({delay:.2f} s after the first commit)"
        print(
            f"kill_rank: SIGKILL to rank {rank} (pid {victim.pid}) {delay:.2f} s after the "
            f"first commit; committed then: steps {committed}",
            flush=True,
        )
        code = job.wait(timeout=max(deadline - time.monotonic(), 1.0))
        if code == 0:
            return 1, "the job exited 0 after its rank was killed"
        return 0, f"the job failed as it should (exit {code})"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, type=Path)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="of the delay (default: random)")
    p.add_argument("--max-delay", type=float, default=3.0, help="seconds after the commit")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"kill_rank: seed {seed}", flush=True)
    code, message = run_and_kill(command, args.experiment, args.rank, seed, args.max_delay)
    print(f"kill_rank: {message}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
