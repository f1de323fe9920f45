"""Locations that are URLs, and the commit protocol for stores without rename, on fsspec's
``memory://`` file system (one process, no server): fast unit tests. The same protocol
against a real S3 API server is in ``test_s3.py``."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import dcp_engine as de
from dcp_engine import layout, resolve
from dcp_engine.committer import Committer
from dcp_engine.lease import Lease
from dcp_engine.location import URL, as_location
from dcp_engine.objstore import FsspecStorage


@pytest.fixture
def mem() -> str:
    """A fresh prefix of the process-wide memory file system."""
    root = f"memory://t{uuid.uuid4().hex[:10]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def objects(root: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    base = fs._strip_protocol(root)
    return sorted(p[len(base) + 1 :] for p in fs.find(base))


# ----------------------------------------------------------------------------- locations


def test_a_url_is_never_turned_into_a_local_directory(tmp_path, monkeypatch, mem):
    monkeypatch.chdir(tmp_path)
    loc = as_location("s3://bucket/exp/run1")
    assert isinstance(loc, URL) and str(loc) == "s3://bucket/exp/run1"
    assert str(loc / "checkpoints" / "step_00000001") == "s3://bucket/exp/run1/checkpoints/step_00000001"
    assert loc.parent.name == "exp" and loc.name == "run1"
    assert str(as_location("http://127.0.0.1:8000/x/model.pt")) == "http://127.0.0.1:8000/x/model.pt"
    assert as_location("file:///tmp/x") == Path("/tmp/x")
    assert as_location("relative/dir") == Path("relative/dir")
    cfg = de.CheckpointConfig(root_dir=f"{mem}/experiments", experiment_name="e",
                              async_mode="thread")  # fmt: skip
    assert isinstance(cfg.root_path, URL)
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    assert not any(tmp_path.iterdir()), "a URL root wrote into a local directory"
    assert "checkpoints/step_00000001/COMMITTED" in objects(f"{mem}/experiments/e")
    with pytest.raises(de.ConfigError, match=r"did you mean s3://bucket/exp"):
        de.CheckpointConfig(root_dir="s3:/bucket/exp")


def test_a_protocol_without_its_package_is_refused_at_construction_naming_the_package(
    monkeypatch,
):
    import sys

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed, whatever this machine has
    with pytest.raises(de.ConfigError, match=r"gcsfs"):
        de.CheckpointConfig(root_dir="gs://bucket/exp")
    with pytest.raises(de.ConfigError, match=r"no fsspec file system knows nosuch://"):
        de.CheckpointConfig(root_dir="nosuch://bucket/exp")
    with pytest.raises(de.ConfigError, match=r"read-only"):
        de.CheckpointConfig(root_dir="http://127.0.0.1:1/exp")
    with pytest.raises(de.ConfigError, match=r"ftp:// is read-only here"):
        de.CheckpointConfig(root_dir="ftp://127.0.0.1/exp")
    with pytest.raises(de.ConfigError, match=r"gcsfs"):
        de.CheckpointConfig(resume="gs://bucket/exp/checkpoints/step_00000001")
    with pytest.raises(de.CheckpointError, match=r"gcsfs"):
        de.open_checkpoint("gs://bucket/exp")


def test_storage_options_reach_the_file_system_and_are_not_written_to_config_yaml(mem):
    options = {"secret_token": "s3cr3t", "client_kwargs": {"region_name": "x"}}  # nested
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", storage_options=options,
                              async_mode="thread")  # fmt: skip
    assert cfg.root_path.options == options  # type: ignore[union-attr]
    storage = FsspecStorage.of(cfg.root_path)  # type: ignore[arg-type]
    assert storage.fs.storage_options["client_kwargs"] == {"region_name": "x"}
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    config_yaml = fsspec.filesystem("memory").cat(f"{mem}/e/config.yaml").decode()
    assert "s3cr3t" not in config_yaml and "root_dir" in config_yaml


# ----------------------------------------------------------------------------- committer


@pytest.fixture
def committer(mem):
    exp = layout.ExperimentLayout(as_location(mem) / "exp")
    storage = FsspecStorage.of(exp.root)  # type: ignore[arg-type]
    lease = Lease.acquire(exp.owner_path, storage, stale_after_s=30)
    seen: list[tuple[str, list[str]]] = []

    def hook(phase: str, step: int) -> None:
        seen.append((phase, objects(f"{mem}/exp/checkpoints")))

    c = Committer(exp, storage, lease, hook=hook)
    c.seen = seen  # type: ignore[attr-defined]
    yield c
    lease.release()


def write_shards(c: Committer, step: int) -> dict:
    where = c.begin(step, None)
    assert where == c.exp.step_dir(step), "shards go under the final prefix: no rename later"
    fs = c.storage.fs  # type: ignore[attr-defined]
    fs.pipe_file(f"{where}/__0_0.raw", b"x" * 10)
    fs.pipe_file(f"{where}/.metadata", b"m")
    return {"__0_0.raw": {"size": 10, "crc32": "00000000"}}


def finalize(c: Committer, step: int, digests: dict):
    entries = {"t": {"kind": "tensors", "encoding": "tree"}}
    return c.finalize(step, epoch=0, metrics={"loss": 1.0}, extra={}, entries=entries,
                      digests=digests, world_size=1, shards="raw/1")  # fmt: skip


def test_the_marker_object_is_written_last_and_is_the_commit(committer):
    digests = write_shards(committer, 5)
    # Before the marker: a prefix without a marker is not a checkpoint.
    exp = committer.exp
    found = resolve.scan(exp)
    assert not found.committed and [p.name for p, _ in found.torn] == ["step_00000005"]
    path, marker = finalize(committer, 5, digests)
    phases = [p for p, _ in committer.seen]
    assert phases == ["marker", "committed"]
    at_marker = committer.seen[0][1]
    assert committer.seen[1][1] == at_marker, "something was written after the marker"
    assert "step_00000005/COMMITTED" in at_marker and not any(".tmp" in k for k in at_marker)
    assert path == exp.step_dir(5)
    assert resolve.read_marker(path) == marker
    assert [c.step for c in resolve.scan(exp).committed] == [5]


def test_a_prefix_without_marker_is_swept_and_a_committed_step_is_never_overwritten(committer):
    finalize(committer, 5, write_shards(committer, 5))
    write_shards(committer, 6)  # a save that crashed before its marker
    swept = committer.sweep()
    assert [p.name for p in swept] == ["step_00000006"]
    assert objects(str(committer.exp.checkpoints_dir)) == [
        "step_00000005/.metadata", "step_00000005/COMMITTED", "step_00000005/__0_0.raw",
    ]  # fmt: skip
    with pytest.raises(de.TimelineError, match="already committed"):
        committer.begin(5, None)


def test_retire_deletes_the_marker_first_and_abort_keeps_a_committed_step(committer):
    finalize(committer, 5, write_shards(committer, 5))
    committer.abort(5)  # a failure after the marker: the checkpoint exists and stays
    assert [c.step for c in resolve.scan(committer.exp).committed] == [5]
    deleted: list[str] = []
    fs = committer.storage.fs  # type: ignore[attr-defined]
    real_rm_file = fs.rm_file

    def rm_file(path, *a, **k):  # records the order of deletions (the fs is real)
        deleted.append(path.rsplit("/", 1)[-1])
        return real_rm_file(path, *a, **k)

    fs.rm_file = rm_file
    try:
        assert committer.retire(5)
    finally:
        del fs.rm_file
    assert deleted[0] == "COMMITTED"
    assert objects(str(committer.exp.checkpoints_dir)) == []
    assert not committer.retire(5)


def test_quarantine_moves_a_corrupt_checkpoint_out_of_the_owned_names(committer):
    finalize(committer, 5, write_shards(committer, 5))
    dest = committer.quarantine(committer.exp.step_dir(5), "flipped byte")
    assert dest is not None and dest.name == "step_00000005.corrupt"
    found = resolve.scan(committer.exp)
    assert not found.committed and [p.name for p in found.quarantined] == ["step_00000005.corrupt"]


def test_a_second_writer_is_refused_by_the_lease_object(mem):
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", async_mode="off")
    with de.CheckpointManager(cfg), pytest.raises(de.ExperimentLockedError, match="held by"):
        de.CheckpointManager(cfg)
    with de.CheckpointManager(cfg):  # released at close: the next job gets it
        pass


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_save_load_retention_and_aliases_on_an_object_store(mem, mode):
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", async_mode=mode,
                              monitor="loss", keep_top_k=2)  # fmt: skip
    app = {"w": torch.arange(10.0), "n": 0}
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
            app["w"].add_(1)
            app["n"] = step
            mgr.save(step, app, metrics={"loss": loss})
        mgr.wait()
    ckpts = f"{mem}/e/checkpoints"
    fs = fsspec.filesystem("memory")
    names = sorted({k.split("/")[0] for k in objects(ckpts)})
    # top-2 by loss (steps 2, 3) and the newest (4) are kept; step 1 went, marker and all
    assert names == ["best", "latest", "step_00000002", "step_00000003", "step_00000004"], names
    assert fs.cat(f"{ckpts}/latest").decode() == "step_00000004"
    assert fs.cat(f"{ckpts}/best").decode() == "step_00000002"
    fresh = {"w": torch.zeros(10), "n": -1}
    with de.CheckpointManager(dataclass_replace(cfg, resume="best")) as mgr:
        info = mgr.load(fresh, which="best")
    assert info is not None and info.step == 2 and fresh["n"] == 2
    assert torch.equal(fresh["w"], torch.arange(10.0) + 2)
    with de.open_checkpoint(f"{ckpts}/latest") as ck:
        assert ck.load_entries(["n"])["n"] == 4
    assert de.find_checkpoints(f"{mem}/e")[0].step == 4


def test_process_mode_on_memory_is_refused_naming_the_alternatives(mem):
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", async_mode="process")
    with pytest.raises(de.CheckpointError, match=r"memory://.*async_mode='thread'"):
        de.CheckpointManager(cfg)


def test_load_weights_and_stock_dcp_through_the_storage_reader_on_a_url(mem):
    model = torch.nn.Linear(4, 3)
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.save(1, {"model": model}).result()
    other = torch.nn.Linear(4, 3)
    de.load_weights(other, str(info.path), storage_options={"skip_instance_cache": True})
    assert torch.equal(other.weight, model.weight)
    with de.open_checkpoint(str(info.path), storage_options={"skip_instance_cache": True}) as ck:
        assert ck.path.options == {"skip_instance_cache": True}  # type: ignore[union-attr]
    import torch.distributed.checkpoint as dcp

    target = {"model.weight": torch.zeros(3, 4)}
    dcp.load(target, storage_reader=de.storage_reader(str(info.path)), no_dist=True)  # type: ignore[call-arg]
    assert torch.equal(target["model.weight"], model.weight)
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{mem}/plain.pt", _torch_bytes({"state_dict": model.state_dict()}))
    third = torch.nn.Linear(4, 3)
    de.load_weights(third, f"{mem}/plain.pt")
    assert torch.equal(third.bias, model.bias)


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------- local tier


def test_local_tier_keeps_the_newest_locally_uploads_all_and_resumes_from_either(mem, tmp_path):
    local = tmp_path / "local"
    cfg = de.CheckpointConfig(root_dir=mem, local_dir=str(local), experiment_name="e",
                              async_mode="thread", local_keep_last_n=2)  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        handles = [mgr.save(s, {"w": torch.full((4,), float(s)), "step": s}) for s in (1, 2, 3)]
        mgr.wait()
        assert mgr.wait_uploads(60)
        for step, h in zip((1, 2, 3), handles, strict=True):
            assert h.uploaded is not None  # the handle's upload future, as DCP's
            up = h.uploaded.result(60)
            assert up.step == step and str(up.path) == f"{mem}/e/checkpoints/{up.path.name}"
        assert mgr.remote_dir is not None and str(mgr.remote_dir) == f"{mem}/e"
        assert isinstance(mgr.experiment_dir, Path) and mgr.experiment_dir == local / "e"
    where = {c.step: c.tiers for c in _entries(cfg)}
    assert where == {1: ("remote",), 2: ("local", "remote"), 3: ("local", "remote")}, where
    on_disk = sorted(p.name for p in (local / "e" / "checkpoints").iterdir())
    assert on_disk == ["latest", "step_00000002", "step_00000003"]
    import json

    index = json.loads((local / "e" / "index.json").read_text())
    assert [c["tiers"] for c in index["checkpoints"]] == [["local", "remote"]] * 2
    assert [c.step for c in de.find_checkpoints(f"{mem}/e")] == [3, 2, 1]

    # A new node: nothing local. Resume takes the newest that verifies, from the store.
    import shutil

    shutil.rmtree(local)
    app = {"w": torch.zeros(4), "step": 0}
    with de.CheckpointManager(dataclass_replace(cfg, resume="latest")) as mgr:
        info = mgr.resume(app)
        assert info is not None and info.step == 3 and str(info.path).startswith(mem)
        assert app["step"] == 3 and torch.equal(app["w"], torch.full((4,), 3.0))
        mgr.save(4, app)
        mgr.wait()
        assert mgr.wait_uploads(60)
    assert [c.step for c in de.find_checkpoints(f"{mem}/e")] == [4, 3, 2, 1]


def test_local_tier_config_is_checked():
    with pytest.raises(de.ConfigError, match="local_dir"):
        de.CheckpointConfig(root_dir="memory://x", local_dir="memory://y")
    with pytest.raises(de.ConfigError, match="experiment_name"):
        de.CheckpointConfig(root_dir="memory://x", local_dir="/tmp/l", resume="latest")


def _entries(cfg):
    with de.CheckpointManager(cfg) as mgr:
        return mgr.checkpoints()


def test_a_branch_from_a_checkpoint_on_a_store_into_a_local_experiment(mem, tmp_path):
    """resume=<URL of a checkpoint>: a new local experiment starts from it, the source
    untouched; load(which=<URL>) loads a named remote checkpoint."""
    src_cfg = de.CheckpointConfig(root_dir=mem, experiment_name="src", async_mode="off")
    with de.CheckpointManager(src_cfg) as mgr:
        info = mgr.save(5, {"w": torch.full((3,), 5.0)}).result()
    before = objects(f"{mem}/src")
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="branch",
                              async_mode="off", resume=str(info.path))  # fmt: skip
    app = {"w": torch.zeros(3)}
    with de.CheckpointManager(cfg) as mgr:
        loaded = mgr.resume(app)
        assert loaded is not None and loaded.step == 5
        assert torch.equal(app["w"], torch.full((3,), 5.0))
        mgr.save(6, app)
        other = {"w": torch.zeros(3)}
        named = mgr.load(other, which=f"{mem}/src/checkpoints/latest")
        assert named is not None and named.step == 5
    assert objects(f"{mem}/src") == before, "the source experiment was written"
    assert [c.step for c in de.find_checkpoints(tmp_path / "branch")] == [6]


def test_a_local_file_that_no_longer_matches_its_marker_is_not_uploaded(mem, tmp_path):
    """The upload checks every byte against the local marker as it streams: a flipped
    byte fails that upload (its future raises), nothing of the step is left on the store,
    the local copy stays (``tiers == ("local",)``), and later steps upload."""
    local = tmp_path / "local"

    def flip(phase: str, step: int) -> None:  # after the local commit, before the upload
        if phase == "committed" and step == 2:
            shard = local / "e" / "checkpoints" / "step_00000002" / "__0_0.raw"
            data = bytearray(shard.read_bytes())
            data[0] ^= 0xFF
            shard.write_bytes(bytes(data))

    cfg = de.CheckpointConfig(root_dir=mem, local_dir=str(local), experiment_name="e",
                              async_mode="off", local_keep_last_n=5)  # fmt: skip
    with de.CheckpointManager(cfg, hook=flip) as mgr:
        handles = [mgr.save(s, {"w": torch.full((64,), float(s))}) for s in (1, 2, 3)]
        with pytest.raises(de.CheckpointError, match=r"step=2.*the local copies are kept"):
            mgr.wait_uploads(60)  # the failure is raised once, here (invariant 4)
        assert mgr.wait_uploads(60)
        assert handles[0].uploaded is not None and handles[0].uploaded.result().step == 1
        assert handles[1].uploaded is not None
        with pytest.raises(de.CheckpointError, match=r"step=2.*does not match its marker"):
            handles[1].uploaded.result()
        assert handles[2].uploaded is not None and handles[2].uploaded.result().step == 3
        where = {c.step: c.tiers for c in mgr.checkpoints()}
    assert where == {1: ("local", "remote"), 2: ("local",), 3: ("local", "remote")}, where
    assert not any(k.startswith("step_00000002") for k in objects(f"{mem}/e/checkpoints"))


def test_with_a_local_tier_late_metrics_reach_the_remote_best_and_retention(mem, tmp_path):
    """Metrics given after the save (a validation that ends later) go into the remote
    marker too: the remote ``best`` and ``keep_top_k`` rank by them."""
    cfg = de.CheckpointConfig(root_dir=mem, local_dir=str(tmp_path / "l"), experiment_name="e",
                              async_mode="thread", monitor="loss", keep_top_k=1)  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in [(1, 0.5), (2, 3.0), (3, 4.0)]:
            mgr.save(step, {"w": torch.ones(2) * step}).result()
            mgr.update_metrics(step, {"loss": loss})
        assert mgr.wait_uploads(60)
    remote = {c.step: dict(c.metrics) for c in de.find_checkpoints(f"{mem}/e")}
    assert remote[1] == {"loss": 0.5} and 2 not in remote, remote  # best kept, 2 retired
    assert fsspec.filesystem("memory").cat(f"{mem}/e/checkpoints/best").decode() == "step_00000001"


def test_with_a_local_tier_the_remote_checkpoint_resumed_from_is_kept(mem, tmp_path):
    import shutil

    local = tmp_path / "l"
    cfg = de.CheckpointConfig(root_dir=mem, local_dir=str(local), experiment_name="e",
                              async_mode="off", keep_last_n=1)  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.ones(2) * step})
        assert mgr.wait_uploads(60)
    shutil.rmtree(local)  # a new node
    with de.CheckpointManager(dataclass_replace(cfg, resume="latest")) as mgr:
        app = {"w": torch.zeros(2)}
        assert mgr.resume(app).step == 3  # type: ignore[union-attr]
        mgr.save(4, app)
        assert mgr.wait_uploads(60)
    assert [c.step for c in de.find_checkpoints(f"{mem}/e")] == [4, 3]  # 3: resumed from


def test_with_a_local_tier_a_corrupt_remote_checkpoint_is_quarantined_there(mem, tmp_path):
    import shutil

    local = tmp_path / "l"
    cfg = de.CheckpointConfig(root_dir=mem, local_dir=str(local), experiment_name="e",
                              async_mode="off")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.ones(64) * step})
        assert mgr.wait_uploads(60)
    shutil.rmtree(local)
    fs = fsspec.filesystem("memory")
    shard = f"{mem}/e/checkpoints/step_00000002/__0_0.raw"
    data = bytearray(fs.cat(shard))
    data[-1] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    app = {"w": torch.zeros(64)}
    with de.CheckpointManager(dataclass_replace(cfg, resume="latest")) as mgr:
        assert mgr.resume(app).step == 1  # type: ignore[union-attr]
    names = {k.split("/")[0] for k in objects(f"{mem}/e/checkpoints")}
    assert "step_00000002.corrupt" in names and "step_00000002" not in names, names


class FullStore(FsspecStorage):
    """An object store that refuses the shard uploads of one save (a quota, a 5xx)."""

    def __init__(self, protocol: str, step: int) -> None:
        super().__init__(protocol)
        self.step = step

    def open_write(self, path, *, fsync=True):  # type: ignore[no-untyped-def]
        if path.parent.name == layout.step_dirname(self.step) and path.name.startswith("__"):
            import errno

            raise OSError(errno.EDQUOT, "quota exceeded", str(path))
        return super().open_write(path, fsync=fsync)


def test_a_failed_upload_of_shards_on_an_object_store_fails_that_save_only(mem):
    """Invariant 4 on an object store: the error names the cause and the step, nothing of
    the step is left (no prefix without a marker), the previous checkpoint loads, and
    the next save succeeds."""
    cfg = de.CheckpointConfig(root_dir=mem, experiment_name="e", async_mode="thread")
    with de.CheckpointManager(cfg, storage=FullStore("memory", step=2)) as mgr:
        mgr.save(1, {"w": torch.ones(8)}).result()
        with pytest.raises(de.CheckpointError, match=r"(?s)step 2.*quota exceeded"):
            mgr.save(2, {"w": torch.ones(8) * 2}).result()
        mgr.save(3, {"w": torch.ones(8) * 3}).result()
        assert [c.step for c in mgr.checkpoints()] == [1, 3]
    names = {k.split("/")[0] for k in objects(f"{mem}/e/checkpoints")}
    assert names == {"latest", "step_00000001", "step_00000003"}, names
    with pytest.raises(TypeError, match="cannot serve"):
        de.CheckpointManager(de.CheckpointConfig(root_dir=mem, experiment_name="x"),
                             storage=de.LocalStorage())  # fmt: skip


def test_default_experiment_names_are_claimed_on_a_store_without_directories(mem):
    cfg = de.CheckpointConfig(root_dir=mem, async_mode="off", model_name="vit", dataset_name="in")
    with de.CheckpointManager(cfg) as a, de.CheckpointManager(cfg) as b:
        assert a.experiment_dir != b.experiment_dir  # the same second: -2
        for mgr in (a, b):
            claim = f"{mgr.experiment_dir}/CREATED"
            assert fsspec.filesystem("memory").exists(claim), claim
