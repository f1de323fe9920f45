"""Retention while saving, on 2 real ranks: never a moment without a loadable checkpoint."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

import dcp_engine as de
from tests import toy, watcher
from tests.distributed import multirank

pytestmark = pytest.mark.multirank


@multirank(2)
def retention_under_saves(rank: int, world_size: int, root: str, saves: int) -> dict[str, Any]:
    """Async saves with keep_last_n=1 on a slow disk (0.3 s a file): ``w`` holds the
    step, so a reader can tell that what it loads is what was saved."""
    from tests.seams import FaultyStorage

    app = {"w": torch.zeros(64), "step": 0}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="keep1", async_mode="thread", keep_last_n=1
    )
    with de.CheckpointManager(cfg, storage=FaultyStorage(slow_s=0.3)) as mgr:
        mgr.load(app)
        for step in range(1, saves + 1):
            app["w"].fill_(float(step))
            app["step"] = step
            mgr.save(step, app)
            app["w"].fill_(-1.0)  # training goes on mutating the state
        mgr.wait()  # on rank 0 this includes the retention that followed the last commit
        torch.distributed.barrier()
        return {"steps": [c.step for c in mgr.checkpoints()]}


@multirank(2)
def callback_run(
    rank: int, world_size: int, root: str, wrapper: str, total: int, stop_at: int
) -> dict[str, Any]:
    """A callback-driven loop on FSDP2/DDP with writer processes: ``stop_at`` steps, a
    clean stop (no train-end save), then a second callback resumes (``resume="latest"``)
    up to ``total``. Rank 1's clock runs 10x fast: the seconds trigger is rank 0's, so
    both ranks save the same steps. Returns the final state and what each run saved."""
    import dataclasses

    base = de.CheckpointConfig(
        root_dir=root, experiment_name=f"cb_{wrapper}", async_mode="process",
        save_every_n_steps=3, save_every_n_seconds=1000.0, keep_last_n=2,
        save_on_train_end=False, fsync=False,
    )  # fmt: skip
    now = [0.0]

    def clock() -> float:
        return now[0] * (10 if rank == 1 else 1)

    saved: list[list[int]] = []
    starts = []
    for cfg, until in ((base, stop_at), (dataclasses.replace(base, resume="latest"), total)):
        app = toy.make_app(wrapper, seed=0)
        cb = de.CheckpointCallback(cfg, clock=clock)
        start = cb.on_train_start(app)
        starts.append((start.step, start.epoch))
        mine = []
        for step in range(start.step + 1, until + 1):
            toy.train(app, 1, rank, start=step - 1)
            now[0] += 500.0  # rank 1 sees 5000 s per step: it alone would save every step
            if cb.on_step_end(step, app):
                mine.append(step)
        assert cb.manager is not None
        cb.manager.wait()
        kept = [c.step for c in cb.manager.checkpoints()]
        cb.close()
        saved.append(mine)
    return {"starts": starts, "saved": saved, "kept": kept, "state": toy.full_state(app)}


def test_keep_last_n_1_with_async_saves_always_leaves_a_committed_checkpoint(tmp_path):
    """Pass: a reader in another process, polling throughout 8 async saves with
    keep_last_n=1 and a slowed writer, never finds the experiment without a committed
    checkpoint once the first has committed, and every checkpoint it loads holds the
    values saved at its step; at the end exactly the newest remains."""
    exp = tmp_path / "keep1"
    stop = tmp_path / "stop"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    reader = ctx.Process(target=watcher.watch, args=(str(exp), str(stop), out))
    reader.start()
    try:
        results = retention_under_saves.run(str(tmp_path), 8)
    finally:
        stop.touch()
    tally = out.get(timeout=60)
    reader.join(timeout=30)
    assert [r["steps"] for r in results] == [[8], [8]]
    assert tally["empty"] == 0 and tally["bad"] == [], tally
    assert tally["loads"] > 10 and len(tally["steps"]) >= 3, tally
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [
        "latest", "step_00000008"
    ]  # fmt: skip


@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_callbacks_on_two_ranks_save_alike_and_resume_exactly(tmp_path, wrapper):
    """Pass: with a seconds trigger whose clock differs between ranks, both ranks save the
    same steps (rank 0 decides); a second run resumes at the step the first stopped after
    (its last save) and ends with the same state as an uninterrupted run."""
    out = callback_run.run(str(tmp_path / "a"), wrapper, 10, 7)
    ref = callback_run.run(str(tmp_path / "b"), wrapper, 10, 10)
    for r in out:
        # Every 3 steps, and 1000 s of rank 0's clock (500 s a step) after the last save
        # (or the start); rank 1 alone (5000 s a step) would have saved every step.
        assert r["saved"] == [[2, 3, 5, 6], [8, 9]]
        assert r["starts"] == [(0, 0), (6, 0)]
    # keep_last_n=2, plus the checkpoint the second run resumed from.
    assert out[0]["kept"] == [6, 8, 9]
    toy.assert_equal(out[0]["state"], ref[0]["state"], wrapper)
