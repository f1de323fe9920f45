"""Progress on stderr for long commands and large library loads: on a terminal or when
asked, never into a pipe unless asked, plain lines without tqdm, rank 0 only."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dcp_engine as de
from dcp_engine import cli, progress


@pytest.fixture
def exp(tmp_path: Path) -> Path:
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="exp", monitor="loss",
                              async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in ((1, 0.5), (2, 0.4)):
            torch.manual_seed(step)
            mgr.save(step, {"model": nn.Linear(64, 64)}, metrics={"loss": loss})
    return tmp_path / "exp"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def test_each_long_command_shows_progress_when_asked_and_nothing_into_a_pipe(
    exp, tmp_path, capsys
):
    """Pass: export, average, verify and adopt write nothing to a piped stderr by
    default, and a tqdm bar ending at 100% with binary sizes when asked (``--progress``)."""
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "stock"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"w": torch.ones(128)}, checkpoint_id=src, no_dist=True)
    capsys.readouterr()
    runs = {
        "export": ["export", str(exp), str(tmp_path / "a.pt")],
        "average": ["average", str(exp), str(tmp_path / "b.pt"), "--top-k", "2"],
        "verify": ["verify", str(exp)],
        "adopt": ["adopt", str(src), str(tmp_path / "adopted"), "--step", "1"],
    }
    for name, argv in runs.items():
        assert cli.main(argv) == 0, name
        assert capsys.readouterr().err == "", name
    for name, argv in runs.items():
        if name == "adopt":
            argv = [*argv[:-1], "2"]
        elif name != "verify":
            argv[2] += "2"
        assert cli.main([*argv, "--progress"]) == 0, name
        err = capsys.readouterr().err
        assert "100%|" in err and " KiB/" in err, (name, err)


def test_without_tqdm_progress_is_plain_lines(exp, capsys, monkeypatch):
    """Pass: with tqdm not importable, ``verify --progress`` prints plain lines ending in
    ``100%`` with sizes; ``--no-progress`` prints none."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["verify", str(exp), "--progress"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(ln.startswith("verify step_0000000") for ln in lines), lines
    assert lines[-1].endswith("KiB)") and ": 100% (" in lines[-1], lines
    assert cli.main(["verify", str(exp), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_on_a_terminal_progress_shows_unasked(exp):
    """Pass: stderr on a pseudo-terminal gets the bar without ``--progress``."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dcp_engine", "verify", str(exp)],
                            stdout=subprocess.PIPE, stderr=follower)  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"verify step_00000002" in seen and b"100%" in seen, seen


def test_library_loads_show_progress_above_the_threshold(exp, capsys, monkeypatch):
    """Pass: ``CheckpointManager.load``, ``open_checkpoint().load`` and ``load_entries``
    show a bar when the environment asks and the load reaches ``LOAD_THRESHOLD``, none
    below it; ``progress=False`` silences one call."""
    monkeypatch.setenv(progress.ENV, "1")
    cfg = de.CheckpointConfig(root_dir=str(exp.parent), experiment_name="exp", async_mode="off")

    def loads() -> None:
        with de.CheckpointManager(cfg) as mgr:
            assert mgr.load({"model": nn.Linear(64, 64)}) is not None
        with de.open_checkpoint(exp) as ck:
            ck.load({"model": nn.Linear(64, 64)})
            ck.load_entries(["model"])

    loads()
    assert "load step_" not in capsys.readouterr().err
    monkeypatch.setattr(progress, "LOAD_THRESHOLD", 1024)
    loads()
    err = capsys.readouterr().err
    assert err.count("load step_00000002: 100%") == 2 and "read step_00000002: 100%" in err, err
    with de.open_checkpoint(exp) as ck:
        ck.load({"model": nn.Linear(64, 64)}, progress=False)
    assert capsys.readouterr().err == ""
