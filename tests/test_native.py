"""The engine's shard format (``raw/1``) under DCP's planner: one raw file per rank,
read by stock DCP through ``storage_reader``, exported to DCP's stock format, and
checkpoints written before it still loading."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_engine as de
from dcp_engine import layout
from dcp_engine.export import export
from dcp_engine.marker import Marker
from tests import toy
from tests.distributed import multirank

FIXTURES = Path(__file__).parent / "fixtures"


def odd_state() -> dict:
    """Every kind of leaf the format must carry bit for bit."""
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "mask": torch.tensor([True, False, True]),
        "ints": torch.arange(11, dtype=torch.int64),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "note": "hello",
        "nested": {"x": torch.ones(2, 2), "count": 7},
    }


def zeros_like(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif isinstance(v, dict):
            out[k] = zeros_like(v)
        else:
            out[k] = None
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_stock_dcp_writes_and_reads_the_raw_format(tmp_path):
    state = odd_state()
    writer = de.storage_writer(tmp_path / "ck")
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".metadata", "__0_0.raw"]
    assert set(writer.files) == {".metadata", "__0_0.raw"}  # digests, computed while writing
    out = zeros_like(state)
    dcp.load(out, storage_reader=de.storage_reader(tmp_path / "ck"), no_dist=True)
    assert_same(state, out)


def test_tensor_bytes_are_written_raw_not_per_item_torch_save(mgr):
    marker_bytes = torch.arange(1000, 1256, dtype=torch.int32)
    model = toy.make_app("plain", seed=0)["model"]
    handle = mgr.save(1, {"probe": marker_bytes, "model": model})
    assert handle.staged.done() and handle.committed.done()  # async_mode="off"
    info = handle.result()
    files = sorted(p.name for p in info.path.iterdir())
    assert files == [".metadata", "COMMITTED", "__0_0.raw"]
    raw = (info.path / "__0_0.raw").read_bytes()
    assert marker_bytes.numpy().tobytes() in raw
    metadata = pickle.loads((info.path / ".metadata").read_bytes())
    pickled = [s for s in metadata.storage_data.values() if not s.dtype]
    # no zip archive at all: tensors raw, the non-tensor values in torch's plain pickle
    assert pickled and b"PK\x05\x06" not in raw
    marker = Marker.from_bytes((info.path / layout.MARKER_FILE).read_bytes(), "test")
    assert marker.shards == "raw/1"


def test_engine_checkpoint_loads_with_stock_dcp_and_storage_reader(mgr):
    app = toy.make_app("plain", seed=1)
    toy.train(app, steps=2, rank=0)
    info = mgr.save(2, app).result()
    fresh = toy.make_app("plain", seed=9)
    target = {"model": fresh["model"].state_dict()}
    dcp.load(target, storage_reader=de.storage_reader(info.path), no_dist=True)
    toy.assert_equal(app["model"].state_dict(), target["model"])


def test_a_checkpoint_in_the_stock_format_still_loads(tmp_path):
    """Written by the engine before raw/1 (DCP's per-item torch.save, a marker without
    ``shards``): verified and loaded by the manager and by open_checkpoint."""
    exp = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy_torch_save" / "legacy", exp, symlinks=True)
    expected = torch.load(FIXTURES / "legacy_torch_save" / "expected.pt", weights_only=True)
    path = exp / "checkpoints" / "step_00000003"
    assert Marker.from_bytes((path / layout.MARKER_FILE).read_bytes(), "t").shards == (
        "dcp/torch_save"
    )
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    extra = {"t": torch.zeros(5, dtype=torch.bfloat16), "note": None}
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="legacy", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load({"model": model, "optim": optim, "extra": extra})
        assert info is not None and info.step == 3
        toy.assert_equal(expected["model"], model.state_dict())
        toy.assert_equal(expected["optim"], optim.state_dict())
        assert torch.equal(extra["t"], expected["t"]) and extra["note"] == "hello"
        mgr.save(4, {"model": model, "optim": optim, "extra": extra}).result()  # now raw/1
    reader = de.open_checkpoint(exp, "latest")
    assert reader.info.step == 4 and reader.marker.shards == "raw/1"
    assert torch.equal(de.open_checkpoint(path).load_tensor("model.weight"), model.weight)


def test_export_format_dcp_is_read_by_stock_dcp_without_dcp_engine(mgr, tmp_path):
    app = toy.make_app("plain", seed=2)
    toy.train(app, steps=2, rank=0)
    info = mgr.save(5, app).result()
    out = tmp_path / "stock"
    proc = subprocess.run(
        [sys.executable, "-m", "dcp_engine", "export", str(info.path), str(out), "--format", "dcp"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp"]
    expected = {k: v.clone() for k, v in app["model"].state_dict().items()}
    # A fresh interpreter where dcp_engine cannot be imported: stock DCP only.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dcp_engine"] = None  # any import of it fails
        import torch, torch.distributed.checkpoint as dcp
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        target = {{"model": {{k: torch.zeros_like(v) for k, v in expected.items()}}}}
        dcp.load(target, checkpoint_id={str(out)!r}, no_dist=True)
        assert all(torch.equal(target["model"][k], v) for k, v in expected.items())
        print("stock ok")
    """)
    torch.save(expected, tmp_path / "expected.pt")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "stock ok" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "dcp_engine", "export", str(info.path), str(out), "--format", "dcp"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "exists" in proc.stderr and "Traceback" not in proc.stderr


def test_export_format_dcp_of_one_key(mgr, tmp_path):
    app = {"teacher": torch.nn.Linear(3, 2), "student": torch.nn.Linear(3, 2)}
    info = mgr.save(1, app).result()
    out = export(info.path, tmp_path / "teacher", key="teacher", fmt="dcp")
    target = {"teacher": {k: torch.zeros_like(v) for k, v in app["teacher"].state_dict().items()}}
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    toy.assert_equal(app["teacher"].state_dict(), target["teacher"])
    with pytest.raises(dcp.api.CheckpointException, match="student"):
        dcp.load({"student": {"weight": torch.zeros(2, 3)}}, checkpoint_id=str(out), no_dist=True)
    with pytest.raises(de.CheckpointError, match="no key 'nope'"):
        export(info.path, tmp_path / "nope", key="nope", fmt="dcp")


def test_a_script_without_main_guard_works_in_process_mode(tmp_path):
    """The writer process is its own interpreter: the training script is never imported
    again (its top level runs once), and it needs no ``if __name__ == "__main__"``."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch, dcp_engine as de
        print("top level ran")
        cfg = de.CheckpointConfig(root_dir={str(tmp_path)!r}, experiment_name="x",
                                  async_mode="process")
        mgr = de.CheckpointManager(cfg)
        model = torch.nn.Linear(8, 8)
        for step in (1, 2):
            mgr.save(step, {{"model": model}}).result()
        mgr.close()
        print("saved", [c.step for c in de.find_checkpoints({str(tmp_path / "x")!r})])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("top level ran") == 1
    assert "saved [2, 1]" in proc.stdout or "saved [1, 2]" in proc.stdout


@multirank(2)
def cached_plans(rank: int, world_size: int, root: str, mode: str) -> dict:
    """DDP (replicated tensors: DCP's global plan decides which rank writes each)."""
    app = toy.make_app("ddp", seed=0)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name=f"plans_{mode}", async_mode=mode)
    planned = []
    with de.CheckpointManager(cfg) as mgr:
        for step in (1, 2, 3, 4):
            if step == 3:
                app["ema"] = torch.full((4,), float(step))  # a new key: a new structure
            toy.train(app, 1, rank)
            handle = mgr.save(step, app)
            handle.result()
            assert handle.stats is not None
            planned.append(handle.stats.planned)
        expected = toy.full_state(app)
        fresh = toy.make_app("ddp", seed=5)
        assert mgr.load(fresh).step == 4
        toy.assert_equal(expected, toy.full_state(fresh))
        path = mgr.experiment_dir / "checkpoints" / "step_00000004"
        raw = {p.name: p.stat().st_size for p in path.glob("*.raw")}
        metadata = pickle.loads((path / ".metadata").read_bytes())
    referenced = sum(s.length for s in metadata.storage_data.values())
    return {"planned": planned, "raw": raw, "referenced": referenced}


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["off", "thread", "process"])
def test_global_plan_runs_only_when_the_structure_changes(tmp_path, mode):
    """After the first save, a save with the same structure runs no planning collective
    (SaveStats.planned); a new optimizer state replans; replicated tensors are written
    once among the ranks, from cached plans too."""
    outcomes = cached_plans.run(str(tmp_path), mode)
    for out in outcomes:
        assert out["planned"] == [True, False, True, False], out
    raw = outcomes[0]["raw"]
    assert set(raw) == {"__0_0.raw", "__1_0.raw"}
    # every byte written is an item of the metadata: no rank wrote a replicated tensor
    # that another rank's item stands for
    assert sum(raw.values()) == outcomes[0]["referenced"], raw


def _digests_of(path: Path) -> dict:
    marker = Marker.from_bytes((path / layout.MARKER_FILE).read_bytes(), "test")
    return {name: (f.size, f.crc32) for name, f in marker.files.items()}


@pytest.mark.parametrize("keys", [("a", "b", "note"), ("a",)])
def test_a_file_is_checked_before_its_content_counts_as_loaded(mgr, keys):
    """The whole file read in order: checked in the same pass, and the serialised values
    are not even unpickled before it checks out; a file read in part (here: one key of
    three): checked whole first. Either way a flipped byte anywhere fails the load."""
    from dcp_engine.native_reader import DigestMismatch, NativeReader

    state = {"a": torch.arange(64.0), "b": torch.ones(1000), "note": "hello"}
    info = mgr.save(1, state).result()
    shard = info.path / "__0_0.raw"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # the last item's last byte: not "a"'s
    shard.write_bytes(bytes(raw))
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
              for k, v in state.items() if k in keys}  # fmt: skip
    reader = NativeReader(info.path, digests=_digests_of(info.path))
    bad = r"__0_0\.raw: crc32 \w{8}, the marker says"
    with pytest.raises(dcp.api.CheckpointException, match=bad) as e:
        dcp.load(target, storage_reader=reader, no_dist=True)
    failure = e.value.failures[0]
    assert isinstance(failure[0] if isinstance(failure, tuple) else failure, DigestMismatch)
    assert target.get("note") is None  # never unpickled
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    dcp.load(target, storage_reader=NativeReader(info.path, digests=_digests_of(info.path)),
             no_dist=True)  # fmt: skip
    assert torch.equal(target["a"], state["a"])


@multirank(2)
def one_rank_file_flipped(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 1, rank)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="flip", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, app).result()
        expected = toy.full_state(app)
        toy.train(app, 1, rank, start=1)
        path = mgr.save(2, app).result().path
    dist.barrier()
    if rank == 1:  # a byte of rank 1's file: only rank 1 reads it whole
        shard = path / "__1_0.raw"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    dist.barrier()
    with de.CheckpointManager(cfg) as mgr:
        fresh = toy.make_app("fsdp", seed=5)
        info = mgr.load(fresh)
        toy.assert_equal(expected, toy.full_state(fresh))
    return {"step": info.step, "quarantined": (path.parent / "step_00000002.corrupt").is_dir()}


@pytest.mark.multirank
def test_a_file_that_fails_its_digest_on_one_rank_fails_the_candidate_on_every_rank(tmp_path):
    """Rank 1's file checked in rank 1's read pass: both ranks skip step 2 (quarantined)
    and resume from step 1, bit for bit."""
    for out in one_rank_file_flipped.run(str(tmp_path)):
        assert out == {"step": 1, "quarantined": True}


def test_a_flipped_byte_in_metadata_fails_its_candidate_before_the_read(mgr):
    """.metadata says where every item is: checked against its digest before the read,
    so a flip that still unpickles never sends the read to wrong offsets."""
    mgr.save(1, {"w": torch.arange(10.0)}).result()
    info = mgr.save(2, {"w": torch.arange(10.0) + 1}).result()
    meta = info.path / ".metadata"
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0x01
    meta.write_bytes(bytes(data))
    target = {"w": torch.zeros(10)}
    with pytest.raises(de.IntegrityError, match=r"\.metadata: crc32 \w{8}, the marker says"):
        mgr.load(target, 2)
    assert mgr.load(target).step == 1 and torch.equal(target["w"], torch.arange(10.0))
    assert (info.path.parent / "step_00000002.corrupt").is_dir()


def test_export_format_dcp_carries_empty_tensors(mgr, tmp_path):
    state = {"e": torch.empty(0, 3), "w": torch.arange(6.0).reshape(2, 3)}
    info = mgr.save(1, state).result()
    out = export(info.path, tmp_path / "stock", fmt="dcp")
    target = {"e": torch.ones(0, 3), "w": torch.zeros(2, 3)}
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    assert target["e"].shape == (0, 3) and torch.equal(target["w"], state["w"])
    assert not (tmp_path / ".stock.tmp").exists()


def test_a_grown_state_is_staged_in_one_segment_the_writer_maps_alone(tmp_path, monkeypatch):
    """Process mode: when the staging pool is rebuilt (a new key), the writer unmaps the
    old segment first, so the old and the new never take shared memory together."""
    import os

    from dcp_engine import staging

    mapped_at_check: list[set[str]] = []
    check = staging.check_shared_memory

    def spy(needed: int, **kw: object) -> None:  # when the new segment is sized
        if writer_pid:
            mapped_at_check.append(segments(writer_pid[0]) | segments(os.getpid()))
        check(needed, **kw)  # type: ignore[arg-type]

    writer_pid: list[int] = []
    monkeypatch.setattr(staging, "check_shared_memory", spy)

    def segments(pid: int) -> set[str]:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split()[-1] for line in f if "/torch_" in line}

    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="grow",
                              async_mode="process")  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        app = {"w": torch.ones(1 << 16)}
        mgr.save(1, app).result()
        writer = mgr._saves._writer.pid  # type: ignore[attr-defined]
        writer_pid.append(writer)
        first = segments(writer)
        app["m"] = torch.zeros(1 << 16)  # a new key: the pool is rebuilt
        mgr.save(2, app).result()
        second = segments(writer)
        assert len(first) == 1 and len(second) == 1 and first != second
        assert segments(os.getpid()) == second  # the trainer's old one is gone too
        assert mapped_at_check == [set()]  # nobody mapped the old one any more


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_write_threads_split_a_rank_into_files_that_load_back(tmp_path, mode):
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name=f"wt_{mode}",
                              async_mode=mode, write_threads=3)  # fmt: skip
    state = {f"t{i}": torch.full((1000 * (i + 1),), float(i)) for i in range(7)}
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.save(1, {**state, "note": "x"}).result()
        assert sorted(p.name for p in info.path.glob("*.raw")) == [
            "__0_0.raw", "__0_1.raw", "__0_2.raw"
        ]
        target = {k: torch.zeros_like(v) for k, v in state.items()} | {"note": None}
        mgr.load(target)
    assert all(torch.equal(target[k], v) for k, v in state.items()) and target["note"] == "x"
