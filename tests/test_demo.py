"""`make demo` end to end, smaller: torchrun, a real SIGKILL of a rank, resume=latest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multirank
def test_demo_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    env = dict(
        os.environ, PYTHON=sys.executable, ROOT=str(tmp_path / "runs"),
        STEPS="16", SAVE_EVERY="5", KILL_AT="12",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "launch/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SIGKILL at step 12" in out
    assert "resumed from" in out and "step_00000010" in out
    assert "equals the uninterrupted run bit for bit" in out


@pytest.mark.multirank
def test_custom_loop_example_runs_then_resumes_and_keeps_its_policy(tmp_path):
    """Pass: the docs' example under torchrun (2 ranks, DDP, writer processes) trains to
    step 20, a second launch resumes from step 20 and trains to 40, and what is kept is
    the top 2 by val_loss, the newest and the checkpoint the second run resumed from."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch/examples/custom_loop.py"),
           str(REPO / "launch/examples/checkpoint.yaml")]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    outs = []
    for _ in range(2):
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        outs.append(proc.stdout)
    assert "step 20; kept:" in outs[0] and "step 40; kept:" in outs[1]
    exp = tmp_path / "experiments" / "custom_loop"
    import dcp_engine as de

    kept = {c.step: c.metrics for c in de.find_checkpoints(exp)}
    ranked = [c.step for c in de.find_checkpoints(exp, "best")]
    assert 40 in kept and 20 in kept  # the newest; the one resumed from
    assert set(ranked[:2]) <= set(kept)  # the top 2 by val_loss
    assert len(kept) <= 4 and all("val_loss" in m for m in kept.values())
    assert (exp / "config.yaml").is_file()
