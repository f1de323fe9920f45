"""Reads never write, and never hand out a corrupt byte (invariant 8): ``open_checkpoint``,
``load_weights``, ``dcp-engine export``/``average``/``inspect``/``ls``/``verify``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import dcp_engine as de
from dcp_engine import cli


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what a read must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def make_experiment(tmp_path: Path) -> Path:
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="exp", monitor="loss",
                              async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in ((1, 0.5), (2, 0.9)):
            torch.manual_seed(step)
            mgr.save(step, {"model": nn.Linear(8, 8), "n": step}, metrics={"loss": loss})
    return tmp_path / "exp"


def flip(path: Path) -> Path:
    shard = sorted(path.glob("*.raw"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def test_one_flipped_byte_is_refused_by_every_reader(tmp_path, capsys):
    """Pass: after one flipped byte in step 2's shard, `verify` exits 1 and `export`,
    `average` (of 2), `load_weights` and `open_checkpoint` of step 2 all refuse it by name
    (exit 2 / IntegrityError) instead of handing out the corrupt values; the model passed
    to load_weights is unchanged."""
    exp = make_experiment(tmp_path)
    shard = flip(exp / "checkpoints" / "step_00000002")
    step2 = exp / "checkpoints" / "step_00000002"
    assert cli.main(["verify", str(exp)]) == 1
    for argv in (["export", str(step2), str(tmp_path / "out.pt")],
                 ["average", str(exp), str(tmp_path / "avg.pt"), "--top-k", "2"]):  # fmt: skip
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert shard.name in err and "crc32" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "avg.pt").exists()
    model = nn.Linear(8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(de.IntegrityError, match=shard.name):
        de.load_weights(model, step2, key="model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(de.IntegrityError, match=shard.name):
        de.open_checkpoint(step2)
    with pytest.raises(de.IntegrityError, match=shard.name):
        de.open_checkpoint(exp, 2)
    # latest goes past it, to the newest that verifies (and says so); verify=False opts out.
    with de.open_checkpoint(exp) as ck:
        assert ck.info.step == 1
    assert de.open_checkpoint(step2, verify=False).info.step == 2


def test_reads_change_nothing_on_disk_even_beside_a_torn_save(tmp_path, capsys):
    """Pass: with a `.tmp` of a save in flight and a job's OWNER lease present, every read
    command and open_checkpoint leave every file, name and mtime as they were."""
    exp = make_experiment(tmp_path)
    (exp / "checkpoints" / "step_00000003.tmp").mkdir()
    (exp / "checkpoints" / "step_00000003.tmp" / "__0_0.raw").write_bytes(b"partial")
    (exp / "OWNER").write_text('{"a": "job that is writing"}')
    (exp / "index.json").unlink()  # a reader must not rebuild it either
    before = tree(exp)
    with de.open_checkpoint(exp, "best") as ck:
        assert ck.info.step == 1
        loaded = ck.load_entries(["n"])
        assert loaded == {"n": 1}
        target = {"model": nn.Linear(8, 8)}
        ck.load(target)
    assert de.find_checkpoints(exp)[0].step == 2
    for argv in (["ls", str(exp)], ["verify", str(exp)], ["inspect", str(exp)],
                 ["export", str(exp), str(tmp_path / "o.pt"), "--key", "model"],
                 ["average", str(exp), str(tmp_path / "a.pt")],
                 ["gc", str(exp), "--keep-last-n", "1", "--dry-run"]):  # fmt: skip
        assert cli.main(argv) == 0, (argv, capsys.readouterr())
    assert tree(exp) == before


def test_best_and_a_step_resolve_in_an_experiment_and_a_bad_which_is_refused(tmp_path):
    exp = make_experiment(tmp_path)
    assert de.open_checkpoint(exp, "best").info.step == 1  # by the recorded monitor
    assert de.open_checkpoint(exp, 2).info.step == 2
    assert de.open_checkpoint(exp / "checkpoints" / "latest").info.step == 2
    with pytest.raises(ValueError, match="picks among an experiment's checkpoints"):
        de.open_checkpoint(exp / "checkpoints" / "step_00000001", "best")
    with pytest.raises(de.CheckpointNotFoundError, match="no checkpoint for step 7"):
        de.open_checkpoint(exp, 7)
    empty = tmp_path / "empty" / "checkpoints"
    empty.mkdir(parents=True)
    with pytest.raises(de.CheckpointNotFoundError, match="no committed checkpoint"):
        de.open_checkpoint(empty.parent)


def test_a_reader_load_is_all_or_nothing(tmp_path):
    """Pass: loading a checkpoint into a state with a wrong shape raises naming the key
    and leaves the state as it was."""
    exp = make_experiment(tmp_path)
    small, wrong = nn.Linear(8, 8), nn.Linear(8, 4)
    before = [p.clone() for p in (*small.parameters(), *wrong.parameters())]
    with de.open_checkpoint(exp) as ck, pytest.raises(de.StateMismatchError, match="model"):
        ck.load({"model": wrong})
    after = [p for p in (*small.parameters(), *wrong.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert os.listdir(exp / "checkpoints")  # untouched
