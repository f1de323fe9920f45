"""Async saves on real gloo groups: snapshots, busy policies, a killed writer, clean exit."""

from __future__ import annotations

import pytest

from tests import toy, workers
from tests.distributed import run_ranks

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_roundtrip_is_exact(tmp_path, mode):
    """FSDP2 and DDP on 2 ranks written by the background writers load back bit for bit."""
    run_ranks(workers.roundtrip, 2, str(tmp_path), ("ddp", "fsdp"), mode)


@pytest.mark.parametrize(
    "mode, staging",
    [("thread", "sync"), ("process", "sync"), ("thread", "overlap"), ("process", "overlap")],
)
def test_written_state_is_the_state_at_the_call_despite_mutation(tmp_path, mode, staging):
    run_ranks(workers.snapshot_under_mutation, 2, str(tmp_path), mode, staging)


def test_when_busy_skip_skips_alike_on_every_rank(tmp_path):
    """Pass: rank 1's first write is held at a gate; the second save is skipped on both
    ranks (its handle says so), without waiting for the held write."""
    out = run_ranks(workers.busy_policy, 2, str(tmp_path), "skip")
    for r in out:
        assert r["steps"] == [1] and r["skipped"] == [2] and r["handle_skipped"]
        assert not r["gate_open_at_return"]  # save(2) returned while step 1 was held


def test_when_busy_wait_waits_then_saves(tmp_path):
    """Pass: the second save waits for the held first write (released by a thread once
    the write is under way), then saves."""
    out = run_ranks(workers.busy_policy, 2, str(tmp_path), "wait")
    for r in out:
        assert r["steps"] == [1, 2] and r["skipped"] == [] and not r["handle_skipped"]
        assert r["gate_open_at_return"]  # save(2) returned only after the write went on


def test_killed_writer_process_fails_every_rank_within_timeout(tmp_path):
    """Pass: wait() raises on both ranks within timeout_s (10 s) + slack, no writer is
    left alive, and step 1 (committed before the kill) loads with its values."""
    out = run_ranks(workers.writer_killed, 2, str(tmp_path))
    for rank, r in enumerate(out):
        assert r["error"] is not None and "step 2" in r["error"], r
        assert r["elapsed"] < 10 + 20, r
        assert r["loaded"] == 1 and r["children"] == [], r
        assert r["w0"] == float(rank) or rank == 1  # replicated tensor: rank 0's copy
    assert "died" in out[1]["error"]


@pytest.mark.parametrize("fail", [False, True])
def test_close_leaves_no_process_and_no_shared_memory(tmp_path, fail):
    for r in run_ranks(workers.clean_close, 2, str(tmp_path), fail):
        assert not r["writer_alive"] and r["new_shm"] == []
        assert r["mapped"][1] <= r["mapped"][0], r  # staging buffers unmapped


def test_toy_state_helpers_compare_exactly():
    app = toy.make_app("plain", seed=0)
    toy.assert_equal(toy.full_state(app), toy.full_state(app))


def test_staging_is_allocated_at_start_up_without_touching_the_training(tmp_path):
    """A fresh run's load() allocates the model's staging buffers without stepping the
    optimizer (DCP would, to create its state); the optimizer's first step adds its moments;
    saves then allocate nothing, and a resumed run's load() allocates everything."""
    import dataclasses

    import dcp_engine as de

    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", async_mode="thread")
    app, twin = toy.make_app("plain", seed=0), toy.make_app("plain", seed=0)
    with de.CheckpointManager(cfg) as mgr:
        assert mgr.load(app) is None  # fresh run
        pool = mgr._saves.pool
        assert pool is not None and pool.generation == 1
        assert not app["optim"].state  # not stepped
        model_bufs = {k: b for k, b in pool.buffers.items() if k.startswith("model.")}
        assert model_bufs and not any(k.startswith("optim.state") for k in pool.buffers)
        toy.train(app, 1, rank=0)  # AdamW creates its moments; the pool grows after the step
        assert pool.generation == 2 and any(k.startswith("optim.state") for k in pool.buffers)
        assert all(pool.buffers[k] is b for k, b in model_bufs.items())  # kept
        grown = dict(pool.buffers)
        for step in (1, 2):
            toy.train(app, 1, rank=0, start=step)
            mgr.save(step, app)
        mgr.wait()
        assert pool.generation == 2 and pool.buffers == grown
    toy.train(twin, 3, rank=0)  # the same training without a checkpointer
    toy.assert_equal(toy.full_state(app), toy.full_state(twin))
    resumed = toy.make_app("plain", seed=1)
    with de.CheckpointManager(dataclasses.replace(cfg, async_mode="process")) as mgr:
        mgr.load(resumed)
        assert mgr._saves.pool is not None and mgr._saves.pool.generation == 1
        assert set(mgr._saves.pool.buffers) == set(grown)
        mgr.save(3, resumed)
        mgr.wait()
        assert mgr._saves.pool.generation == 1


@pytest.mark.parametrize("mode", ["off", "thread", "process"])
def test_close_frees_the_manager_and_its_staging(tmp_path, mode):
    """Pass: once closed, no saver thread of ours is alive, and once dropped the manager
    (and so its staging buffers) is garbage: no thread, hook or exit handler keeps it."""
    import gc
    import threading
    import weakref

    import torch

    import dcp_engine as de

    model = torch.nn.Linear(64, 64)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    app = {"model": model, "optim": optim}
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="free", async_mode=mode)
    mgr = de.CheckpointManager(cfg)
    mgr.load(app)
    for step in (1, 2):
        mgr.save(step, app)
    mgr.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dcp_engine")]
    ref = weakref.ref(mgr)
    del mgr
    gc.collect()
    assert ref() is None
