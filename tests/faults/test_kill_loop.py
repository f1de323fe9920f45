"""The kill loop: a saver SIGKILLed (with its writer) at random moments, 20+ times."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dcp_engine as de
from tests.faults import ranks

REPO = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("KILLS", "24"))  # KILLS=50 for the long run


@pytest.mark.slow
@pytest.mark.multirank
def test_keep_last_1_async_saver_killed_24_times_always_leaves_a_loadable_commit(tmp_path):
    """Pass: a saver (keep_last_n=1, async thread or process writer, resuming each time)
    is SIGKILLed, its whole process group with it, at a seeded random moment, 24 times;
    after every kill a fresh process finds a committed checkpoint, it loads, and it
    holds exactly the values saved at its step; the steps only go forward."""
    rng = random.Random(20261123)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    last, tally = 0, {"kills": 0, "loaded": 0}
    for i in range(KILLS):
        mode = "thread" if i % 2 else "process"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.saver", str(tmp_path), mode],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        # Wait for the first save to be under way, then kill at a random moment.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, f"kill {i}: the saver died before saving"
        time.sleep(rng.uniform(0.0, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        tally["kills"] += 1
        cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="faults",
                                  async_mode="off", keep_last_n=1)  # fmt: skip
        app = ranks.state(-1)
        with de.CheckpointManager(cfg) as mgr:
            info = mgr.load(app)
        assert info is not None, f"kill {i}: no committed checkpoint"
        expected = ranks.state(info.step)
        assert app["step"] == info.step, f"kill {i}"
        assert torch.equal(app["w"], expected["w"]) and torch.equal(app["b"], expected["b"])
        assert info.step >= last, f"kill {i}: went back from {last} to {info.step}"
        last = info.step
        tally["loaded"] += 1
    assert tally == {"kills": KILLS, "loaded": KILLS}
    assert last > KILLS // 2  # progress was made through the kills
