"""Real SIGKILLs of a rank at named points of a save (2 ranks, gloo, CPU)."""

from __future__ import annotations

import pytest

from tests import seams
from tests.faults import ranks

pytestmark = pytest.mark.multirank

TIMEOUT_S = 8.0
SLACK_S = 30.0  # process start-up, DCP's own timeouts of the writer process, a busy machine


@pytest.mark.parametrize(
    "point, victim, mode, resumed",
    [
        ("write", 1, "off", 1),  # mid-shard on rank 1
        ("write", 1, "thread", 1),
        ("written", 1, "off", 1),  # shards durable, rank 1 gone before the commit
        ("written", 0, "thread", 1),
        ("marker", 0, "off", 1),  # marker written, not renamed: still a .tmp
        ("committed", 0, "off", 2),  # renamed: committed, although the index never heard
        ("indexed", 0, "thread", 2),  # index written, latest not moved
    ],
)
def test_a_rank_killed_mid_save_fails_the_others_in_time_and_resume_finds_a_commit(
    tmp_path, point, victim, mode, resumed
):
    """Pass: the killed rank dies (-9); the survivor's save of step 2 raises within
    timeout_s + slack (never hangs); a fresh 2-rank job then resumes from the newest
    committed step (1, or 2 if the kill came after the rename) with exactly its values,
    and never from a torn directory."""
    if point == "write":  # through the shard file system, after the first bytes
        seam = {"storage": seams.FaultyStorage(step=2, kill_after_bytes=1000)}
    else:  # through the committer's phase hook
        seam = {"hook": seams.KillAt(point, step=2)}
    outcomes = ranks.save_two.outcomes(str(tmp_path), mode, TIMEOUT_S,
                                  {victim: seam})  # fmt: skip
    assert outcomes[victim] == ("died", -9), outcomes
    kind, survivor = outcomes[1 - victim]
    assert kind == "ok", survivor
    assert survivor["error"] is not None and "step 2" in survivor["error"], survivor
    print(point, victim, mode, f"survivor raised after {survivor['elapsed']:.1f} s")
    assert survivor["elapsed"] < TIMEOUT_S * 4 + SLACK_S, survivor
    if victim == 1:  # rank 0 survived: it removed the failed save's .tmp
        assert not (tmp_path / "faults" / "checkpoints" / "step_00000002.tmp").exists()
    after = ranks.load_latest.run(str(tmp_path))
    assert after[0]["step"] == after[1]["step"] == resumed, after
    assert after[0]["steps"][-1] == resumed
