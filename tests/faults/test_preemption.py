"""SIGTERM (preemption) with save_on_sigterm: save at the next step end, then raise
``Preempted`` (a ``SystemExit`` with status 143; ``tests/test_loop_resume.py`` checks that
``finally`` and ``atexit`` run in a real process)."""

from __future__ import annotations

import time
from typing import Any

import pytest

import dcp_engine as de
from tests.distributed import multirank
from tests.faults import ranks
from tests.faults.ranks import state

pytestmark = pytest.mark.multirank


@multirank(2)
def preempted(rank: int, world_size: int, root: str, double: bool) -> dict[str, Any]:
    """A callback loop with save_on_sigterm; the last rank gets SIGTERM before the end of
    step 3 (twice if ``double``). Never returns normally if the preemption works: the
    step end raises ``Preempted``."""
    import os
    import signal

    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="faults", async_mode="thread", save_on_sigterm=True,
        save_every_n_steps=1000, save_on_train_end=False, timeout_s=20,
    )  # fmt: skip
    cb = de.CheckpointCallback(cfg)
    app = state(0)
    cb.on_train_start(app)
    for step in range(1, 30):
        fresh = state(step)
        app["w"].copy_(fresh["w"])
        app["b"].copy_(fresh["b"])
        app["step"] = step
        if step == 3 and rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
            if double:
                os.kill(os.getpid(), signal.SIGTERM)
        cb.on_step_end(step, app)
        time.sleep(0.02)
    cb.on_train_end(app)
    return {"finished": True}


def test_sigterm_on_one_rank_saves_the_step_on_every_rank_then_exits_with_the_signal(
    tmp_path,
):
    """Pass: rank 1 alone gets SIGTERM during step 3; both ranks save step 3 at its end,
    the commit completes, and the step end raises ``Preempted`` (exit status 143) on both
    ranks; a fresh job resumes from step 3 with its values."""
    outcomes = preempted.outcomes(str(tmp_path), False)
    assert [kind for kind, _ in outcomes] == ["error", "error"], outcomes
    for _, tb in outcomes:
        assert "Preempted: preempted by signal 15: step 3 is committed" in tb, tb
    after = ranks.load_latest.run(str(tmp_path))
    assert after[0]["step"] == 3 and after[0]["steps"] == [3]


def test_a_second_sigterm_exits_at_once_without_saving(tmp_path):
    """Pass: two SIGTERMs in a row end the process at once (-15); nothing is saved."""
    outcomes = preempted.outcomes(str(tmp_path), True, world_size=1)
    assert outcomes == [("died", -15)], outcomes
    assert not list((tmp_path / "faults" / "checkpoints").glob("step_*"))
