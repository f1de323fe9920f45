"""State codecs on real DCP files: one round trip per kind of value, loads that are all or
nothing (invariant 10), non-tensor leaves captured at the call (invariant 3), and the
shared-memory check of process mode."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

import dcp_engine as de
from dcp_engine import codecs, state
from dcp_engine.staging import StagingPool, check_shared_memory
from tests import toy

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Box:
    """A Stateful with tensors and plain values; ``arm()`` makes the next load fail after
    it has already written part of its state (as a validating ``load_state_dict`` would)."""

    def __init__(self, n: int = 3) -> None:
        self.n, self.w, self.tag, self.armed = n, torch.arange(3.0) + n, f"t{n}", False

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "w": self.w, "tag": self.tag, "shape": (1, 2)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]
        self.w.copy_(sd["w"])
        if self.armed:
            self.armed = False
            raise ValueError("box rejects this state")
        self.tag = sd["tag"]


class Counter:
    """A Stateful without tensors: written as one pickle."""

    def __init__(self, n: int = 0) -> None:
        self.n, self.seen = n, [n]

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seen": self.seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n, self.seen = sd["n"], sd["seen"]


class Picky(nn.Linear):
    """A module whose load fails, once armed, after copying its tensors."""

    armed = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.armed:
            self.armed = False
            raise RuntimeError("picky module refuses")


def roundtrip(saved_app: dict[str, Any], fresh: dict[str, Any], path: Path) -> dict[str, Any]:
    """Encode with ``build_save_state``, a real ``dcp.save``/``dcp.load``, then apply."""
    saved = state.build_save_state(saved_app, rank=0, world_size=1, capture_rng=True)
    dcp.save(saved.state_dict, checkpoint_id=str(path), no_dist=True)
    entries = json.loads(json.dumps(saved.entries))  # as the marker keeps them
    metadata = FileSystemReader(str(path)).read_metadata()
    plan = state.build_load_plan(
        fresh, entries, metadata, rank=0, restore_rng=True, where=str(path)
    )
    dcp.load(plan.read, checkpoint_id=str(path), no_dist=True)
    plan.apply()
    return entries


def test_each_value_has_one_codec_in_a_fixed_order():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = {
        codecs.ModuleCodec: model,
        codecs.OptimizerCodec: opt,
        codecs.StatefulCodec: torch.optim.lr_scheduler.StepLR(opt, 3),
        codecs.TensorTreeCodec: {"a": [1, torch.zeros(1)]},
        codecs.ObjectCodec: {"a": [1, 2]},
    }
    for cls, value in cases.items():
        assert type(codecs.codec_for(value)) is cls
    assert type(codecs.codec_for(torch.ones(2))) is codecs.TensorTreeCodec


def test_module_roundtrip_is_exact(tmp_path):
    src = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    src(torch.randn(5, 4))  # running stats move
    dst = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    entries = roundtrip({"m": src}, {"m": dst}, tmp_path)
    assert entries["m"] == {"kind": "module"}
    toy.assert_equal(src.state_dict(), dst.state_dict())


def test_optimizer_roundtrip_is_exact_and_names_its_module(tmp_path):
    src, dst = toy.make_app("plain", seed=0), toy.make_app("plain", seed=1)
    toy.train(src, 2, rank=0)
    entries = roundtrip(src, dst, tmp_path)
    names = [f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert entries["optim"] == {"kind": "optimizer", "module": "model", "params": [names]}
    toy.assert_equal(toy.full_state(src), toy.full_state(dst))


def test_stateful_tree_and_pickle_roundtrip(tmp_path):
    src = {"box": Box(7), "count": Counter(4)}
    src["count"].seen.append(9)
    dst = {"box": Box(1), "count": Counter(0)}
    entries = roundtrip(src, dst, tmp_path)
    assert entries["box"] == {"kind": "stateful", "encoding": "tree"}
    assert entries["count"] == {"kind": "stateful", "encoding": "pickle"}
    assert (dst["box"].n, dst["box"].tag) == (7, "t7")
    assert torch.equal(dst["box"].w, torch.arange(3.0) + 7)
    assert (dst["count"].n, dst["count"].seen) == (4, [4, 9])


def test_tensor_tree_roundtrip_copies_into_the_callers_tensors(tmp_path):
    src = {"t": {"a": torch.arange(4.0), "b": [torch.ones(2, dtype=torch.int64), 3], "c": ()}}
    src["x"] = torch.tensor([1.5, -2.0])
    dst = {"t": {"a": torch.zeros(4), "b": [torch.zeros(2, dtype=torch.int64), 0], "c": ()}}
    dst["x"] = torch.zeros(2)
    a, x = dst["t"]["a"], dst["x"]
    entries = roundtrip(src, dst, tmp_path)
    assert entries["t"] == entries["x"] == {"kind": "tensors", "encoding": "tree"}
    assert dst["t"]["a"] is a and dst["x"] is x  # copied into, not replaced
    toy.assert_equal(src, dst)


def test_object_and_rng_roundtrip(tmp_path):
    src = {"obj": {"set": {1, 2}, "arr": np.arange(3), "s": "x"}}
    dst: dict[str, Any] = {"obj": None}
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    saved = state.build_save_state(src, rank=0, world_size=1, capture_rng=True)
    dcp.save(saved.state_dict, checkpoint_id=str(tmp_path), no_dist=True)
    torch.rand(3), np.random.rand(), random.random()  # move every generator
    metadata = FileSystemReader(str(tmp_path)).read_metadata()
    plan = state.build_load_plan(
        dst, saved.entries, metadata, rank=0, restore_rng=True, where=str(tmp_path)
    )
    dcp.load(plan.read, checkpoint_id=str(tmp_path), no_dist=True)
    plan.apply()
    assert saved.entries["obj"] == {"kind": "object", "encoding": "pickle"}
    assert saved.entries[state.RNG_KEY] == {"kind": "rng", "world_size": 1}
    assert dst["obj"]["set"] == {1, 2} and dst["obj"]["arr"].tolist() == [0, 1, 2]
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert (np.random.get_state()[1] == rng[1]).all() and random.getstate() == rng[2]


# ---------------------------------------------------------------- all or nothing


def full_app(seed: int) -> dict[str, Any]:
    """Every kind of value; the plain object is applied before the Stateful, the Picky
    module after every other value (modules go last)."""
    app = toy.make_app("plain", seed=seed)
    app["tree"] = {"w": torch.full((3,), float(seed)), "n": seed, "l": [torch.ones(2) * seed]}
    app["obj"] = {"seed": seed}
    app["box"] = Box(seed)
    app["count"] = Counter(seed)
    app["picky"] = Picky(2, 2)
    return app


def observe(app: dict[str, Any]) -> dict[str, Any]:
    """Everything a load could touch, copied (and the identities of the caller's objects);
    reads the optimizer directly (``get_state_dict`` would initialise an empty one)."""
    return copy.deepcopy(
        {
            "model": app["model"].state_dict(),
            "optim": app["optim"].state_dict(),
            "sched": app["sched"].state_dict(),
            "center": app["center"],
            "picky": app["picky"].state_dict(),
            "tree": app["tree"],
            "ids": (id(app["tree"]), id(app["tree"]["w"]), id(app["tree"]["l"][0])),
            "obj": (app["obj"], id(app["obj"])),
            "box": (app["box"].state_dict(), app["box"].tag),
            "count": app["count"].state_dict(),
            "rng": (torch.get_rng_state(), np.random.get_state()[1], random.getstate()),
        }
    )


def assert_as_before(before: dict[str, Any], app: dict[str, Any]) -> None:
    after = observe(app)
    for name in ("model", "optim", "sched", "center"):
        toy.assert_equal(before[name], after[name], name)
    toy.assert_equal(before["picky"], after["picky"], "picky")
    toy.assert_equal(before["tree"], after["tree"], "tree")
    assert before["ids"] == after["ids"] and before["obj"] == after["obj"]
    toy.assert_equal(before["box"], after["box"], "box")
    assert before["count"] == after["count"]
    assert torch.equal(before["rng"][0], after["rng"][0])
    assert (before["rng"][1] == after["rng"][1]).all() and before["rng"][2] == after["rng"][2]


@pytest.mark.parametrize("failing", ["box", "picky"])
def test_failed_load_leaves_every_value_as_before(cfg, failing):
    with de.CheckpointManager(cfg) as mgr:
        app = full_app(0)
        toy.train(app, 2, rank=0)
        mgr.save(1, app)
        app = full_app(5)
        toy.train(app, 1, rank=0)
        torch.manual_seed(11)
        before = observe(app)
        app[failing].armed = True
        with pytest.raises(de.CheckpointError) as raised:
            mgr.load(app)
        assert repr(failing) in str(raised.value) and "step_00000001" in str(raised.value)
        assert isinstance(raised.value.__cause__, (ValueError, RuntimeError))
        assert_as_before(before, app)
        info = mgr.load(app)  # the failure was transient: the same checkpoint loads now
        assert info is not None and info.step == 1 and app["obj"] == {"seed": 0}


def test_rollback_after_a_successful_apply_restores_everything(tmp_path):
    """What the manager does when another rank's apply failed; an optimizer that had no
    state before the load has none again."""
    src = full_app(0)
    toy.train(src, 2, rank=0)
    saved = state.build_save_state(src, rank=0, world_size=1, capture_rng=True)
    dcp.save(saved.state_dict, checkpoint_id=str(tmp_path), no_dist=True)
    for trained in (True, False):
        app = full_app(5)
        if trained:
            toy.train(app, 1, rank=0)
        torch.manual_seed(11)
        before = observe(app)
        metadata = FileSystemReader(str(tmp_path)).read_metadata()
        plan = state.build_load_plan(
            app, saved.entries, metadata, rank=0, restore_rng=True, where=str(tmp_path)
        )
        dcp.load(plan.read, checkpoint_id=str(tmp_path), no_dist=True)
        plan.apply()
        toy.assert_equal(src["model"].state_dict(), app["model"].state_dict())
        assert (
            app["optim"].state_dict()["state"].keys() == src["optim"].state_dict()["state"].keys()
        )
        plan.rollback()
        assert bool(app["optim"].state) is trained
        assert_as_before(before, app)


def rollback_on_other_rank_failure(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """FSDP2 on 2 ranks: rank 1's Stateful refuses the state after rank 0 applied all of
    its values; rank 0 puts its DTensor shards and optimizer state back."""
    app = toy.make_app("fsdp", seed=0)
    app["box"] = Box(0)
    toy.train(app, 2, rank)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="rb", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(2, app)
        toy.train(app, 1, rank, start=2)
        app["box"].n = 42
        before = toy.full_state(app)  # collective
        shards = {n: p.to_local().clone() for n, p in app["model"].named_parameters()}
        app["box"].armed = rank == 1
        try:
            mgr.load(app)
            error = None
        except Exception as e:
            error = (type(e).__name__, isinstance(e, de.CheckpointError), str(e))
        after = toy.full_state(app)
        if rank == 0:
            toy.assert_equal(before, after, f"rank {rank}")
        for n, p in app["model"].named_parameters():
            assert torch.equal(p.to_local(), shards[n]), n
        assert app["box"].n == 42
    return {"error": error}


@pytest.mark.multirank
def test_a_failure_on_one_rank_puts_back_the_values_applied_on_the_others(tmp_path):
    from tests.distributed import run_ranks

    out = run_ranks(rollback_on_other_rank_failure, 2, str(tmp_path))
    assert all(r["error"] is not None and r["error"][1] for r in out), out
    assert "'box'" in out[1]["error"][2] and "rank 1" in out[0]["error"][2]


# ---------------------------------------------------------------- captured at the call


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_non_tensor_leaves_are_captured_when_save_returns(tmp_path, mode):
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="x", async_mode=mode)
    tree = {
        "w": torch.arange(4.0),
        "arr": np.arange(5),
        "s": {1, 2, 3},
        "b": bytearray(b"abc"),
        "l": [1, 2],
        "d": {"ints": 1},
    }
    at_call = copy.deepcopy(tree)
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, {"t": tree})
        # Right after save() returns, racing the writer.
        tree["w"].add_(1)
        tree["arr"][:] = -1
        tree["s"].add(99)
        tree["b"][:] = b"xyz"
        tree["l"].append(3)
        tree["d"]["ints"] = 7
        mgr.wait()
        fresh = {"t": copy.deepcopy(at_call)}
        fresh["t"]["arr"], fresh["t"]["s"] = None, None
        assert mgr.load(fresh) is not None
    got = fresh["t"]
    assert torch.equal(got["w"], at_call["w"])
    assert got["arr"].tolist() == [0, 1, 2, 3, 4] and got["s"] == {1, 2, 3}
    assert got["b"] == bytearray(b"abc") and got["l"] == [1, 2] and got["d"] == {"ints": 1}


# ---------------------------------------------------------------- shared memory


def test_shared_memory_check_names_the_sizes_and_the_ways_out():
    check_shared_memory(1000, free_bytes=1000)
    with pytest.raises(de.CheckpointError) as raised:
        check_shared_memory(3 * 2**30, free_bytes=64 * 2**20)
    msg = str(raised.value)
    assert "async_mode='process'" in msg and "/dev/shm" in msg
    assert "3,221,225,472" in msg and "67,108,864" in msg
    assert "--shm-size" in msg and "async_mode='thread'" in msg


def test_shared_pool_refuses_more_than_dev_shm_holds():
    """A tensor never materialised (meta) asks the real /dev/shm for a petabyte."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    pool = StagingPool(shared=True)
    with pytest.raises(de.CheckpointError, match="shared memory"):
        pool.prepare({"w": torch.empty(2**50, dtype=torch.uint8, device="meta")})
    assert pool.buffers == {}
