"""A full disk, a flipped byte, a cut file, foreign names: each detected, nothing lost."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import dcp_engine as de
from tests import seams
from tests.faults import ranks


def cfg(tmp_path, **kw):
    return de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="faults",
                               async_mode="off", **kw)  # fmt: skip


def fresh_app():
    return {"w": torch.zeros(4096), "b": torch.zeros(64, dtype=torch.long), "step": -1}


def assert_is_step(app, step):
    expected = ranks.state(step)
    assert app["step"] == step and torch.equal(app["w"], expected["w"])


@pytest.mark.multirank
@pytest.mark.parametrize(
    "mode, fault, message",
    [
        ("off", seams.ENOSPC, "No space left on device: needed"),
        ("thread", seams.ENOSPC, "No space left on device: needed"),
        ("process", seams.ENOSPC, "No space left on device: needed"),
        ("thread", seams.EIO, "Input/output error"),
        ("off", seams.EACCES, "Permission denied"),
    ],
)
def test_a_write_error_on_one_rank_fails_the_save_everywhere_and_the_next_one_succeeds(
    tmp_path, mode, fault, message
):
    """Pass: ENOSPC (or EIO, EACCES) injected on rank 1 after 1,000 bytes of step 2's
    shards: both ranks raise for step 2 within timeout_s, naming rank 1 and the OS error
    (not torch.save's "unexpected pos"), step 2 is not committed, latest stays step 1,
    and no .tmp is left; step 3 then commits; a fresh job resumes at step 3."""
    storage = seams.FaultyStorage(step=2, error=fault, after_bytes=1000)
    out = ranks.save_two.run(str(tmp_path), mode, 20.0, {1: {"storage": storage}})
    for r in out:
        assert r["error"] and "step 2" in r["error"] and message in r["error"], r
        assert "rank 1" in r["error"] and "unexpected pos" not in r["error"], r
        assert r["elapsed"] < 20.0 + 30, r
        assert r["third"] is None, r
    ckpts = tmp_path / "faults" / "checkpoints"
    assert not (ckpts / "step_00000002").exists()
    assert not (ckpts / "step_00000002.tmp").exists()  # removed once the failure was agreed
    after = ranks.load_latest.run(str(tmp_path))
    assert after[0]["step"] == 3 and after[0]["steps"] == [1, 3]


def test_a_save_that_would_fill_the_disk_is_refused_up_front(tmp_path):
    """Pass: with less free space than the last checkpoint took, the save is refused
    before anything is written, saying how much is needed and free."""
    storage = seams.FaultyStorage()
    with de.CheckpointManager(cfg(tmp_path), storage=storage) as mgr:
        info = mgr.save(1, ranks.state(1)).result()
        storage.free = 1000
        with pytest.raises(de.CheckpointError, match=r"1000 B free.*took .*KiB.*free at least"):
            mgr.save(2, ranks.state(2))
        assert not (info.path.parent / "step_00000002.tmp").exists()
        storage.free = None
        mgr.save(2, ranks.state(2))


@pytest.mark.parametrize("damage", ["flip", "truncate_metadata", "truncate_shard"])
def test_a_corrupt_latest_is_skipped_on_resume_and_refused_by_name(tmp_path, caplog, damage):
    """Pass: step 2 damaged (a flipped byte in a shard, a cut .metadata, a cut shard):
    resume picks step 1 and logs why step 2 was skipped; loading step 2 by name and
    verify() raise IntegrityError naming the file; `dcp-engine verify` would exit 1."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        mgr.save(1, ranks.state(1))
        bad = mgr.save(2, ranks.state(2)).result().path
    if damage == "flip":
        target = sorted(bad.glob("*.raw"))[0]
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x10
        target.write_bytes(bytes(data))
    else:
        target = bad / (".metadata" if damage == "truncate_metadata" else "__0_0.raw")
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        with pytest.raises(de.IntegrityError, match=target.name):
            mgr.load(fresh_app(), 2)
        if damage == "flip":
            with pytest.raises(de.IntegrityError, match=r"crc32 \w{8}, the marker says \w{8}"):
                mgr.verify(2)
        assert mgr.verify(1).step == 1
        app = fresh_app()
        with caplog.at_level(logging.WARNING):
            info = mgr.load(app)
        assert info.step == 1
        assert_is_step(app, 1)
        assert any("skipping" in r.message and target.name in r.message for r in caplog.records)
        # Quarantined: latest, retention and the timeline no longer see step 2 ...
        ckpts = bad.parent
        assert not bad.exists() and (ckpts / "step_00000002.corrupt").is_dir()
        assert [c.step for c in mgr.checkpoints()] == [1]
        assert (ckpts / "latest").resolve().name == "step_00000001"
        # ... so the resumed run saves step 2 again instead of crash-looping on it.
        assert mgr.save(2, ranks.state(2)).result().step == 2
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        app = fresh_app()
        assert mgr.load(app).step == 2
        assert_is_step(app, 2)


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    """Pass: when no committed checkpoint matches its digests, resume raises instead of
    silently starting over."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        path = mgr.save(1, ranks.state(1)).result().path
    shard = sorted(path.glob("*.raw"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    for _ in range(2):  # quarantined by the first attempt: still never a fresh start
        with (
            de.CheckpointManager(cfg(tmp_path)) as mgr,
            pytest.raises(de.IntegrityError, match=r"not a fresh run: step_00000001"),
        ):
            mgr.load(fresh_app())


def test_foreign_names_markerless_steps_a_cut_index_and_stale_tmps(tmp_path):
    """Pass: `step_00000999.backup/`, `notes/` and a marker-less `step_00000005/` are never
    listed, loaded or deleted (retention included); an index cut in half is rebuilt from
    the markers; stale `.tmp` directories are swept at start-up; resume loads step 3."""
    c = cfg(tmp_path, keep_last_n=1)
    with de.CheckpointManager(c) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, ranks.state(step))
    exp = tmp_path / "faults"
    ckpts = exp / "checkpoints"
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000999.backup")
    (ckpts / "notes").mkdir()
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000005")
    (ckpts / "step_00000005" / "COMMITTED").unlink()
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000004.tmp")
    index = exp / "index.json"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with de.CheckpointManager(c) as mgr:
        assert [e.step for e in mgr.checkpoints()] == [3]
        app = fresh_app()
        assert mgr.load(app).step == 3
        assert_is_step(app, 3)
        mgr.save(6, ranks.state(6))
        mgr.wait()
    assert json.loads(index.read_text())["latest"] == 6
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "notes", "step_00000003", "step_00000005", "step_00000006",
                     "step_00000999.backup"]  # fmt: skip
