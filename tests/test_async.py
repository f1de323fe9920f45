"""Async saves on real gloo groups: snapshots, busy policies, a killed writer, clean exit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dcp_engine as de
from tests import toy
from tests.distributed import multirank
from tests.test_multirank import roundtrip

pytestmark = pytest.mark.multirank


@multirank(2)
def snapshot_under_mutation(rank: int, world_size: int, root: str, mode: str, staging: str) -> None:
    """What is written is the state at the moment of save(), whatever training does next."""
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 2, rank)
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name=f"snap_{mode}_{staging}", async_mode=mode, staging=staging
    )
    with de.CheckpointManager(cfg) as mgr:
        at_save = toy.full_state(app)
        assert not mgr.save(2, app).skipped  # returned before the write (staged)
        if staging == "sync":
            with torch.no_grad():  # in-place mutation right after save() returns
                for p in app["model"].parameters():
                    p.mul_(-3.0).add_(1.0)
                app["center"].fill_(7.0)
        toy.train(app, 2, rank, start=2)  # optimizer steps (waits for an overlapped copy)
        mgr.wait()
        fresh = toy.make_app("fsdp", seed=5)
        assert mgr.load(fresh).step == 2
        loaded = toy.full_state(fresh)
    if rank == 0:
        toy.assert_equal(at_save, loaded, f"{mode}/{staging}")


@multirank(2)
def busy_policy(rank: int, world_size: int, root: str, policy: str) -> dict[str, Any]:
    """Rank 1's write of step 1 is held at a gate; a second save comes while it is held.
    With "skip" the gate opens after save(2) returned; with "wait" a thread opens it once
    the held write has started, and save(2) can only return after that."""
    import threading

    from tests.seams import FaultyStorage, Gate

    gate, started = Gate(f"{root}/gate_{policy}"), Gate(f"{root}/started_{policy}")
    storage = FaultyStorage(step=1, gate=gate, started=started) if rank == 1 else None
    app = {"w": torch.full((64,), float(rank)), "step": 0}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name=f"busy_{policy}", async_mode="thread", when_busy=policy
    )
    with de.CheckpointManager(cfg, storage=storage) as mgr:
        mgr.save(1, app)
        if rank == 1:
            started.wait()  # rank 1's write of step 1 is held now
        torch.distributed.barrier()  # ... on every rank's watch
        if policy == "wait" and rank == 1:
            threading.Thread(target=gate.open).start()
        handle = mgr.save(2, app)
        gate_open = gate.is_open()
        torch.distributed.barrier()  # every rank looked before the gate opens
        gate.open()
        mgr.wait()
        return {
            "steps": [c.step for c in mgr.checkpoints()],
            "skipped": [s.step for s in mgr.stats() if s.skipped],
            "handle_skipped": handle.skipped,
            "gate_open_at_return": gate_open,
        }


@multirank(2)
def writer_killed(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """SIGKILL of rank 1's writer process mid-write: every rank raises from wait() within
    the timeout; a fresh manager loads the previous checkpoint."""
    import os
    import signal
    import time

    import psutil

    from tests.seams import FaultyStorage, Gate

    started = Gate(f"{root}/writing")
    # Rank 1's writer holds its write of step 2 at a gate that never opens.
    held = FaultyStorage(step=2, gate=Gate(f"{root}/never"), started=started)
    app = {"w": torch.arange(1000, dtype=torch.float32) + rank}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="killed", async_mode="process", timeout_s=10.0
    )
    mgr = de.CheckpointManager(cfg, storage=held if rank == 1 else None)
    mgr.save(1, app)
    mgr.wait()
    mgr.save(2, app)
    if rank == 1:
        started.wait()  # the writer is in its write
        os.kill(mgr._saves._writer.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    start = time.monotonic()
    try:
        mgr.wait()
        error = None
    except de.CheckpointError as e:
        error = str(e)
    elapsed = time.monotonic() - start
    mgr.close()
    children = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    fresh = {"w": torch.zeros(1000)}
    with de.CheckpointManager(
        de.CheckpointConfig(root_dir=root, experiment_name="killed", async_mode="off")
    ) as again:
        info = again.load(fresh)
    return {
        "error": error,
        "elapsed": elapsed,
        "loaded": info.step if info else None,
        # torch's shared-memory manager (it removes the staging segment if the job is
        # killed) exits with this process; no process of ours is left
        "children": [c.name() for c in children if c.name() != "torch_shm_manager"],
        "w0": fresh["w"][0].item(),
    }


@multirank(2)
def clean_close(rank: int, world_size: int, root: str, fail: bool) -> dict[str, Any]:
    """After close() (also after an exception in training) no writer process is alive and
    no shared-memory segment of ours remains."""
    import os

    import psutil

    def shm_state() -> tuple[set[str], int]:
        # Named segments (semaphores of other tests' queues aside) and our own mappings of
        # shared memory (torch's unlinked segments show as '/dev/shm/... (deleted)').
        names = {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}
        with open("/proc/self/maps") as f:
            mapped = sum("/dev/shm/" in line for line in f)
        return names, mapped

    shm_before, mapped_before = shm_state()
    app = toy.make_app("fsdp", seed=0)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name=f"close_{fail}", async_mode="process")
    try:
        with de.CheckpointManager(cfg) as mgr:
            writer_pid = mgr._saves._writer.pid  # type: ignore[attr-defined]
            toy.train(app, 1, rank)
            mgr.save(1, app)
            if fail:
                raise RuntimeError("training blew up")
    except RuntimeError as e:
        assert "blew up" in str(e)
    alive = [p.pid for p in psutil.Process().children(recursive=True) if p.is_running()]
    import gc

    gc.collect()
    shm_after, mapped_after = shm_state()
    mine = f"torch_{os.getpid()}_"
    return {
        "writer_alive": writer_pid in alive,
        # Ours only: named segments carry their creator's pid (torch_<pid>_...), and other
        # tests' jobs may be staging in process mode on this machine at the same time.
        "new_shm": sorted(n for n in shm_after - shm_before if n.startswith(mine)),
        "mapped": (mapped_before, mapped_after),
    }


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_roundtrip_is_exact(tmp_path, mode):
    """FSDP2 and DDP on 2 ranks written by the background writers load back bit for bit."""
    roundtrip.run(str(tmp_path), ("ddp", "fsdp"), mode)


@pytest.mark.parametrize(
    "mode, staging",
    [("thread", "sync"), ("process", "sync"), ("thread", "overlap"), ("process", "overlap")],
)
def test_written_state_is_the_state_at_the_call_despite_mutation(tmp_path, mode, staging):
    snapshot_under_mutation.run(str(tmp_path), mode, staging)


def test_when_busy_skip_skips_alike_on_every_rank(tmp_path):
    """Pass: rank 1's first write is held at a gate; the second save is skipped on both
    ranks (its handle says so), without waiting for the held write."""
    out = busy_policy.run(str(tmp_path), "skip")
    for r in out:
        assert r["steps"] == [1] and r["skipped"] == [2] and r["handle_skipped"]
        assert not r["gate_open_at_return"]  # save(2) returned while step 1 was held


def test_when_busy_wait_waits_then_saves(tmp_path):
    """Pass: the second save waits for the held first write (released by a thread once
    the write is under way), then saves."""
    out = busy_policy.run(str(tmp_path), "wait")
    for r in out:
        assert r["steps"] == [1, 2] and r["skipped"] == [] and not r["handle_skipped"]
        assert r["gate_open_at_return"]  # save(2) returned only after the write went on


def test_killed_writer_process_fails_every_rank_within_timeout(tmp_path):
    """Pass: wait() raises on both ranks within timeout_s (10 s) + slack, no writer is
    left alive, and step 1 (committed before the kill) loads with its values."""
    out = writer_killed.run(str(tmp_path))
    for rank, r in enumerate(out):
        assert r["error"] is not None and "step 2" in r["error"], r
        assert r["elapsed"] < 10 + 20, r
        assert r["loaded"] == 1 and r["children"] == [], r
        assert r["w0"] == float(rank) or rank == 1  # replicated tensor: rank 0's copy
    assert "died" in out[1]["error"]


@pytest.mark.parametrize("fail", [False, True])
def test_close_leaves_no_process_and_no_shared_memory(tmp_path, fail):
    for r in clean_close.run(str(tmp_path), fail):
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
