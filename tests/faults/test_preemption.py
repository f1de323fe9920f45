"""SIGTERM (preemption) with save_on_sigterm: save at the next step end, then exit."""

from __future__ import annotations

import pytest

from tests.distributed import run_ranks, run_ranks_outcomes
from tests.faults import ranks

pytestmark = pytest.mark.multirank


def test_sigterm_on_one_rank_saves_the_step_on_every_rank_then_exits_with_the_signal(
    tmp_path,
):
    """Pass: rank 1 alone gets SIGTERM during step 3; both ranks save step 3 at its end,
    the commit completes, and both processes end by SIGTERM (exit code -15); a fresh job
    resumes from step 3 with its values."""
    outcomes = run_ranks_outcomes(ranks.preempted, 2, str(tmp_path), False)
    assert outcomes == [("died", -15), ("died", -15)], outcomes
    after = run_ranks(ranks.load_latest, 2, str(tmp_path))
    assert after[0]["step"] == 3 and after[0]["steps"] == [3]


def test_a_second_sigterm_exits_at_once_without_saving(tmp_path):
    """Pass: two SIGTERMs in a row end the process at once (-15); nothing is saved."""
    outcomes = run_ranks_outcomes(ranks.preempted, 1, str(tmp_path), True)
    assert outcomes == [("died", -15)], outcomes
    assert not list((tmp_path / "faults" / "checkpoints").glob("step_*"))
