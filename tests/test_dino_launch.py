"""DINO under torchrun beyond the demo: a checkpoint of 4 ranks resumed on 2, and a job of
two torchrun agents (two "nodes") on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dcp_engine as de

REPO = Path(__file__).resolve().parents[1]
# 4 steps an epoch, 3 epochs; no drop-path: its masks come from each rank's RNG stream,
# which cannot be the same on 4 ranks and on 2.
SMALL = ["--train.batch_size", "16", "--data.local_crops_number", "2", "--data.num_samples",
         "64", "--train.epochs", "3", "--checkpoint.save_every_n_steps", "3",
         "--eval.bank_size", "48", "--eval.query_size", "16", "--model.drop_path_rate", "0",
         "--no-bar"]  # fmt: skip
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def torchrun(nproc: int, *args: str, timeout: int = 400) -> str:
    script = str(REPO / "launch/train_dino.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", script, *SMALL, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(experiment: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (experiment / "train_log.jsonl").open()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
@pytest.mark.multirank
def test_fsdp_checkpoint_of_4_ranks_resumes_on_2_with_the_same_loss_curve(tmp_path):
    """Pass: a 4-rank FSDP2 run of 12 steps saves at step 3 (in epoch 0, the last layer
    frozen: no optimizer state for it yet); a 2-rank run branched from that checkpoint
    (resharded on load) trains steps 4-12 with the losses of the 4-rank run to float
    tolerance: the global batch, its crops and the centre do not depend on the ranks."""
    root = tmp_path / "runs"
    common = ["--checkpoint.dir", str(root), "--max-steps", "12"]
    torchrun(4, *common, "--checkpoint.experiment_name", "four",
             "--checkpoint.keep_last_n", "0", "--checkpoint.keep_top_k", "-1")  # fmt: skip
    four = root / "four"
    step3 = next(c for c in de.find_checkpoints(four) if c.step == 3)
    out = torchrun(2, *common, "--checkpoint.experiment_name", "two",
                   "--checkpoint.resume", str(step3.path))  # fmt: skip
    assert "resumed from" in out and "step_00000003" in out
    a, b = losses(four), losses(root / "two")
    assert sorted(b) == list(range(4, 13))
    for step in range(4, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.multirank
def test_two_torchrun_agents_on_loopback_train_and_checkpoint_as_one_job(tmp_path):
    """Pass: launch/dino_multinode.sh started twice (NODE_RANK 0 and 1, one rank each,
    rendezvous on 127.0.0.1) forms one 2-rank job that trains 6 steps, commits its
    checkpoints, and a single-node 2-rank run resumes from them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "runs"
    args = [*SMALL, "--checkpoint.dir", str(root), "--checkpoint.experiment_name", "nodes",
            "--max-steps", "6"]  # fmt: skip
    env = dict(ENV, PYTHON=sys.executable, MASTER_PORT=str(port), RDZV_ID=f"t{port}")
    agents = []
    for node in (0, 1):
        agents.append(subprocess.Popen(
            ["bash", "launch/dino_multinode.sh", *args], cwd=REPO,
            env=dict(env, NODE_RANK=str(node)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    outs = [a.communicate(timeout=400)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "on 2 ranks" in outs[0]  # static rendezvous: node 0 holds rank 0
    assert de.find_checkpoints(root / "nodes")[0].step == 6
    out = torchrun(2, "--checkpoint.dir", str(root), "--checkpoint.experiment_name", "nodes",
                   "--checkpoint.resume", "latest", "--max-steps", "8")  # fmt: skip
    assert "resumed from" in out and "done at step 8" in out
