"""Retention while saving, on 2 real ranks: never a moment without a loadable checkpoint."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from tests import toy, watcher, workers
from tests.distributed import run_ranks

pytestmark = pytest.mark.multirank


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
        results = run_ranks(workers.retention_under_saves, 2, str(tmp_path), 8)
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
    out = run_ranks(workers.callback_run, 2, str(tmp_path / "a"), wrapper, 10, 7)
    ref = run_ranks(workers.callback_run, 2, str(tmp_path / "b"), wrapper, 10, 10)
    for r in out:
        # Every 3 steps, and 1000 s of rank 0's clock (500 s a step) after the last save
        # (or the start); rank 1 alone (5000 s a step) would have saved every step.
        assert r["saved"] == [[2, 3, 5, 6], [8, 9]]
        assert r["starts"] == [(0, 0), (6, 0)]
    # keep_last_n=2, plus the checkpoint the second run resumed from.
    assert out[0]["kept"] == [6, 8, 9]
    toy.assert_equal(out[0]["state"], ref[0]["state"], wrapper)
