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
