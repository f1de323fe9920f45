"""Real processes, real gloo groups, real files: round trips, resharding, collective errors."""

from __future__ import annotations

import pytest
import torch

import dcp_engine as de
from tests import toy, workers
from tests.distributed import run_ranks

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_roundtrip_is_exact_for_plain_ddp_fsdp2(tmp_path, world_size):
    """Loaded model, AdamW state, scheduler and buffer equal the saved ones bit for bit,
    and two more training steps from each give equal states."""
    sizes = run_ranks(workers.roundtrip, world_size, str(tmp_path), toy.WRAPPERS)
    assert all(s == sizes[0] for s in sizes)


def test_reshard_fsdp2_4_ranks_to_2_ranks_and_to_1_plain_model(tmp_path):
    """Saved under FSDP2 on 4 ranks; loaded under FSDP2 on 2 ranks and into a plain model
    in this process: both equal the full state at save time."""
    saved = run_ranks(workers.fsdp_save, 4, str(tmp_path))[0]
    on_two = run_ranks(workers.fsdp_load, 2, str(tmp_path))[0]
    toy.assert_equal(saved, on_two, "4->2")

    app = toy.make_app("plain", seed=11)
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="reshard", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        assert mgr.load(app).step == 3
    toy.assert_equal(saved, toy.full_state(app), "4->1")


def test_errors_are_raised_on_every_rank_and_leave_state_untouched(tmp_path):
    msgs = run_ranks(workers.collective_errors, 2, str(tmp_path))
    for m in msgs:
        assert "disagree on the step" in m["disagree"] and "[5, 6]" in m["disagree"]
        assert "already committed" in m["twice"] and "step_00000005" in m["twice"]
        assert (
            "mismatch: " in m["shape"]
            and "shape checkpoint" in m["shape"]
            and "step_00000005" in m["shape"]
        )
        assert "model.0.weight" in m["shape"]


def test_rng_state_of_every_rank_is_restored(tmp_path):
    draws = run_ranks(workers.rng_roundtrip, 2, str(tmp_path))
    assert draws[0] != draws[1]  # per-rank streams, each restored to its own


def test_a_rank_that_never_arrives_fails_the_save_within_timeout_s(tmp_path):
    """Bounded wait: rank 0 raises a CheckpointError naming the step within timeout_s
    (plus slack), and the previous checkpoint stays the latest committed one."""
    timeout_s = 4.0
    out = run_ranks(workers.absent_rank, 2, str(tmp_path), timeout_s)[0]
    assert "save of step 2" in out["error"] and "did not arrive" in out["error"]
    assert out["elapsed"] < timeout_s + 10
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="absent", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1]
        assert mgr.load({"w": torch.zeros(4)}).step == 1
