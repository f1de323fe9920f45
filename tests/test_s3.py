"""Checkpoints on a real S3 API server (moto, started on 127.0.0.1 by the ``s3`` fixture)
through s3fs: FSDP2 on 2 ranks saved, killed and resumed exactly; the kill loop; retention
and the CLI on an ``s3://`` experiment; reads over plain HTTP (``python -m http.server``)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dcp_engine as de
from dcp_engine import resolve
from dcp_engine.location import as_location
from tests import seams, toy
from tests.distributed import multirank
from tests.faults import ranks
from tests.servers import http_server, keys

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def bucket_of(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[0]


# ----------------------------------------------------------------------------- FSDP2


@multirank(2)
def fsdp_save_then_die(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    """Commit step 3 (process writers), then rank 0 is SIGKILLed at step 4 once every
    rank's shards are uploaded, before the marker: step 4 must never be loaded."""
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 3, rank)
    hook = seams.KillAt("written", step=4) if rank == 0 else seams.no_hook
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="fsdp", timeout_s=20)
    mgr = de.CheckpointManager(cfg, hook=hook)
    mgr.save(3, app, epoch=0).result()
    saved = toy.full_state(app)
    toy.train(app, 1, rank, start=3)
    with contextlib.suppress(de.CheckpointError):  # rank 1: rank 0 died under it
        mgr.save(4, app, epoch=0).result()
    return saved if rank == 0 else None


@multirank(2)
def fsdp_resume(rank: int, world_size: int, root: str) -> dict[str, Any]:
    app = toy.make_app("fsdp", seed=9)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="fsdp", resume="latest",
                              async_mode="thread")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load(app)
        assert info is not None
        loaded = toy.full_state(app)
        toy.train(app, 1, rank, start=3)
        mgr.save(4, app, epoch=0).result()  # step 4 again: it was never committed
        steps = [c.step for c in mgr.checkpoints()]
    return {"step": info.step, "state": loaded if rank == 0 else None, "steps": steps}


def test_fsdp2_on_two_ranks_saves_to_s3_is_killed_and_resumes_exactly(s3, s3_endpoint):
    root = f"{s3}/runs"
    outcomes = fsdp_save_then_die.outcomes(root)
    assert outcomes[0] == ("died", -signal.SIGKILL), outcomes[0]
    assert outcomes[1][0] == "ok", outcomes[1]  # its save of step 4 failed, named
    # Step 4's shards are in the bucket, its marker is not: never a checkpoint.
    objs = keys(s3_endpoint, bucket_of(s3), "runs/fsdp/checkpoints/")
    assert any(k.startswith("runs/fsdp/checkpoints/step_00000004/__") for k in objs), objs
    assert "runs/fsdp/checkpoints/step_00000004/COMMITTED" not in objs
    assert "runs/fsdp/checkpoints/step_00000003/COMMITTED" in objs
    saved = fsdp_save_reference()
    results = fsdp_resume.run(root)
    assert results[0]["step"] == 3
    toy.assert_equal(saved, results[0]["state"], "resumed from s3")
    assert results[0]["steps"] == [3, 4]
    # The torn prefix of the killed job was swept: step 4 holds what its marker lists.
    marker = resolve.read_marker(as_location(f"{root}/fsdp/checkpoints/step_00000004"))
    objs = keys(s3_endpoint, bucket_of(s3), "runs/fsdp/checkpoints/step_00000004/")
    listed = {f"runs/fsdp/checkpoints/step_00000004/{n}" for n in [*marker.files, "COMMITTED"]}
    assert set(objs) == listed, (objs, listed)


@multirank(2)
def fsdp_reference(rank: int, world_size: int) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 3, rank)
    state = toy.full_state(app)
    return state if rank == 0 else None


def fsdp_save_reference() -> dict[str, Any]:
    """The state at step 3, computed again (training is deterministic): what was saved."""
    return fsdp_reference.run()[0]


# ----------------------------------------------------------------------------- kills


@pytest.mark.slow
def test_a_saver_on_s3_killed_12_times_never_loses_or_tears_a_checkpoint(s3, s3_endpoint):
    """The kill loop of the fault suite against S3: after every SIGKILL (saver and writer
    process together) a fresh job loads a committed checkpoint holding exactly its
    step's values, and no marker-less step prefix is ever loaded."""
    root = f"{s3}/kills"
    rng = random.Random(20261130)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    last = 0
    for i in range(12):
        mode = "thread" if i % 2 else "process"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.saver", root, mode],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline(), f"kill {i}: the saver died before saving"
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cfg = de.CheckpointConfig(root_dir=root, experiment_name="faults", async_mode="off",
                                  keep_last_n=1)  # fmt: skip
        app = ranks.state(-1)
        with de.CheckpointManager(cfg) as mgr:
            info = mgr.load(app)
        assert info is not None, f"kill {i}: no committed checkpoint"
        expected = ranks.state(info.step)
        assert app["step"] == info.step
        assert torch.equal(app["w"], expected["w"]) and torch.equal(app["b"], expected["b"])
        assert info.step >= last, f"kill {i}: went back from {last} to {info.step}"
        last = info.step
    assert last > 6


# ----------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dcp_engine", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_retention_and_the_cli_on_an_s3_experiment(s3, s3_endpoint, tmp_path):
    exp = f"{s3}/cli/e"
    cfg = de.CheckpointConfig(root_dir=f"{s3}/cli", experiment_name="e", async_mode="thread",
                              monitor="loss", keep_top_k=2)  # fmt: skip
    model = torch.nn.Linear(8, 4)
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in [(1, 4.0), (2, 1.0), (3, 3.0), (4, 2.0)]:
            mgr.save(step, {"model": model, "step": step}, metrics={"loss": loss})
        mgr.wait()
    objs = keys(s3_endpoint, bucket_of(s3), "cli/e/checkpoints/")
    steps = sorted({k.split("/")[3] for k in objs if k.split("/")[3].startswith("step_")})
    assert steps == ["step_00000002", "step_00000004"], steps  # top-2 by loss, the newest

    before = keys(s3_endpoint, bucket_of(s3), "cli/")
    ls = cli("ls", exp)
    assert ls.returncode == 0, ls.stderr
    assert "loss=1" in ls.stdout and "best" in ls.stdout and "latest" in ls.stdout

    verify = cli("verify", exp)
    assert verify.returncode == 0 and verify.stdout.count("OK") == 2, verify.stdout + verify.stderr

    out = tmp_path / "model.pt"
    export = cli("export", f"{exp}/checkpoints/best", str(out), "--key", "model")
    assert export.returncode == 0, export.stderr
    assert torch.equal(torch.load(out)["weight"], model.weight)
    to_s3 = cli("export", f"{exp}/checkpoints/latest", f"{s3}/exports/model.pt", "--key", "model")
    assert to_s3.returncode == 0, to_s3.stderr
    assert "exports/model.pt" in keys(s3_endpoint, bucket_of(s3), "exports/")

    inspect = cli("inspect", f"{exp}/checkpoints/latest")
    assert inspect.returncode == 0 and "step        4" in inspect.stdout, inspect.stdout
    with de.open_checkpoint(exp, "best") as ck:
        assert ck.info.step == 2
    # Reads never write (invariant 8): ls, verify, export, inspect, open_checkpoint.
    assert keys(s3_endpoint, bucket_of(s3), "cli/") == before

    avg = cli("average", exp, f"{s3}/exports/avg.pt", "--top-k", "2", "--key", "model")
    assert avg.returncode == 0 and "steps [2, 4]" in avg.stdout, avg.stdout + avg.stderr
    assert "exports/avg.pt" in keys(s3_endpoint, bucket_of(s3), "exports/")

    gc = cli("gc", exp, "--keep-last-n", "1")
    assert gc.returncode == 0, gc.stderr
    # The best (step 2) is protected by its alias; nothing else is left to delete.
    assert "kept 2" in gc.stdout, gc.stdout

    # A flipped byte in an object: verify says BAD (exit 1), resume skips and quarantines it.
    from tests.servers import s3_client

    client = s3_client(s3_endpoint)
    key = "cli/e/checkpoints/step_00000004/__0_0.raw"
    body = bytearray(client.get_object(Bucket=bucket_of(s3), Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket_of(s3), Key=key, Body=bytes(body))
    bad = cli("verify", exp)
    assert bad.returncode == 1 and "BAD" in bad.stdout, bad.stdout
    fresh = torch.nn.Linear(8, 4)
    with de.CheckpointManager(de.CheckpointConfig(root_dir=f"{s3}/cli", experiment_name="e",
                                                  async_mode="off", monitor="loss",
                                                  resume="latest")) as mgr:  # fmt: skip
        info = mgr.load({"model": fresh, "step": 0})
    assert info is not None and info.step == 2
    objs = keys(s3_endpoint, bucket_of(s3), "cli/e/checkpoints/")
    assert any(k.startswith("cli/e/checkpoints/step_00000004.corrupt/") for k in objs)
    assert not any(k.startswith("cli/e/checkpoints/step_00000004/") for k in objs)


def test_a_second_writer_on_s3_is_refused_by_the_conditional_lease(s3):
    cfg = de.CheckpointConfig(root_dir=f"{s3}/lease", experiment_name="e", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        with pytest.raises(de.ExperimentLockedError, match="held by"):
            de.CheckpointManager(cfg)
    with de.CheckpointManager(cfg) as mgr:  # released at close
        assert [c.step for c in mgr.checkpoints()] == [1]


def test_the_cli_refuses_an_unknown_protocol_and_never_prints_a_traceback():
    r = cli("ls", "nosuch://bucket/exp")
    assert r.returncode == 2 and "nosuch://" in r.stderr and "Traceback" not in r.stderr
    r = cli("verify", "s3:/bucket/exp")
    assert r.returncode == 2 and "did you mean s3://bucket/exp" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- http


def test_load_weights_and_inspect_over_http(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    torch.save({"model": model.state_dict()}, tmp_path / "model.pt")
    cfg = de.CheckpointConfig(root_dir=str(tmp_path / "runs"), experiment_name="e",
                              async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.save(7, {"model": model}).result()
    ckpt_rel = Path(info.path).relative_to(tmp_path).as_posix()
    with http_server(tmp_path) as base:
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        de.load_weights(plain, f"{base}/model.pt")
        toy.assert_equal(plain.state_dict(), model.state_dict(), "from http file")
        other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        de.load_weights(other, f"{base}/{ckpt_rel}")
        toy.assert_equal(other.state_dict(), model.state_dict(), "from http checkpoint")
        r = cli("inspect", f"{base}/{ckpt_rel}")
        assert r.returncode == 0 and "step        7" in r.stdout, r.stdout + r.stderr
        # An experiment over HTTP: listed, found, verified and opened, nothing written.
        ls = cli("ls", f"{base}/runs/e")
        assert ls.returncode == 0 and "latest" in ls.stdout, ls.stdout + ls.stderr
        verify = cli("verify", f"{base}/runs/e")
        assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
        assert [c.step for c in de.find_checkpoints(f"{base}/runs/e")] == [7]
        with de.open_checkpoint(f"{base}/runs/e") as ck:
            assert ck.info.step == 7
        with pytest.raises(de.CheckpointNotFoundError):
            de.load_weights(plain, f"{base}/missing.pt")
        with pytest.raises(de.ConfigError, match="read-only"):
            de.CheckpointConfig(root_dir=f"{base}/runs")


# ----------------------------------------------------------------------------- local tier


def test_local_tier_killed_during_upload_resumes_locally_and_is_never_half_visible(
    s3, s3_endpoint, tmp_path
):
    """Step 2 commits to local disk; the job dies while uploading it (every shard up, no
    marker). The remote experiment never shows step 2; the next job resumes it from the
    local copy, sweeps the torn prefix and uploads step 2 again."""
    root, local = f"{s3}/tiers", str(tmp_path / "local")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "tests.faults.tier_saver", local, root]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["1", "2"]
    objs = keys(s3_endpoint, bucket_of(s3), "tiers/tiered/checkpoints/")
    assert "tiers/tiered/checkpoints/step_00000001/COMMITTED" in objs
    assert any(k.startswith("tiers/tiered/checkpoints/step_00000002/__") for k in objs), objs
    assert "tiers/tiered/checkpoints/step_00000002/COMMITTED" not in objs
    assert [c.step for c in de.find_checkpoints(f"{root}/tiered")] == [1]

    cfg = de.CheckpointConfig(root_dir=root, local_dir=local, experiment_name="tiered",
                              async_mode="thread", resume="latest")  # fmt: skip
    app = ranks.state(-1)
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.resume(app)
        assert info is not None and info.step == 2 and isinstance(info.path, Path)
        assert torch.equal(app["w"], ranks.state(2)["w"])
        assert mgr.wait_uploads(120)
        where = {c.step: c.tiers for c in mgr.checkpoints()}
    assert where == {1: ("local", "remote"), 2: ("local", "remote")}, where
    remote = de.find_checkpoints(f"{root}/tiered")
    assert [c.step for c in remote] == [2, 1]
    with de.open_checkpoint(f"{root}/tiered") as ck:  # verified, from the bucket
        assert ck.info.step == 2 and ck.load_entries(["step"])["step"] == 2


# ----------------------------------------------------------------------------- lease


def test_the_lease_on_s3_is_taken_over_and_beaten_with_conditional_writes(s3):
    """A dead holder's OWNER is replaced in one conditional PUT; a heartbeat never
    overwrites an OWNER that changed since it was read; a holder whose OWNER was taken
    sees it at its next beat and writes nothing more."""
    import json
    import subprocess as sp

    from dcp_engine.objstore import FsspecStorage

    root = as_location(f"{s3}/lease2")
    storage = FsspecStorage.of(root)  # type: ignore[arg-type]
    owner = root / "e" / "OWNER"
    # The conditional write itself: a stale tag is refused, the object stays.
    storage.write_atomic(root / "probe", b"one")
    _, tag = storage.read_tagged(root / "probe")
    storage.write_atomic(root / "probe", b"other")
    assert storage.touch_if(root / "probe", b"mine", tag) is False
    assert storage.read_bytes(root / "probe") == b"other"

    dead = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                  text=True, check=True)  # fmt: skip
    import socket

    storage.write_atomic(owner, json.dumps({
        "host": socket.gethostname(), "pid": int(dead.stdout), "pid_started": 1.0,
        "job_id": "gone", "started": 1.0, "token": "dead", "stale_after_s": 2.0,
    }).encode())  # fmt: skip
    cfg = de.CheckpointConfig(root_dir=f"{s3}/lease2", experiment_name="e", async_mode="off",
                              lease_timeout_s=2.0)  # fmt: skip
    mgr = de.CheckpointManager(cfg)
    try:
        mine = json.loads(storage.read_bytes(owner))
        assert mine["token"] != "dead" and mine["pid"] == os.getpid()
        mgr.save(1, {"w": torch.ones(2)})
        # Another job takes the lease (as a take-over would): this one must notice.
        storage.write_atomic(owner, json.dumps({**mine, "token": "thief"}).encode())
        deadline, step = time.monotonic() + 30, 1
        while time.monotonic() < deadline:
            step += 1
            try:
                mgr.save(step, {"w": torch.ones(2)})
            except de.ExperimentLockedError as e:
                assert "taken over" in str(e)
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the lost lease was never noticed")
        assert json.loads(storage.read_bytes(owner))["token"] == "thief"  # not overwritten
    finally:
        with contextlib.suppress(de.CheckpointError):
            mgr.close()
