"""Async saves on real gloo groups: snapshots, busy policies, a killed writer, clean exit."""

from __future__ import annotations

import pytest

from dcp_engine.writers import SLOW_WRITE_ENV
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


def test_when_busy_skip_skips_alike_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv(SLOW_WRITE_ENV, "1.5")
    out = run_ranks(workers.busy_policy, 2, str(tmp_path), "skip")
    for r in out:
        assert r["steps"] == [1] and r["skipped"] == [2]
        assert r["second_call_s"] < 1.0  # did not wait for the slow write


def test_when_busy_wait_waits_then_saves(tmp_path, monkeypatch):
    monkeypatch.setenv(SLOW_WRITE_ENV, "1.5")
    out = run_ranks(workers.busy_policy, 2, str(tmp_path), "wait")
    for r in out:
        assert r["steps"] == [1, 2] and r["skipped"] == []
        assert r["second_call_s"] > 0.5  # waited for the first write


def test_killed_writer_process_fails_every_rank_within_timeout(tmp_path, monkeypatch):
    """Pass: wait() raises on both ranks within timeout_s (10 s) + slack, no writer is
    left alive, and step 1 (committed before the kill) loads with its values."""
    monkeypatch.setenv(SLOW_WRITE_ENV, "2")
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
