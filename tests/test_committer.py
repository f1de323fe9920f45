"""The committer alone, on real files: begin, finalize, amend, abort, retire, quarantine,
sweep, each in its order, and nothing without the lease."""

from __future__ import annotations

import pytest

import dcp_engine as de
from dcp_engine import layout, resolve
from dcp_engine.committer import Committer
from dcp_engine.lease import Lease
from dcp_engine.storage import LocalStorage


@pytest.fixture
def committer(tmp_path):
    exp = layout.ExperimentLayout(tmp_path / "exp")
    exp.checkpoints_dir.mkdir(parents=True)
    storage = LocalStorage()
    lease = Lease.acquire(exp.owner_path, storage, stale_after_s=30)
    phases: list[tuple[str, int]] = []

    def hook(phase: str, step: int) -> None:
        # What exists at each phase: the marker before the rename, the name after.
        phases.append((phase, step))
        tmp, final = exp.tmp_dir(step), exp.step_dir(step)
        if phase == "marker":
            assert layout.marker_path(tmp).is_file() and not final.exists()
        if phase == "committed":
            assert final.is_dir() and not tmp.exists()

    c = Committer(exp, storage, lease, hook=hook)
    c.phases = phases  # type: ignore[attr-defined]
    yield c
    lease.release()


def write_shards(c: Committer, step: int) -> dict:
    tmp = c.begin(step, None)
    (tmp / "__0_0.raw").write_bytes(b"x" * 10)
    (tmp / ".metadata").write_bytes(b"m")
    return {"__0_0.raw": {"size": 10, "crc32": "00000000"}}


def finalize(c: Committer, step: int, digests: dict):
    entries = {"t": {"kind": "tensors", "encoding": "tree"}}
    return c.finalize(step, epoch=0, metrics={"loss": 1.0}, extra={}, entries=entries,
                      digests=digests, world_size=1, shards="raw/1")  # fmt: skip


def test_finalize_writes_the_marker_then_renames(committer):
    path, marker = finalize(committer, 5, write_shards(committer, 5))
    assert committer.phases == [("marker", 5), ("committed", 5)]
    assert path.name == "step_00000005"
    on_disk = resolve.read_marker(path)
    assert on_disk == marker and on_disk.files["__0_0.raw"].crc32 == "00000000"
    assert on_disk.files[".metadata"].size == 1 and on_disk.total_bytes == 11


def test_begin_refuses_a_step_not_above_the_newest_and_a_committed_one(committer):
    finalize(committer, 5, write_shards(committer, 5))
    with pytest.raises(de.TimelineError, match="step 5 is already committed"):
        committer.begin(5, 5)
    with pytest.raises(de.TimelineError, match=r"save of step 3 refused: step 5 .* branch"):
        committer.begin(3, 5)
    assert not committer.exp.tmp_dir(3).exists()


def test_a_size_that_is_not_what_was_hashed_is_refused(committer):
    digests = write_shards(committer, 2)
    digests["__0_0.raw"]["size"] = 11
    with pytest.raises(de.IntegrityError, match="10 bytes on disk, but 11 were written"):
        finalize(committer, 2, digests)
    assert not committer.exp.step_dir(2).exists()


def test_abort_retire_quarantine_and_sweep(committer):
    exp = committer.exp
    write_shards(committer, 1)
    committer.abort(1)
    assert not exp.tmp_dir(1).exists()
    path, _ = finalize(committer, 2, write_shards(committer, 2))
    assert committer.retire(2) and not path.exists() and not exp.tmp_dir(2).exists()
    assert not committer.retire(2)  # already gone
    path, _ = finalize(committer, 3, write_shards(committer, 3))
    assert committer.quarantine(path, "test").name == "step_00000003.corrupt"
    path, _ = finalize(committer, 3, write_shards(committer, 3))
    assert committer.quarantine(path, "again").name == "step_00000003.corrupt-2"
    assert committer.quarantine(exp.root / "notes", "foreign") is None  # not ours
    exp.tmp_dir(9).mkdir()
    (exp.checkpoints_dir / "step_00000009.backup").mkdir()
    (exp.root / ".index.json.123.tmp").write_text("{")  # a crash mid-write of the index
    (exp.checkpoints_dir / ".latest.123.tmp").symlink_to("step_00000003")
    (exp.root / ".notes.123.tmp").write_text("not ours")
    assert committer.sweep() == [exp.tmp_dir(9), exp.root / ".index.json.123.tmp",
                                 exp.checkpoints_dir / ".latest.123.tmp"]  # fmt: skip
    assert (exp.checkpoints_dir / "step_00000009.backup").is_dir()
    assert (exp.root / ".notes.123.tmp").is_file()
    assert sorted(p.name for p in resolve.scan(exp).quarantined) == [
        "step_00000003.corrupt", "step_00000003.corrupt-2"]  # fmt: skip


def test_nothing_is_written_once_the_lease_is_lost(committer):
    committer.exp.owner_path.unlink()  # another job's hand (or an operator's)
    committer.lease._lost = "OWNER removed"  # what the heartbeat concludes
    for action in (lambda: committer.begin(1, None), committer.sweep,
                   lambda: committer.retire(1)):  # fmt: skip
        with pytest.raises(de.ExperimentLockedError, match="no longer holds"):
            action()
