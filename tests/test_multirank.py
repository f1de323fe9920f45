"""Real processes, real gloo groups, real files: round trips, resharding, collective errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import dcp_engine as de
from tests import toy
from tests.distributed import multirank

pytestmark = pytest.mark.multirank


@multirank(2)
def roundtrip(
    rank: int, world_size: int, root: str, wrappers: tuple[str, ...], mode: str = "off"
) -> dict[str, Any]:
    """Save after 3 steps, load into a differently initialised state, compare, train on."""
    out: dict[str, Any] = {}
    for wrapper in wrappers:
        # A plain model is replicated: DCP writes one copy, so every rank trains it alike.
        data_rank = 0 if wrapper == "plain" else rank
        app = toy.make_app(wrapper, seed=0)
        toy.train(app, 3, data_rank)
        cfg = de.CheckpointConfig(
            root_dir=root, experiment_name=f"rt_{wrapper}_{world_size}_{mode}", async_mode=mode
        )
        with de.CheckpointManager(cfg) as mgr:
            mgr.save(3, app, epoch=0, metrics={"loss": 1.5})
            saved = toy.full_state(app)
            mgr.wait()
            info = mgr.checkpoints()[-1]
            fresh = toy.make_app(wrapper, seed=1)
            loaded_info = mgr.load(fresh)
            loaded = toy.full_state(fresh)
            assert loaded_info == info, (loaded_info, info)
            assert len(mgr.checkpoints()) == 1
        if rank == 0:
            toy.assert_equal(saved, loaded, wrapper)
        toy.assert_equal(app["center"], fresh["center"], f"{wrapper}.center rank {rank}")
        # Training goes on identically from the loaded state (optimizer step counts, moments).
        toy.train(app, 2, data_rank, start=3)
        toy.train(fresh, 2, data_rank, start=3)
        a, b = toy.full_state(app), toy.full_state(fresh)
        if rank == 0 and wrapper == "ddp":
            # DDP rebuilds its gradient buckets after a module's first iteration; the fresh
            # module's first all-reduce sums in another chunking, so only float-close here.
            torch.testing.assert_close(a["model"], b["model"], rtol=1e-5, atol=1e-7)
            toy.assert_equal(a["sched"], b["sched"], "ddp sched after 2 more steps")
        elif rank == 0:
            toy.assert_equal(a, b, f"{wrapper} after 2 more steps")
        out[wrapper] = info.bytes
    return out


@multirank(4)
def fsdp_save(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 3, rank)
    # Written by the default (process) writers, read back in-line by fsdp_load.
    with de.CheckpointManager(de.CheckpointConfig(root_dir=root, experiment_name="reshard")) as mgr:
        mgr.save(3, app, epoch=0)
    state = toy.full_state(app)
    return state if rank == 0 else None


@multirank(2)
def fsdp_load(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=7)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="reshard", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load(app)
        assert info is not None and info.step == 3
    state = toy.full_state(app)
    return state if rank == 0 else None


@multirank(2)
def collective_errors(rank: int, world_size: int, root: str) -> dict[str, str]:
    """Errors raised on every rank alike: disagreeing steps, a step saved twice, a shape
    mismatch under FSDP2 (and the model unchanged after it)."""
    msgs: dict[str, str] = {}
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 1, rank)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="errors", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        try:
            mgr.save(5 + rank, app)
        except de.CheckpointError as e:
            msgs["disagree"] = str(e)
        mgr.save(5, app)
        try:
            mgr.save(5, app)
        except de.CheckpointError as e:
            msgs["twice"] = str(e)
        wide = toy.make_app("fsdp", seed=3, hidden=32)
        before = toy.full_model_state(wide)
        try:
            mgr.load(wide)
        except de.StateMismatchError as e:
            msgs["shape"] = str(e)
        assert not wide["optim"].state, "optimizer state initialised by a failed load"
        after = toy.full_model_state(wide)
        if rank == 0:
            toy.assert_equal(before, after, "model after a failed load")
        assert [c.step for c in mgr.checkpoints()] == [5]
    return msgs


@multirank(2)
def rng_roundtrip(rank: int, world_size: int, root: str) -> list[float]:
    """Each rank's RNG is saved and restored: the draws after load equal those after save."""
    import random

    import numpy as np

    torch.manual_seed(100 + rank)
    np.random.seed(200 + rank)
    random.seed(300 + rank)
    app = {"w": torch.ones(2)}
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="rng", async_mode="thread")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, app)
        draws = [torch.rand(1).item(), float(np.random.rand()), random.random()]
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        mgr.load(app)
        again = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    assert draws == again, (draws, again)
    return draws


@multirank(2)
def absent_rank(rank: int, world_size: int, root: str, timeout_s: float) -> dict[str, Any]:
    """Rank 1 never calls save: rank 0 must raise, naming the step, within the timeout."""
    import time

    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="absent", timeout_s=timeout_s, async_mode="off"
    )
    mgr = de.CheckpointManager(cfg)
    app = {"w": torch.ones(4)}
    mgr.save(1, app)
    if rank != 0:
        time.sleep(3 * timeout_s)  # alive but absent: a hang, not a crash
        return {}
    start = time.monotonic()
    try:
        mgr.save(2, app)
    except de.CheckpointError as e:
        return {"elapsed": time.monotonic() - start, "error": str(e)}
    raise AssertionError("save returned although rank 1 never arrived")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_roundtrip_is_exact_for_plain_ddp_fsdp2(tmp_path, world_size):
    """Loaded model, AdamW state, scheduler and buffer equal the saved ones bit for bit,
    and two more training steps from each give equal states."""
    sizes = roundtrip.run(str(tmp_path), toy.WRAPPERS, world_size=world_size)
    assert all(s == sizes[0] for s in sizes)


def test_reshard_fsdp2_4_ranks_to_2_ranks_and_to_1_plain_model(tmp_path):
    """Saved under FSDP2 on 4 ranks; loaded under FSDP2 on 2 ranks and into a plain model
    in this process: both equal the full state at save time."""
    saved = fsdp_save.run(str(tmp_path))[0]
    on_two = fsdp_load.run(str(tmp_path))[0]
    toy.assert_equal(saved, on_two, "4->2")

    app = toy.make_app("plain", seed=11)
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="reshard", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        assert mgr.load(app).step == 3
    toy.assert_equal(saved, toy.full_state(app), "4->1")


def test_errors_are_raised_on_every_rank_and_leave_state_untouched(tmp_path):
    msgs = collective_errors.run(str(tmp_path))
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
    draws = rng_roundtrip.run(str(tmp_path))
    assert draws[0] != draws[1]  # per-rank streams, each restored to its own


def test_a_rank_that_never_arrives_fails_the_save_within_timeout_s(tmp_path):
    """Bounded wait: rank 0 raises a CheckpointError naming the step within timeout_s
    (plus slack), and the previous checkpoint stays the latest committed one."""
    timeout_s = 4.0
    out = absent_rank.run(str(tmp_path), timeout_s)[0]
    assert "save of step 2" in out["error"] and "did not arrive" in out["error"]
    assert out["elapsed"] < timeout_s + 10
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="absent", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1]
        assert mgr.load({"w": torch.zeros(4)}).step == 1


@multirank(2)
def per_rank_plain_values(rank: int, world_size: int, root: str, mode: str) -> Any:
    """Saves plain values that differ per rank, then loads them back on every rank."""
    # One replicated tensor first: DCP's balancing gives it to rank 0, then would give the
    # next replicated item to rank 1, which has less to write.
    app: dict[str, Any] = {
        "w": torch.ones(1000),
        "counter": 100 + rank,
        "note": {"rank": rank, "names": [f"r{rank}"]},
    }
    cfg = de.CheckpointConfig(root_dir=root, experiment_name=mode, async_mode=mode)
    with de.CheckpointManager(cfg) as mgr:
        for step in (1, 2):  # the second save reuses the cached global plan
            app["counter"] = 100 * step + rank
            mgr.save(step, app).result()
    fresh: dict[str, Any] = {"w": torch.zeros(1000), "counter": None, "note": None}
    with de.CheckpointManager(dataclasses.replace(cfg, async_mode="off")) as mgr:
        mgr.load(fresh)
    assert torch.equal(fresh["w"], torch.ones(1000))
    return fresh["counter"], fresh["note"]


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_a_plain_value_that_differs_per_rank_is_saved_as_rank_0_has_it(tmp_path, mode):
    """DCP's load balancing gives a replicated item to the rank with the least to write;
    for a non-tensor value the engine always keeps rank 0's (DESIGN: plain values are
    rank 0's), so every rank loads back what rank 0 saved."""
    out = per_rank_plain_values.run(str(tmp_path), mode)
    assert out == [(200, {"rank": 0, "names": ["r0"]})] * 2
    with de.open_checkpoint(tmp_path / mode) as ckpt:
        assert ckpt.load_entries(["counter"]) == {"counter": 200}
