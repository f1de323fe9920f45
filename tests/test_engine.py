"""One process, no process group: the engine's promises on real files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import dcp_engine as de
from dcp_engine import layout
from tests import toy


def trained_app(seed: int = 0, steps: int = 2) -> dict:
    app = toy.make_app("plain", seed=seed)
    toy.train(app, steps, rank=0)
    return app


def test_fresh_experiment_load_returns_none(mgr):
    assert mgr.load(trained_app()) is None
    assert mgr.checkpoints() == []


def test_save_commits_marker_shards_index_and_latest(mgr):
    info = mgr.save(7, trained_app(), epoch=1, metrics={"loss": torch.tensor(0.25)}).result()
    assert info.step == 7 and info.epoch == 1 and info.metrics == {"loss": 0.25}
    assert info.path == mgr.experiment_dir / "checkpoints" / "step_00000007"
    names = {p.name for p in info.path.iterdir()}
    assert {"COMMITTED", ".metadata", "__0_0.raw"} <= names
    marker = json.loads((info.path / "COMMITTED").read_text())
    assert marker["files"][".metadata"]["size"] == (info.path / ".metadata").stat().st_size
    assert info.bytes == sum(f["size"] for f in marker["files"].values()) > 0
    assert os.readlink(mgr.experiment_dir / "checkpoints" / "latest") == "step_00000007"
    index = json.loads((mgr.experiment_dir / "index.json").read_text())
    assert [c["step"] for c in index["checkpoints"]] == [7] and index["latest"] == 7
    # Every file's CRC-32, computed while writing, in the marker and the index.
    from dcp_engine.storage import LocalStorage

    for name, meta in marker["files"].items():
        assert meta["crc32"] == LocalStorage().digest(info.path / name), name
    assert index["checkpoints"][0]["files"] == marker["files"]
    assert not list(info.path.parent.glob("*.tmp"))
    assert mgr.stats()[-1].step == 7 and mgr.stats()[-1].bytes == info.bytes


def test_every_kind_of_value_round_trips(mgr):
    app = trained_app()
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    app.update(
        scaler=scaler,
        config={"lr": 0.1, "layers": [1, 2], "name": "dino"},
        epoch=3,
        buffers={"center": torch.randn(3), "count": 4, 7: (torch.ones(2), "x")},
    )
    saved = toy.full_state(app)
    mgr.save(1, app)
    fresh = toy.make_app("plain", seed=5)
    fresh.update(
        scaler=torch.amp.GradScaler("cpu", init_scale=1.0),
        config=None,
        epoch=0,
        buffers={"center": torch.zeros(3), "count": 0, 7: (torch.zeros(2), "y")},
    )
    center_obj = fresh["buffers"]["center"]
    mgr.load(fresh)
    toy.assert_equal(saved, toy.full_state(fresh))
    assert fresh["scaler"].get_scale() == 128.0
    assert fresh["config"] == {"lr": 0.1, "layers": [1, 2], "name": "dino"}
    assert fresh["epoch"] == 3
    assert fresh["buffers"]["center"] is center_obj  # tensors restored by copy, in place
    toy.assert_equal(app["buffers"], fresh["buffers"])


def test_load_by_step_path_and_best(mgr):
    app = trained_app()
    for step, loss in [(1, 3.0), (2, 1.0), (3, math.nan), (4, 2.0)]:
        mgr.save(step, app, metrics={"loss": loss})
    assert mgr.load(app, "latest").step == 4
    assert mgr.load(app, 2).step == 2
    assert mgr.load(app, "best").step == 2  # NaN never ranks best
    assert mgr.load(app, str(mgr.checkpoints()[0].path)).step == 1
    assert mgr.load(app, mgr.experiment_dir / "checkpoints" / "latest").step == 4


def test_best_needs_a_monitor(tmp_path):
    with de.CheckpointManager(
        de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="x", async_mode="off")
    ) as m:
        m.save(1, {"t": torch.ones(1)})
        with pytest.raises(de.CheckpointError, match="monitor"):
            m.load({"t": torch.ones(1)}, "best")


def test_tmp_and_markerless_directories_are_never_listed_loaded_or_latest(cfg, mgr):
    app = trained_app()
    mgr.save(1, app)
    ckpts = mgr.experiment_dir / "checkpoints"
    # A torn in-flight save, a committed-looking directory without its marker, foreign names.
    shutil.copytree(ckpts / "step_00000001", ckpts / "step_00000009.tmp")
    shutil.copytree(ckpts / "step_00000001", ckpts / "step_00000008")
    (ckpts / "step_00000008" / "COMMITTED").unlink()
    shutil.copytree(ckpts / "step_00000001", ckpts / "step_00000999.backup")
    (ckpts / "notes").mkdir()
    with pytest.raises(de.CheckpointError, match=r"step_00000009\.tmp is incomplete"):
        mgr.load(app, 9)
    # One writer per experiment: a second manager is refused while the first is open ...
    with pytest.raises(de.ExperimentLockedError, match=r"held by .*close that one first"):
        de.CheckpointManager(cfg)
    assert (ckpts / "step_00000009.tmp").is_dir()  # ... and swept nothing
    mgr.close()
    with de.CheckpointManager(cfg) as again:
        assert not (ckpts / "step_00000009.tmp").exists()  # swept at start-up
        assert [c.step for c in again.checkpoints()] == [1]
        assert again.load(app).step == 1
        with pytest.raises(de.NotACheckpointError, match="no COMMITTED marker"):
            again.load(app, 8)
        with pytest.raises(de.NotACheckpointError, match="step_00000008"):
            again.load(app, str(ckpts / "step_00000008"))
    # Unknown names are never touched.
    assert (ckpts / "step_00000999.backup").is_dir() and (ckpts / "notes").is_dir()


def test_deleting_or_corrupting_the_index_gives_the_same_checkpoints(cfg, mgr):
    app = trained_app()
    for step in (10, 20, 30):
        mgr.save(step, app, epoch=step // 10, metrics={"loss": 1.0 / step})
    expected = mgr.checkpoints()
    mgr.close()
    index_path = mgr.experiment_dir / "index.json"
    index_path.unlink()
    with de.CheckpointManager(cfg) as again:
        assert again.checkpoints() == expected
    assert index_path.is_file()
    raw = index_path.read_bytes()
    index_path.write_bytes(raw[: len(raw) // 2])  # cut in half
    with de.CheckpointManager(cfg) as again:
        assert again.checkpoints() == expected
    data = json.loads(index_path.read_text())  # rewritten whole
    data["checkpoints"] = data["checkpoints"][:1]  # stale
    index_path.write_text(json.dumps(data))
    with de.CheckpointManager(cfg) as again:
        assert again.checkpoints() == expected
    assert len(json.loads(index_path.read_text())["checkpoints"]) == 3


def test_saving_a_committed_step_again_is_refused_and_changes_nothing(mgr):
    app = trained_app()
    first = mgr.save(5, app).result()
    marker = (first.path / "COMMITTED").read_bytes()
    with pytest.raises(de.CheckpointError, match=r"step 5 is already committed at .*step_00000005"):
        mgr.save(5, app)
    assert (first.path / "COMMITTED").read_bytes() == marker
    assert mgr.checkpoints() == [first]


def test_a_torn_tmp_of_the_same_step_is_replaced(mgr):
    tmp = mgr.experiment_dir / "checkpoints" / "step_00000003.tmp"
    tmp.mkdir()
    (tmp / "__0_0.raw").write_bytes(b"garbage from a crash")
    info = mgr.save(3, trained_app()).result()
    assert not tmp.exists() and info.path.is_dir()


def test_load_of_a_missing_path_or_a_non_checkpoint_names_it(mgr, tmp_path):
    app = trained_app()
    with pytest.raises(de.CheckpointNotFoundError, match="nowhere"):
        mgr.load(app, str(tmp_path / "nowhere"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(de.NotACheckpointError, match="plain_dir"):
        mgr.load(app, str(tmp_path / "plain_dir"))
    with pytest.raises(de.CheckpointNotFoundError, match="no checkpoint for step 42"):
        mgr.load(app, 42)


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda app: app.update(toy.make_app("plain", 3, hidden=32)),
            "model.0.weight shape checkpoint (16, 8) vs (32, 8)",
        ),
        (
            lambda app: app["model"].add_module("extra", torch.nn.Linear(2, 2)),
            "missing in checkpoint: model.extra.bias",
        ),
        (lambda app: app.update(center=torch.zeros(5)), "center"),
        (lambda app: app.update(unknown=torch.zeros(1)), "no entry 'unknown'"),
        (lambda app: app.update(sched={"not": "a scheduler"}), "'sched' was saved as a stateful"),
    ],
)
def test_mismatched_state_raises_naming_path_and_keys_and_changes_nothing(mgr, change, needle):
    info = mgr.save(1, trained_app()).result()
    app = trained_app(seed=9, steps=1)
    change(app)
    model_before = {k: v.clone() for k, v in app["model"].state_dict().items()}
    optim_before = app["optim"].state_dict()
    center_before = app["center"].clone()
    with pytest.raises(de.StateMismatchError) as exc:
        mgr.load(app)
    assert needle in str(exc.value) and str(info.path) in str(exc.value)
    toy.assert_equal(model_before, app["model"].state_dict())
    toy.assert_equal(optim_before, app["optim"].state_dict())
    toy.assert_equal(center_before, app["center"])


def test_failed_read_leaves_fresh_optimizer_empty_and_model_unchanged(mgr):
    info = mgr.save(1, trained_app()).result()
    shard = info.path / "__0_0.raw"
    raw = shard.read_bytes()
    shard.write_bytes(b"\0" * 64 + raw[64:])  # same size, other bytes
    app = toy.make_app("plain", seed=4)
    before = {k: v.clone() for k, v in app["model"].state_dict().items()}
    with pytest.raises(de.IntegrityError, match=r"__0_0\.raw: crc32 \w{8}, the marker says"):
        mgr.load(app, 1)  # verified first (the default): nothing is read into the state
    shard.write_bytes(raw)
    # The last tensor's dtype unknown (the metadata keeps its size): its read fails.
    meta_path = info.path / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    tensors = [(i, s) for i, s in metadata.storage_data.items() if s.dtype == "float32"]
    index, last = max(tensors, key=lambda kv: kv[1].offset)
    metadata.storage_data[index] = dataclasses.replace(last, dtype="float99")
    changed = pickle.dumps(metadata)
    assert len(changed) == meta_path.stat().st_size
    meta_path.write_bytes(changed)
    with pytest.raises(de.CheckpointError, match=r"reading checkpoint .*step_00000001 failed.*"
                       r"__0_0\.raw: .* unknown dtype 'float99'"):  # fmt: skip
        mgr.load(app, 1, verify=False)
    assert not app["optim"].state
    toy.assert_equal(before, app["model"].state_dict())


def test_bad_app_state_and_arguments(mgr):
    with pytest.raises(ValueError, match=r"'a\.b'"):
        mgr.save(1, {"a.b": torch.ones(1)})
    with pytest.raises(ValueError, match="'_x'"):
        mgr.save(1, {"_x": torch.ones(1)})
    with pytest.raises(TypeError, match="cannot be pickled"):
        mgr.save(1, {"f": lambda: 0})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        mgr.save(-1, {"t": torch.ones(1)})
    with pytest.raises(TypeError, match="metric 'loss'"):
        mgr.save(1, {"t": torch.ones(1)}, metrics={"loss": "low"})
    orphan = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(de.CheckpointError, match="add the model to app_state"):
        mgr.save(1, {"optim": orphan})
    assert mgr.checkpoints() == []
    assert not list((mgr.experiment_dir / "checkpoints").glob("step_*"))


def test_closed_manager_refuses_work(cfg):
    m = de.CheckpointManager(cfg)
    m.close()
    m.close()
    with pytest.raises(de.CheckpointError, match="closed"):
        m.save(1, {"t": torch.ones(1)})


def test_default_experiment_name_is_model_dataset_timestamp(tmp_path):
    cfg = de.CheckpointConfig(
        root_dir=str(tmp_path), model_name="vit", dataset_name="cifar", async_mode="off"
    )
    with de.CheckpointManager(cfg) as m:
        name = m.experiment_dir.name
    assert name.startswith("vit_cifar_") and len(name) == len("vit_cifar_20240115_143022")


def test_rng_is_captured_and_restored_unless_opted_out(tmp_path):
    app = {"t": torch.ones(1)}
    for capture in (True, False):
        cfg = de.CheckpointConfig(
            root_dir=str(tmp_path),
            experiment_name=f"rng{capture}",
            capture_rng=capture,
            async_mode="off",
        )
        with de.CheckpointManager(cfg) as m:
            torch.manual_seed(1)
            m.save(1, app)
            expected = torch.rand(3)
            torch.manual_seed(2)
            m.load(app)
            assert torch.equal(torch.rand(3), expected) is capture


def test_plain_file_named_like_latest_is_not_replaced(mgr):
    latest = mgr.experiment_dir / "checkpoints" / "latest"
    latest.write_text("a user's file")
    mgr.save(1, {"t": torch.ones(1)})
    assert latest.read_text() == "a user's file"
    assert mgr.load({"t": torch.zeros(1)}).step == 1  # the index and markers are the truth


def test_layout_parses_only_canonical_names():
    assert layout.parse_step_dirname("step_00000012") == 12
    assert layout.parse_step_dirname("step_123456789") == 123456789
    for name in ("step_12", "step_000000012", "step_00000012.backup", "xstep_00000012", "latest"):
        assert layout.parse_step_dirname(name) is None, name
    assert layout.parse_tmp_dirname("step_00000012.tmp") == 12
    assert layout.parse_tmp_dirname("step_00000012.tmp.old") is None
    assert layout.step_dirname(5) == "step_00000005"
    assert Path(layout.tmp_dirname(5)).suffix == ".tmp"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"root_dir": ""}, "root_dir"),
        ({"experiment_name": "a/b"}, "experiment_name"),
        ({"experiment_name": ".."}, "experiment_name"),
        ({"mode": "lowest"}, "mode"),
        ({"monitor": ""}, "monitor"),
        ({"async_mode": "threads"}, "async_mode"),
        ({"staging": "later"}, "staging"),
        ({"async_mode": "off", "staging": "overlap"}, "staging"),
        ({"when_busy": "queue"}, "when_busy"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"capture_rng": "yes"}, "capture_rng"),
        ({"write_threads": 0}, "write_threads"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(de.ConfigError, match=f"CheckpointConfig.{field}=") as exc:
        de.CheckpointConfig(**kwargs)
    assert exc.value.field == field


def test_config_is_frozen_and_accepts_paths(tmp_path):
    cfg = de.CheckpointConfig(root_dir=tmp_path)
    assert cfg.root_dir == str(tmp_path)
    with pytest.raises(AttributeError):
        cfg.root_dir = "elsewhere"  # type: ignore[misc]


def test_truncated_latest_is_skipped_on_resume_and_refused_by_name(mgr, caplog):
    app = trained_app()
    mgr.save(1, app)
    second = mgr.save(2, app).result()
    shard = second.path / "__0_0.raw"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(de.IntegrityError, match=r"step_00000002/__0_0\.raw is 100 bytes"):
        mgr.load(app, 2)
    with caplog.at_level("WARNING"):
        assert mgr.load(app).step == 1  # the newest that checks out
    assert "skipping step_00000002" in caplog.text and "__0_0.raw is 100 bytes" in caplog.text
    assert "quarantined" in caplog.text and not second.path.exists()


def test_a_tmp_directory_is_refused_even_by_path(mgr):
    info = mgr.save(1, {"t": torch.ones(1)}).result()
    tmp = info.path.with_name("step_00000002.tmp")
    shutil.copytree(info.path, tmp)  # complete, marker and all, but never renamed
    with pytest.raises(de.NotACheckpointError, match=r"step_00000002\.tmp is in flight or torn"):
        mgr.load({"t": torch.ones(1)}, str(tmp))


def test_dtype_mismatch_is_refused(mgr):
    info = mgr.save(1, {"t": torch.ones(3)}).result()
    target = {"t": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(
        de.StateMismatchError, match=r"t dtype checkpoint torch\.float32 vs torch\.float64"
    ):
        mgr.load(target)
    assert str(info.path) in str(mgr.checkpoints()[0].path)
    assert target["t"].sum() == 0


class TreeState:
    """A Stateful whose state dict has int keys, a tuple and an empty dict."""

    def __init__(self, fill: float) -> None:
        self.sd = {0: torch.full((2,), fill), "pair": (torch.ones(1) * fill, 3), "empty": {}}

    def state_dict(self) -> dict:
        return self.sd

    def load_state_dict(self, sd: dict) -> None:
        assert set(sd) == {0, "pair", "empty"} and isinstance(sd["pair"], tuple), sd
        self.sd = sd


def test_trees_come_back_with_their_keys_types_and_empty_containers(mgr):
    Point = __import__("collections").namedtuple("Point", "x y")
    app = {
        "tree": TreeState(2.0),
        "bufs": {1: torch.ones(2), "p": Point(torch.ones(1), 5), "e": {}},
    }
    mgr.save(1, app)
    target = {
        "tree": TreeState(0.0),
        "bufs": {1: torch.zeros(2), "p": Point(torch.zeros(1), 0), "e": {}},
    }
    mgr.load(target)
    assert torch.equal(target["tree"].sd[0], torch.full((2,), 2.0))
    assert target["tree"].sd["pair"][1] == 3
    assert isinstance(target["bufs"]["p"], Point) and target["bufs"]["p"].y == 5
    assert torch.equal(target["bufs"][1], torch.ones(2)) and target["bufs"]["e"] == {}


class Exploding:
    def state_dict(self) -> dict:
        return {"v": 1}

    def load_state_dict(self, sd: dict) -> None:
        raise RuntimeError("user code failed")


def test_a_failing_stateful_runs_before_modules_are_touched(mgr):
    mgr.save(1, {**trained_app(), "x": Exploding()})
    app = {**toy.make_app("plain", seed=8), "x": Exploding()}
    before = {k: v.clone() for k, v in app["model"].state_dict().items()}
    with pytest.raises(RuntimeError, match="user code failed"):
        mgr.load(app)
    toy.assert_equal(before, app["model"].state_dict())
    assert not app["optim"].state


def test_parameters_not_stepped_yet_resume_bit_exact(mgr):
    """DINO drops the last layer's gradients in epoch 1, so AdamW has no state for it when
    a checkpoint is saved. A fresh optimizer must come back without state for it (not the
    zero state DCP initialises to learn shapes), or its first real step is another one."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    def step(net: torch.nn.Module, optim: torch.optim.Optimizer, frozen: bool) -> None:
        net(torch.arange(12.0).view(3, 4)).square().sum().backward()
        if frozen:
            for p in net[1].parameters():
                p.grad = None
        optim.step()
        optim.zero_grad()

    straight, resumed = build(), build()
    for frozen in (True, True, False, False):
        step(*straight, frozen)
    step(*resumed, True)
    mgr.save(1, {"model": resumed[0], "optim": resumed[1]})
    resumed = build()
    mgr.load({"model": resumed[0], "optim": resumed[1]}, 1)
    assert set(resumed[1].state) == set(resumed[0][0].parameters())  # none for layer 1
    for frozen in (True, False, False):
        step(*resumed, frozen)
    toy.assert_equal(straight[0].state_dict(), resumed[0].state_dict())
    toy.assert_equal(straight[1].state_dict(), resumed[1].state_dict())

    class NestedMomentum(torch.optim.Optimizer):  # its state nests: state.<fqn>.mom.buf
        def __init__(self, params) -> None:
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        st = self.state[p].setdefault("mom", {"buf": torch.zeros_like(p)})
                        st["buf"].mul_(0.9).add_(p.grad)
                        p.data.add_(st["buf"], alpha=-group["lr"])

    def build_nested() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        net = build()[0]
        return net, NestedMomentum(net.parameters())

    nested = build_nested()
    step(*nested, False)
    mgr.save(3, {"model": nested[0], "optim": nested[1]})
    loaded = build_nested()
    mgr.load({"model": loaded[0], "optim": loaded[1]}, 3)
    assert len(loaded[1].state) == 4
    toy.assert_equal(nested[1].state_dict()["state"], loaded[1].state_dict()["state"])

    broken = build()  # part of a parameter's state missing is still refused
    step(*broken, False)
    del broken[1].state[broken[0][1].bias]["exp_avg"]
    mgr.save(4, {"model": broken[0], "optim": broken[1]})
    with pytest.raises(
        de.StateMismatchError, match=r"missing in checkpoint: optim\.state\.1\.bias\.exp_avg"
    ):
        mgr.load(dict(zip(("model", "optim"), build(), strict=True)), 4)
