"""The lifecycle cases of one process: the owner, the timeline, the marker, the small ones.
Each test names the case of the lifecycle issue it reproduces."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dcp_engine as de
from dcp_engine import cli, layout
from dcp_engine import marker as marker_mod


def cfg(tmp_path, **kw) -> de.CheckpointConfig:
    kw.setdefault("experiment_name", "exp")
    return de.CheckpointConfig(root_dir=str(tmp_path), async_mode="off", **kw)


def state(step: int) -> dict:
    return {"w": torch.full((256,), float(step)), "step": step}


def fresh() -> dict:
    return {"w": torch.zeros(256), "step": -1}


def ckpts(tmp_path, name="exp") -> Path:
    return tmp_path / name / "checkpoints"


# ----------------------------------------------------------------------------- 2. owner


def test_a_dead_owner_is_taken_over_and_a_torn_one_too(tmp_path, caplog):
    """Case 2 (stale lease): OWNER left by a SIGKILLed job (its pid is gone) is taken over
    at once with a warning; a torn OWNER whose heartbeat stopped long ago too."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        mgr.save(1, state(1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    owner = tmp_path / "exp" / "OWNER"
    owner.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                 "pid_started": 1.0, "job_id": "old", "started": 1.0,
                                 "token": "t"}))  # fmt: skip
    with caplog.at_level(logging.WARNING), de.CheckpointManager(cfg(tmp_path)) as mgr:
        assert mgr.load(fresh()).step == 1
    assert "took over the lease" in caplog.text and "job old" in caplog.text
    assert not owner.exists()  # released at close
    owner.write_bytes(b"\x00garbage")  # its writer died before it wrote who it was
    with de.CheckpointManager(cfg(tmp_path, lease_timeout_s=1.0)) as mgr:
        assert mgr.load(fresh()).step == 1


def test_a_lease_taken_away_stops_every_write(tmp_path):
    """Case 2: if OWNER changes hands under a running job, its heartbeat notices and the
    job writes nothing more there (ExperimentLockedError), instead of two writers."""
    with de.CheckpointManager(cfg(tmp_path, lease_timeout_s=0.4)) as mgr:
        mgr.save(1, state(1))
        owner = tmp_path / "exp" / "OWNER"
        owner.write_text(json.dumps({"host": "elsewhere", "pid": 1, "pid_started": 0.0,
                                     "job_id": "thief", "started": 0.0, "token": "x"}))  # fmt: skip
        lease = mgr._exp.lease
        assert lease is not None
        deadline = time.monotonic() + 10
        while lease._lost is None and time.monotonic() < deadline:  # the heartbeat's beat
            time.sleep(0.02)
        with pytest.raises(de.ExperimentLockedError, match="no longer holds"):
            mgr.save(2, state(2))
    assert json.loads(owner.read_text())["job_id"] == "thief"  # not removed by close
    assert sorted(p.name for p in ckpts(tmp_path).iterdir()) == ["latest", "step_00000001"]


def test_default_names_never_collide(tmp_path):
    """Case 2: two jobs started in the same second get different default experiments (the
    directory is created exclusively; a second job in that second takes ``-2``, a third
    ``-3``)."""
    now = time.time()
    for dt in range(-1, 4):  # an experiment of this name exists for every nearby second
        (tmp_path / layout.default_experiment_name("model", "data", now + dt)).mkdir()
    c = de.CheckpointConfig(root_dir=str(tmp_path), async_mode="off")
    with de.CheckpointManager(c) as a, de.CheckpointManager(c) as b:
        assert a.experiment_dir != b.experiment_dir
        assert a.experiment_dir.name.endswith("-2")
        assert b.experiment_dir.name.endswith(("-2", "-3"))  # -3 within the same second
        assert layout.is_default_experiment_name(a.experiment_dir.name, "model", "data")


# ----------------------------------------------------------------------------- 3. timeline


def test_a_step_below_the_newest_is_refused_naming_both_and_how_to_branch(tmp_path):
    """Case 3: save(3) after 5 and 6 are committed is refused (not saved and then deleted
    by retention); nothing is written or deleted."""
    with de.CheckpointManager(cfg(tmp_path, keep_last_n=2)) as mgr:
        mgr.save(5, state(5))
        mgr.save(6, state(6))
        with pytest.raises(de.TimelineError, match=r"step 3 refused: step 6 .*branch: resume="):
            mgr.save(3, state(3))
        assert [c.step for c in mgr.checkpoints()] == [5, 6]
        mgr.save(7, state(7))
    assert sorted(p.name for p in ckpts(tmp_path).iterdir()) == [
        "latest", "step_00000006", "step_00000007"]  # fmt: skip


def test_a_restarted_branch_resumes_from_its_own_newest(tmp_path):
    """Case 3: resume=<path>, experiment_name="ft": the first run starts from the source;
    restarted with the same config, it resumes from its own newest checkpoint (not the
    source again) and its saves are kept."""
    with de.CheckpointManager(cfg(tmp_path, experiment_name="src")) as mgr:
        source = mgr.save(100, state(100)).result().path
    ft = cfg(tmp_path, experiment_name="ft", resume=str(source), keep_last_n=2)
    with de.CheckpointManager(ft) as mgr:
        app = fresh()
        assert mgr.resume(app).step == 100 and app["step"] == 100
        for step in (110, 120):
            mgr.save(step, state(step))
    with de.CheckpointManager(ft) as mgr:  # the same job restarted
        app = fresh()
        assert mgr.resume(app).step == 120 and app["step"] == 120
        assert torch.equal(app["w"], state(120)["w"])
        mgr.save(130, state(130))
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [120, 130]
    assert [c.step for c in de.find_checkpoints(tmp_path / "src")] == [100]


# ----------------------------------------------------------------------------- 4. marker


def test_a_flipped_byte_in_the_only_marker_is_an_error_not_a_fresh_start(tmp_path, capsys):
    """Case 4: one flipped byte in the only COMMITTED: resume() raises naming the
    checkpoint (never None, a silent fresh start); ls and verify say CORRUPT."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        path = mgr.save(1, state(1)).result().path
    marker = path / "COMMITTED"
    raw = bytearray(marker.read_bytes())
    raw[raw.index(b'"step"') + 9] ^= 0x01  # a digit of the step
    marker.write_bytes(bytes(raw))
    assert cli.main(["ls", str(tmp_path / "exp")]) == 0
    assert "CORRUPT" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "exp")]) == 1
    app = fresh()
    for resume in ("best", "latest"):  # "best" too: a corrupt marker has no metric
        with (
            de.CheckpointManager(cfg(tmp_path, resume=resume, monitor="loss")) as mgr,
            pytest.raises(de.IntegrityError, match="not a fresh run: step_00000001"),
        ):
            mgr.resume(app)
    assert app["step"] == -1 and not torch.any(app["w"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["files"]["__0_0.raw"].pop("size"),
        lambda d: d.__setitem__("entries", "w"),
        lambda d: d["metrics"].__setitem__("loss", "low"),
    ],
    ids=["file-without-size", "entries-wrong-type", "string-metric"],
)
def test_a_malformed_marker_marks_that_checkpoint_corrupt_everywhere(tmp_path, capsys, mutate):
    """Case 4: a marker with a valid digest but a malformed field: start-up, load("best"),
    load("latest") and the CLI name it corrupt (no KeyError/TypeError traceback); latest
    goes past it and quarantines it."""
    with de.CheckpointManager(cfg(tmp_path, monitor="loss")) as mgr:
        mgr.save(1, state(1), metrics={"loss": 0.5})
        bad = mgr.save(2, state(2), metrics={"loss": 0.1}).result().path
    data = json.loads((bad / "COMMITTED").read_bytes())
    del data["digest"]
    mutate(data)
    data["digest"] = f"crc32:{marker_mod._digest(data)}"
    (bad / "COMMITTED").write_text(json.dumps(data))
    for argv, code in ((["ls", str(tmp_path / "exp")], 0), (["verify", str(bad)], 2),
                       (["inspect", str(bad)], 2), (["export", str(bad), "o.pt"], 2)):  # fmt: skip
        assert cli.main(argv) == code, argv
        out = capsys.readouterr()
        assert "Traceback" not in out.err and ("corrupt" in out.err or "CORRUPT" in out.out)
    with de.CheckpointManager(cfg(tmp_path, monitor="loss")) as mgr:  # start-up
        assert mgr.load(fresh(), "best").step == 1  # the best that is not corrupt
        app = fresh()
        assert mgr.load(app).step == 1
    assert (ckpts(tmp_path) / "step_00000002.corrupt").is_dir()


# ----------------------------------------------------------------------------- 7. small ones


def test_gc_validates_its_flags_as_the_config_does(tmp_path, capsys):
    """Case 7: `gc --keep-last-n -1` and `--keep-every-n-steps 0` are refused with the
    config's rule (exit 2, one line), and delete nothing."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        for step in range(1, 7):
            mgr.save(step, state(step))
    for flag, value, rule in (("--keep-last-n", "-1", "an int >= 0"),
                              ("--keep-every-n-steps", "0", "an int >= 1"),
                              ("--keep-top-k", "-2", "an int >= -1")):  # fmt: skip
        assert cli.main(["gc", str(tmp_path / "exp"), flag, value, "--monitor", "m"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}: expected None or {rule}" in err and "Traceback" not in err
    assert len(de.find_checkpoints(tmp_path / "exp")) == 6
    assert cli.main(["gc", str(tmp_path / "exp"), "--keep-last-n", "2"]) == 0
    assert [c.step for c in de.find_checkpoints(tmp_path / "exp")] == [6, 5]


def test_a_minus_inf_metric_is_neither_best_nor_kept_by_top_k(tmp_path):
    """Case 7: a diverged -inf loss takes no top-k slot and is not `best`."""
    with de.CheckpointManager(cfg(tmp_path, monitor="loss", keep_top_k=1)) as mgr:
        mgr.save(1, state(1), metrics={"loss": 0.5})
        mgr.save(2, state(2), metrics={"loss": -math.inf})
        mgr.save(3, state(3), metrics={"loss": 0.7})
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [1, 3]  # the best, the newest
        assert mgr.load(fresh(), "best").step == 1
    assert (ckpts(tmp_path) / "best").resolve().name == "step_00000001"


def test_directories_named_committed_or_index_json_do_not_block_start_up(tmp_path):
    """Case 7: a COMMITTED that is a directory makes that checkpoint corrupt; an index.json
    that is a directory is worked around (the markers are the truth)."""
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        mgr.save(1, state(1))
        bad = mgr.save(2, state(2)).result().path
    (bad / "COMMITTED").unlink()
    (bad / "COMMITTED").mkdir()
    (tmp_path / "exp" / "index.json").unlink()
    (tmp_path / "exp" / "index.json").mkdir()
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1]
        app = fresh()
        assert mgr.load(app).step == 1 and app["step"] == 1
        mgr.save(3, state(3))
    assert [c.step for c in de.find_checkpoints(tmp_path / "exp")] == [3, 1]


def test_best_without_a_monitor_in_the_config_uses_the_recorded_one(tmp_path):
    """Case 7: load(which="best") in a manager whose config has no monitor uses the
    monitor the experiment recorded (its config.yaml)."""
    with de.CheckpointManager(cfg(tmp_path, monitor="acc", mode="max")) as mgr:
        mgr.save(1, state(1), metrics={"acc": 0.9})
        mgr.save(2, state(2), metrics={"acc": 0.4})
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        app = fresh()
        assert mgr.load(app, which="best").step == 1 and app["step"] == 1
    # A training config of its own (no checkpoint: block): the index recorded the monitor.
    own = cfg(tmp_path, experiment_name="own", monitor="acc", mode="max")
    with de.CheckpointManager(own, run_config={"model": {"depth": 4}}) as mgr:
        mgr.save(1, state(1), metrics={"acc": 0.9})
        mgr.save(2, state(2), metrics={"acc": 0.4})
    with de.CheckpointManager(cfg(tmp_path, experiment_name="own")) as mgr:
        assert mgr.load(fresh(), which="best").step == 1
    assert de.open_checkpoint(tmp_path / "own", "best").info.step == 1
