"""`make demo` end to end, smaller: torchrun, a real SIGKILL of a rank, resume=latest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dcp_engine as de

REPO = Path(__file__).resolve().parents[1]


# The demo's DINO, smaller: 6 steps an epoch, 3 epochs, a save every 4 steps.
SMALL = ("--train.batch_size 16 --data.local_crops_number 2 --data.num_samples 96 "
         "--train.epochs 3 --checkpoint.save_every_n_steps 4 --eval.bank_size 64 "
         "--eval.query_size 32")  # fmt: skip


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_demo_dino_killed_at_random_and_resumed_equals_the_straight_run(tmp_path, strategy):
    """Pass: `make demo`'s script, with the DINO job smaller. The straight run and the run
    whose rank 1 is SIGKILLed at a seeded random moment after a commit, then resumed with
    resume=latest, end with the same student, teacher, optimizer and centre, bit for bit;
    the teacher of the best checkpoint then loads into a plain model on one process."""
    env = dict(
        os.environ, PYTHON=sys.executable, ROOT=str(tmp_path / "runs"), STRATEGY=strategy,
        STEPS="18", MAX_DELAY="1", KILL_SEED="7" if strategy == "fsdp" else "11", EXTRA=SMALL,
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "launch/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=420
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "kill_rank: SIGKILL to rank 1" in out and "failed as it should" in out
    resumed = re.search(r"resumed from \S*step_(\d+): step (\d+)", out)
    assert resumed and 4 <= int(resumed[2]) < 18, out[-4000:]  # a real resume, mid-run
    assert "equals the uninterrupted one bit for bit" in out
    for key in ("student", "teacher", "optimizer", "center"):
        assert re.search(rf"{key}\s+equal", out)
    assert "features (96, 192), projections (96, 1024)" in out  # eval: bank 64 + queries 32
    assert "epoch 2 done at step 18" in out  # the last epoch is validated and closed too
    last = de.find_checkpoints(tmp_path / "runs/resumed")[0]
    assert last.step == 18 and "knn_acc" in last.metrics and last.extra["trainer"]["epoch_done"]
    log = [json.loads(line) for line in (tmp_path / "runs/resumed/train_log.jsonl").open()]
    assert sorted({row["step"] for row in log}) == list(range(1, 19))


@pytest.mark.slow
@pytest.mark.multirank
def test_custom_loop_example_runs_then_resumes_and_keeps_its_policy(tmp_path):
    """Pass: the docs' example under torchrun (2 ranks, DDP, writer processes) stopped
    after step 13 (inside epoch 1), a second launch resumes there and ends at step 20, and
    what is kept is the top 2 by val_loss, the newest and the checkpoint the second run
    resumed from."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch/examples/custom_loop.py"),
           str(REPO / "launch/examples/checkpoint.yaml")]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    outs = []
    for extra in (["--max-steps", "13"], []):
        proc = subprocess.run(
            cmd + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        outs.append(proc.stdout)
    assert "step 13; kept:" in outs[0] and "step 20; kept:" in outs[1]
    assert "resumed at step 13, epoch 1 (3 of its batches done)" in outs[1]
    exp = tmp_path / "experiments" / "custom_loop"
    kept = {c.step: c.metrics for c in de.find_checkpoints(exp)}
    ranked = [c.step for c in de.find_checkpoints(exp, "best")]
    assert 20 in kept and 13 in kept  # the newest; the one resumed from
    assert set(ranked[:2]) <= set(kept)  # the top 2 by val_loss
    assert len(kept) <= 4 and all("val_loss" in kept[s] for s in ranked[:2])
    assert (exp / "config.yaml").is_file()
