"""``dcp-engine adopt`` / ``dcp_engine.adopt``: a checkpoint written by stock ``dcp.save``
is verified, digested and committed into an experiment, and training continues from it."""

from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)

import dcp_engine as de
from dcp_engine import LocalStorage, adopt, cli, layout
from dcp_engine.marker import Marker
from tests import toy
from tests.distributed import multirank

# stock dcp.save in one process says so each time
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def optim_sd(app: dict[str, Any], layout_: str) -> dict[str, Any]:
    """The optimizer's state dict as a migrating user's ``dcp.save`` had it."""
    model, optim = app["model"], app["optim"]
    if layout_ == "state_dict":  # optimizer.state_dict(): parameter ids
        return optim.state_dict()
    flat = layout_ == "flat"  # torchtitan's; "fqn": DCP's tutorial (get_state_dict)
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    return get_optimizer_state_dict(model, optim, options=options)


def stock_checkpoint(path: Path, layout_: str = "state_dict") -> dict[str, Any]:
    """A trained model + AdamW + scheduler + centre, written by stock ``dcp.save``."""
    app = toy.make_app("plain", seed=3)
    toy.train(app, steps=3, rank=0)
    state = {
        "model": get_model_state_dict(app["model"]),
        "optim": optim_sd(app, layout_),
        "sched": app["sched"].state_dict(),
        "center": app["center"],
        "step": 30,
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return app


def cli_run(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dcp_engine", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("layout_", ["state_dict", "fqn", "flat"])
def test_a_stock_dcp_checkpoint_is_adopted_resumed_exactly_and_training_goes_on(
    tmp_path, layout_
):
    """Pass: ``dcp-engine adopt`` commits the dcp.save directory as step 30 (marker with a
    CRC-32 per file, source untouched); ``resume`` restores model, AdamW (whatever layout
    the optimizer was saved in), scheduler, centre and a plain value bit for bit into
    fresh objects; the next save commits step 31 and resumes too."""
    src = tmp_path / "step-30"
    app = stock_checkpoint(src, layout_)
    saved_optim = copy.deepcopy(app["optim"].state_dict())
    before = tree(src)
    exp = tmp_path / "runs" / "migrated"
    assert cli.main(["adopt", str(src), str(exp), "--step", "30", "--metric", "loss=0.5"]) == 0
    assert tree(src) == before
    ckpt = exp / "checkpoints" / "step_00000030"
    marker = Marker.from_bytes((ckpt / layout.MARKER_FILE).read_bytes(), "t")
    assert marker.metrics == {"loss": 0.5} and set(marker.files) == set(before)
    assert all(f.crc32 is not None for f in marker.files.values())
    assert (exp / "checkpoints" / "latest").resolve() == ckpt.resolve()
    assert cli.main(["verify", str(exp)]) == 0

    fresh = toy.make_app("plain", seed=8)
    fresh_state = {**fresh, "step": 0}
    cfg = de.CheckpointConfig(root_dir=str(exp.parent), experiment_name="migrated",
                              resume="latest", async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.resume(fresh_state)
        assert info is not None and info.step == 30
        toy.assert_equal(toy.full_state(app), toy.full_state(fresh))
        assert fresh_state["step"] == 30
        toy.train(app, steps=1, rank=0, start=3)
        toy.train(fresh, steps=1, rank=0, start=3)
        toy.assert_equal(toy.full_state(app), toy.full_state(fresh))
        mgr.save(31, {**fresh, "step": 31}).result()
    again = toy.make_app("plain", seed=9)
    with de.CheckpointManager(cfg) as mgr:
        assert mgr.resume({**again, "step": 0}).step == 31
    toy.assert_equal(toy.full_state(app), toy.full_state(again))
    if layout_ == "state_dict":  # an offline read gives int ids back, loadable as is
        offline = de.open_checkpoint(ckpt).load_entries(["optim"])["optim"]
        assert sorted(offline["state"]) == [0, 1, 2, 3, 4, 5]
        fresh_optim = toy.make_app("plain", seed=1)["optim"]
        fresh_optim.load_state_dict(offline)
        toy.assert_equal(saved_optim["state"], fresh_optim.state_dict()["state"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("again", "already committed"),
        ("older", "timeline only goes forward"),
        ("empty", "is not a DCP checkpoint (no .metadata)"),
        ("missing", "__0_0.distcp is missing"),
        ("truncated", "is truncated"),
        ("garbage", ".metadata is unreadable"),
        ("nowhere", "does not exist"),
    ],
)
def test_adopt_refuses_with_one_line_and_leaves_everything_as_it_was(
    tmp_path, capsys, case, message
):
    """Pass: each refusal is exit 2 with one line naming the problem, no traceback; no
    ``.tmp`` in the experiment and the source as it was (the command as installed for
    one case, in process for the others)."""
    src = tmp_path / "src"
    stock_checkpoint(src)
    exp = tmp_path / "exp"
    assert cli.main(["adopt", str(src), str(exp), "--step", "5"]) == 0
    bad = tmp_path / "bad"
    stock_checkpoint(bad)
    step = 5 if case == "again" else 3 if case == "older" else 9
    if case == "empty":
        bad = tmp_path / "empty"
        bad.mkdir()
    elif case == "missing":
        (bad / "__0_0.distcp").unlink()
    elif case == "truncated":
        data = (bad / "__0_0.distcp").read_bytes()
        (bad / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        (bad / ".metadata").write_bytes(b"not a pickle")
    elif case == "nowhere":
        bad = tmp_path / "nowhere"
    before = tree(bad) if bad.exists() else None
    capsys.readouterr()
    if case == "missing":
        proc = cli_run("adopt", bad, exp, "--step", step)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = cli.main(["adopt", str(bad), str(exp), "--step", str(step)]), ""
        err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert (tree(bad) if bad.exists() else None) == before
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["latest", "step_00000005"]


class FullDisk(LocalStorage):
    """The experiment's disk fills up at the second file written (ENOSPC)."""

    def __init__(self) -> None:
        self.writes = 0

    def open_write(self, path: Path, *, fsync: bool = True) -> Any:
        self.writes += 1
        if self.writes == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return super().open_write(path, fsync=fsync)


class CrossDevice(LocalStorage):
    """The second file renamed into the experiment is on another file system (EXDEV)."""

    def __init__(self) -> None:
        self.renames_seen = 0

    def publish(self, src: Path, dst: Path, *, fsync: bool = True) -> None:
        self.renames_seen += 1
        if self.renames_seen == 2:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        super().publish(src, dst, fsync=fsync)


@pytest.mark.parametrize("move", [False, True])
def test_a_failed_adopt_leaves_no_tmp_and_the_source_whole_then_a_retry_commits(tmp_path, move):
    """Pass: a full disk during the copy (a move: a rename across file systems after the
    first file moved) raises naming the cause; no ``step_X.tmp``, no step, the source's
    files as they were (the move put its first file back); the retry commits, and after
    a move no source directory is left."""
    src = tmp_path / "src"
    app = stock_checkpoint(src)
    before = tree(src)
    exp = tmp_path / "exp"
    if move:
        with pytest.raises(de.CheckpointError, match="another file system"):
            adopt(src, exp, step=7, move=True, storage=CrossDevice())
    else:
        with pytest.raises(OSError, match="No space left"):
            adopt(src, exp, step=7, storage=FullDisk())
    assert tree(src) == before
    assert [p.name for p in (exp / "checkpoints").iterdir()] == []
    info = adopt(src, exp, step=7, move=move)
    assert info.step == 7 and not src.exists() if move else tree(src) == before
    fresh = toy.make_app("plain", seed=4)
    with de.open_checkpoint(exp) as ck:
        ck.load({"model": fresh["model"], "optim": fresh["optim"]})
    toy.assert_equal(toy.full_state(app)["optim"], toy.full_state(fresh)["optim"])


def test_adopt_into_an_object_store_experiment(tmp_path):
    """Pass: the experiment may be a URL (``memory://``): the marker object is written
    last and ``open_checkpoint`` of the URL loads the values exactly."""
    src = tmp_path / "src"
    app = stock_checkpoint(src)
    url = "memory://adopt-test/runs/exp"
    info = adopt(src, url, step=2)
    assert str(info.path) == f"{url}/checkpoints/step_00000002"
    fresh = toy.make_app("plain", seed=4)
    with de.open_checkpoint(url) as ck:
        assert ck.info.step == 2
        ck.load({"model": fresh["model"], "center": fresh["center"]})
    toy.assert_equal(toy.full_state(app)["model"], toy.full_state(fresh)["model"])
    assert torch.equal(app["center"], fresh["center"])


class AppState:
    """DCP's tutorial: the model and optimizer behind one Stateful key."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optim, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])  # fmt: skip


def test_dcps_tutorial_checkpoint_is_adopted_from_a_url_and_loads_into_its_app_state(tmp_path):
    """Pass: DCP's tutorial layout (``{"app": AppState(model, optim)}``), read from a
    ``memory://`` source, loads exactly into a fresh ``AppState`` under ``"app"``."""
    import fsspec

    app = toy.make_app("plain", seed=1)
    toy.train(app, steps=2, rank=0)
    local = tmp_path / "src"
    dcp.save({"app": AppState(app["model"], app["optim"])}, checkpoint_id=local, no_dist=True)
    fs = fsspec.filesystem("memory")
    for f in local.iterdir():
        fs.pipe(f"memory://adopt-src/ck/{f.name}", f.read_bytes())
    info = adopt("memory://adopt-src/ck", tmp_path / "exp", step=4)
    assert info.extra == {"adopted_from": "memory://adopt-src/ck"}
    fresh = toy.make_app("plain", seed=7)
    with de.open_checkpoint(tmp_path / "exp") as ck:
        assert ck.keys == ["app"]
        ck.load({"app": AppState(fresh["model"], fresh["optim"])})
    toy.assert_equal(toy.full_state(app)["model"], toy.full_state(fresh)["model"])
    toy.assert_equal(toy.full_state(app)["optim"], toy.full_state(fresh)["optim"])


@multirank(2)
def stock_fsdp_save(rank: int, world_size: int, path: str) -> dict[str, Any] | None:
    """A 2-rank FSDP2 run saving with stock ``dcp.save`` (``optimizer.state_dict()``:
    parameter ids, DTensor moments); rank 0 returns the full state."""
    app = toy.make_app("fsdp", seed=3)
    toy.train(app, steps=2, rank=rank)
    state = {"model": get_model_state_dict(app["model"]), "optim": app["optim"].state_dict(),
             "center": app["center"]}  # fmt: skip
    dcp.save(state, checkpoint_id=path)
    full = toy.full_state(app)
    return full if rank == 0 else None


@multirank(2)
def resume_fsdp(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=11)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="exp", resume="latest",
                              async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.resume({"model": app["model"], "optim": app["optim"], "center": app["center"]})
        assert info is not None and info.step == 20
    full = toy.full_state(app)
    return full if rank == 0 else None


@pytest.mark.slow
@pytest.mark.multirank
def test_a_two_rank_fsdp2_stock_checkpoint_is_adopted_and_resumed_on_two_ranks(tmp_path):
    """Pass: what 2 FSDP2 ranks wrote with stock ``dcp.save`` (torchtitan's situation) is
    adopted (world size 2 in the marker) and resumed by 2 FSDP2 ranks bit for bit."""
    src = tmp_path / "step-20"
    saved = stock_fsdp_save.run(str(src))[0]
    info = adopt(src, tmp_path / "exp", step=20)
    assert de.open_checkpoint(info.path).marker.world_size == 2
    resumed = resume_fsdp.run(str(tmp_path))[0]
    for key in ("model", "optim", "center"):
        toy.assert_equal(saved[key], resumed[key], key)
