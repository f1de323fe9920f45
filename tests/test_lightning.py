"""The Lightning integration, with the real Lightning (issue 16).

Each case the issue found with a hand-written ``CheckpointIO`` is a test here:
(a) one step saved as a top-k file and as ``last.ckpt`` is one checkpoint with two names;
(b) ModelCheckpoint's removals reach retention, only after the save in flight committed,
and a checkpoint keeps while another name points at it; (c) under DDP every rank takes
part in the save; (d) FSDP2 (``ModelParallelStrategy``) saves and loads its shards through
the engine. Resumes are compared value for value with what Lightning saved, and with a
run that was never interrupted.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import dcp_engine as de
from dcp_engine.integrations.lightning import (
    DcpEngineCheckpointIO,
    DcpEngineDDPStrategy,
    DcpEngineModelParallelStrategy,
    load_checkpoint,
)
from dcp_engine.integrations.lightning_engine import LightningEngine
from dcp_engine.integrations.lightning_names import NAMES_KEY
from tests.distributed import multirank
from tests.seams import Gate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "launch" / "examples" / "lightning_example.py"
SAMPLES, BATCH = 20, 4  # 5 steps per epoch on one device


class Tiny(L.LightningModule):
    """Adam and a StepLR; ``losses``: the val_loss of each epoch, scripted (a known top-k)."""

    def __init__(self, losses: list[float] | None = None, shard: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def configure_model(self) -> None:
        if self.hparams.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, i: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y).detach()
        if self.hparams.losses:
            loss = torch.tensor(self.hparams.losses[self.current_epoch])
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def trainer(epochs: int, callbacks: list[Callback], **kw: Any) -> L.Trainer:
    kw.setdefault("devices", 1)
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def config(root: Path, name: str = "run") -> de.CheckpointConfig:
    return de.CheckpointConfig(root_dir=str(root / "exp"), experiment_name=name,
                               async_mode="thread")  # fmt: skip


class RecordingIO(DcpEngineCheckpointIO):
    """Keeps a copy of every dict Lightning saves, by path (what a load must give back)."""

    def __init__(self, cfg: de.CheckpointConfig) -> None:
        super().__init__(cfg)
        self.saved: dict[str, dict[str, Any]] = {}

    def save_on_every_rank(self, checkpoint: dict[str, Any], path: Any) -> None:
        self.saved[os.path.abspath(path)] = _copy(checkpoint)
        super().save_on_every_rank(checkpoint, path)


class Restored(Callback):
    """What the Trainer holds once Lightning restored a checkpoint (at ``on_train_start``)."""

    state: dict[str, Any]

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.state = live_state(trainer, module)


def live_state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    mc = trainer.checkpoint_callback
    assert isinstance(mc, ModelCheckpoint)
    return _copy({
        "params": {k: _local(v) for k, v in module.state_dict().items()},
        "optimizer": _local_tree(trainer.optimizers[0].state_dict()),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "model_checkpoint": mc.state_dict(),
    })  # fmt: skip


def saved_state(saved: dict[str, Any]) -> dict[str, Any]:
    """What Lightning restores of a saved dict, as ``live_state`` reads it: a checkpoint
    saved at the end of epoch e resumes at epoch e + 1, and ModelCheckpoint does not
    restore its ``current_score``."""
    (mc_state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return {
        "params": dict(saved["state_dict"]),
        "optimizer": saved["optimizer_states"][0],
        "scheduler": saved["lr_schedulers"][0],
        "global_step": saved["global_step"],
        "epoch": saved["epoch"] + 1,
        "model_checkpoint": {**mc_state, "current_score": None},
    }


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _local_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _local_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_local_tree(v) for v in tree]
    return _local(tree)


def _copy(tree: Any) -> Any:
    return copy.deepcopy(_local_tree(tree))


def same(a: Any, b: Any, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (exactly: tensors by value, dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {a!r} != {b!r}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in same(x, y, f"{path}[{i}]")]
    return [] if (type(a) is type(b) and a == b) else [f"{path}: {a!r} != {b!r}"]


def steps_of(root: Path, name: str = "run") -> dict[int, list[str]]:
    """The committed steps of an experiment and the Lightning names each marker lists."""
    found = de.find_checkpoints(root / "exp" / name)
    return {c.step: [Path(n).name for n in c.extra.get(NAMES_KEY, [])] for c in found}


def names_in(dirpath: Path) -> dict[str, int]:
    """Each name file in ``dirpath`` and the step it points at."""
    out = {}
    for p in sorted(dirpath.glob("*.ckpt")):
        out[p.name] = json.loads(p.read_text())["step"]
    return out


# ---------------------------------------------------------------- (a) one step, two names


def test_top_k_and_last_of_one_step_are_one_checkpoint_each_name_reading_back_its_dict(
    tmp_path: Path,
) -> None:
    io = RecordingIO(config(tmp_path))
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=2, monitor="val_loss",
                         save_last=True)  # fmt: skip
    trainer(1, [mc], plugins=[io]).fit(Tiny(), loader(), loader())

    # One engine checkpoint (no "already committed"), named twice in its marker.
    assert steps_of(tmp_path) == {5: ["epoch=0-step=5.ckpt", "last.ckpt"]}
    assert names_in(tmp_path / "ckpt") == {"epoch=0-step=5.ckpt": 5, "last.ckpt": 5}
    # Each name reads back exactly the dict Lightning saved under it, and the two differ:
    # ModelCheckpoint sets last_model_path between the top-k save and the last save.
    for path, saved in io.saved.items():
        assert same(io.load_checkpoint(path), saved) == [], path
    top, last = (io.saved[str(tmp_path / "ckpt" / n)] for n in ("epoch=0-step=5.ckpt", "last.ckpt"))
    assert saved_state(top)["model_checkpoint"]["last_model_path"] == ""
    assert saved_state(last)["model_checkpoint"]["last_model_path"] == str(mc.last_model_path)


def test_a_save_of_the_step_a_new_process_resumed_from_is_a_name_not_a_second_save(
    tmp_path: Path,
) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)
    trainer(1, [mc], plugins=[DcpEngineCheckpointIO(config(tmp_path))]).fit(Tiny(), loader())
    # A new run resumes from last.ckpt (nothing left to train) and saves a final copy:
    # the same step, so the same checkpoint under one more name.
    io = RecordingIO(config(tmp_path))
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)
    t = trainer(1, [mc], plugins=[io])
    t.fit(Tiny(), loader(), ckpt_path="last")
    final = tmp_path / "ckpt" / "final.ckpt"
    t.save_checkpoint(final)
    io.teardown()  # what the end of fit does: wait for the save and its names
    assert steps_of(tmp_path) == {5: ["last.ckpt", "final.ckpt"]}
    assert same(io.load_checkpoint(final), io.saved[str(final)]) == []


def test_save_last_link_points_at_a_name_and_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"

    def mc() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt, save_top_k=1, monitor="val_loss", save_last="link")

    trainer(2, [mc()], plugins=[DcpEngineCheckpointIO(config(tmp_path))]).fit(
        Tiny([2.0, 1.0, 0.5]), loader(), loader()
    )
    # last.ckpt is Lightning's symlink to the top-k name; step 5 left the top 1 and went.
    assert os.readlink(ckpt / "last.ckpt") == "epoch=1-step=10.ckpt"
    assert steps_of(tmp_path) == {10: ["epoch=1-step=10.ckpt"]}
    restored = Restored()
    trainer(3, [mc(), restored], plugins=[DcpEngineCheckpointIO(config(tmp_path))]).fit(
        Tiny([2.0, 1.0, 0.5]), loader(), loader(), ckpt_path="last"
    )
    assert restored.state["global_step"] == 10
    assert os.readlink(ckpt / "last.ckpt") == "epoch=2-step=15.ckpt"
    assert steps_of(tmp_path) == {15: ["epoch=2-step=15.ckpt"]}


# ---------------------------------------------------------------- (b) removals and retention


def test_model_checkpoint_removals_reach_retention_across_a_restart(tmp_path: Path) -> None:
    # val_loss by epoch: 3, 1, then 2 (replaces 3 in the top 2), then 0.5 (replaces 2).
    losses = [3.0, 1.0, 2.0, 0.5]
    ckpt = tmp_path / "ckpt"

    def fit(epochs: int, ckpt_path: str | None) -> ModelCheckpoint:
        mc = ModelCheckpoint(dirpath=ckpt, save_top_k=2, monitor="val_loss", save_last=True)
        io = DcpEngineCheckpointIO(config(tmp_path))
        trainer(epochs, [mc], plugins=[io]).fit(Tiny(losses), loader(), loader(),
                                                 ckpt_path=ckpt_path)  # fmt: skip
        return mc

    fit(3, None)
    # Step 5 lost both its names (top-k removal, last moved on) and retention deleted it;
    # step 10 keeps its top-k name after last moved on to step 15.
    assert steps_of(tmp_path) == {10: ["epoch=1-step=10.ckpt"],
                                  15: ["epoch=2-step=15.ckpt", "last.ckpt"]}  # fmt: skip
    assert names_in(ckpt) == {"epoch=1-step=10.ckpt": 10, "epoch=2-step=15.ckpt": 15,
                              "last.ckpt": 15}  # fmt: skip

    # A new run resumes in place; the restored ModelCheckpoint removes epoch 2's name
    # while last.ckpt still names step 15 (kept), then last moves on (step 15 goes).
    mc = fit(4, "last")
    assert steps_of(tmp_path) == {10: ["epoch=1-step=10.ckpt"],
                                  20: ["epoch=3-step=20.ckpt", "last.ckpt"]}  # fmt: skip
    assert names_in(ckpt) == {"epoch=1-step=10.ckpt": 10, "epoch=3-step=20.ckpt": 20,
                              "last.ckpt": 20}  # fmt: skip
    assert Path(mc.best_model_path).name == "epoch=3-step=20.ckpt"


def test_a_removal_waits_for_the_save_in_flight_and_a_step_goes_only_without_names(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    seen: dict[str, bool] = {}
    a, b, c = (str(tmp_path / "ckpt" / f"{n}.ckpt") for n in "abc")
    exp = tmp_path / "exp" / "run" / "checkpoints"

    def hook(phase: str, step: int) -> None:
        if step == 2 and phase == "written":
            assert release.wait(60)
        if step == 2 and phase == "marker":  # step 2 is being committed
            seen["a still named"] = Path(a).exists()
            seen["step 1 still there"] = (exp / "step_00000001").is_dir()

    def state(step: int) -> dict[str, Any]:
        return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((3,), step)}}

    engine = LightningEngine(config(tmp_path), hook=hook)
    engine.save(state(1), a, lambda: _app_state(state(1)))
    engine.save(state(1), b, lambda: _app_state(state(1)))  # the same step: a second name
    engine.save(state(2), c, lambda: _app_state(state(2)))  # in flight until released
    engine.remove(a)  # step 1 keeps its name b
    engine.remove(b)  # now step 1 has none: it goes, but only once step 2 committed
    engine.remove(c)  # step 2 itself: unnamed, but the newest is never deleted
    for name in (a, b):  # step 1's names are written by the namer once step 1 committed
        Gate(name).wait()
    release.set()
    engine.close()
    assert seen == {"a still named": True, "step 1 still there": True}
    assert steps_of(tmp_path) == {2: []}
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))

    # A restart reads the empty name list from the marker: step 2 goes after step 3.
    engine = LightningEngine(config(tmp_path))
    engine.save(state(3), c, lambda: _app_state(state(3)))
    engine.close()
    assert steps_of(tmp_path) == {3: ["c.ckpt"]}


def test_a_failed_save_gets_no_name_and_the_removal_it_gated_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    def hook(phase: str, step: int) -> None:
        if step == 2 and phase == "written":
            raise OSError(28, "No space left on device")

    a, b = str(tmp_path / "ckpt" / "a.ckpt"), str(tmp_path / "ckpt" / "b.ckpt")
    engine = LightningEngine(config(tmp_path), hook=hook)
    engine.save({"global_step": 1, "epoch": 0}, a, lambda: _app_state({"global_step": 1}))
    engine.save({"global_step": 2, "epoch": 0}, b, lambda: _app_state({"global_step": 2}))
    engine.remove(a)  # ModelCheckpoint drops the old one after saving the new one
    with pytest.raises(de.CheckpointError, match="No space left on device"):
        engine.close()
    assert steps_of(tmp_path) == {1: ["a.ckpt"]}
    assert names_in(tmp_path / "ckpt") == {"a.ckpt": 1}


def _app_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    from dcp_engine.integrations.lightning_payload import app_state

    return app_state(checkpoint)


# ---------------------------------------------------------------- resume, one device


def test_fit_resumes_from_last_and_from_a_reported_path_exactly(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    losses = [1.0, 2.0, 3.0, 4.0]  # epoch 0 stays the best

    def mc() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt, save_top_k=2, monitor="val_loss", save_last=True)

    first, io = mc(), RecordingIO(config(tmp_path))
    trainer(2, [first], plugins=[io]).fit(Tiny(losses), loader(), loader())

    # ckpt_path="last": every value as Lightning saved it, and then the same run.
    restored, model = Restored(), Tiny(losses)
    t = trainer(3, [mc(), restored], plugins=[DcpEngineCheckpointIO(config(tmp_path))])
    t.fit(model, loader(), loader(), ckpt_path="last")
    assert same(restored.state, saved_state(io.saved[str(ckpt / "last.ckpt")])) == []
    straight = Tiny(losses)
    trainer(3, [mc()], default_root_dir=tmp_path / "straight").fit(straight, loader(), loader())
    assert same(model.state_dict(), straight.state_dict()) == []

    # A path ModelCheckpoint reported, older than the newest: restored exactly; the run
    # goes on in a branch, the source experiment untouched.
    best = first.best_model_path
    assert Path(best).name == "epoch=0-step=5.ckpt"
    source = steps_of(tmp_path)
    restored = Restored()
    cfg = config(tmp_path)
    trainer(2, [mc(), restored], plugins=[DcpEngineCheckpointIO(cfg)]).fit(
        Tiny(losses), loader(), loader(), ckpt_path=best
    )
    assert same(restored.state, saved_state(io.saved[best])) == []
    assert steps_of(tmp_path) == source
    (branch,) = [p.name for p in (tmp_path / "exp").iterdir() if p.name.startswith("run_branch_")]
    assert sorted(steps_of(tmp_path, branch)) == [10]


def test_the_docs_show_the_example_as_it_is() -> None:
    page = (ROOT / "docs" / "lightning.md").read_text()
    shown = page.split("```python\ndef main() -> None:\n", 1)[1].split("```", 1)[0]
    assert "def main() -> None:\n" + shown in EXAMPLE.read_text()


# ---------------------------------------------------------------- bad input


def test_a_plain_lightning_checkpoint_loads_and_bad_input_is_refused_by_name(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, plain)
    io = DcpEngineCheckpointIO(config(tmp_path))
    assert io.load_checkpoint(plain)["global_step"] == 3  # a run moving onto the engine

    damaged = tmp_path / "damaged.ckpt"
    damaged.write_text('{"format": "dcp-engine-lightning-name/1", "experiment": "x"}')
    with pytest.raises(de.CheckpointError, match=r"damaged\.ckpt is a damaged"):
        io.load_checkpoint(damaged)
    assert io.load_checkpoint(plain, weights_only=True)["global_step"] == 3
    io.save_on_every_rank({"global_step": 7, "epoch": 0}, tmp_path / "ours.ckpt")
    io.teardown()
    with pytest.raises(de.CheckpointError, match=r"ours\.ckpt: weights_only=True"):
        io.load_checkpoint(tmp_path / "ours.ckpt", weights_only=True)
    with pytest.raises(FileNotFoundError, match=r"nothing\.ckpt"):
        io.load_checkpoint(tmp_path / "nothing.ckpt")
    with pytest.raises(de.ConfigError, match="save_top_k"):
        DcpEngineCheckpointIO(root_dir=str(tmp_path), keep_top_k=2, monitor="loss")
    with pytest.raises(de.ConfigError, match="ckpt_path"):
        DcpEngineCheckpointIO(root_dir=str(tmp_path), resume="latest")


# ---------------------------------------------------------------- the engine's discard


def test_discard_deletes_a_step_once_committed_and_never_the_newest(tmp_path: Path) -> None:
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", async_mode="thread")
    with de.CheckpointManager(cfg) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((2,), step)})
        mgr.discard(1)
        mgr.discard(2)  # the newest: kept until a newer one commits
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [2]
        mgr.save(3, {"w": torch.full((2,), 3)})
        mgr.discard(4)  # not saved yet: goes once it is saved and no longer the newest
        mgr.save(4, {"w": torch.full((2,), 4)})
        mgr.save(5, {"w": torch.full((2,), 5)})
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [3, 5]


# ---------------------------------------------------------------- (c) DDP, (d) FSDP2: 2 ranks


@multirank(2)
def _two_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Per strategy, on 2 real gloo ranks (launched from outside, as torchrun does)."""
    out: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp2"):
        out[strategy] = _fit_save_resume(Path(root) / strategy, world_size, strategy)
    # The plain IO under a plain DDPStrategy is called on rank 0 only: it says so at
    # once, naming the strategy to use, instead of waiting for the other rank.
    if rank == 0:
        cfg = config(Path(root) / "plain")
        try:
            DcpEngineCheckpointIO(cfg).save_checkpoint({"global_step": 1}, f"{root}/x.ckpt")
        except de.CheckpointError as e:
            out["rank 0 alone"] = str(e)
    return out


def _fit_save_resume(tmp: Path, world_size: int, strategy: str) -> dict[str, Any]:
    """A: 2 epochs; B: a new Trainer resumes from last.ckpt to 3 epochs. Where B's
    restored state differs from what A saved (the one-device test compares with a run
    that was never interrupted)."""
    shard = strategy == "fsdp2"

    def make(cfg: de.CheckpointConfig) -> Any:
        if shard:  # FSDP2 over both ranks (data parallel 2, no tensor parallel)
            return DcpEngineModelParallelStrategy(cfg, data_parallel_size=2,
                                                  tensor_parallel_size=1)  # fmt: skip
        return DcpEngineDDPStrategy(checkpoint_io=RecordingIO(cfg))

    def mc() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=2, monitor="val_loss",
                               save_last=True)  # fmt: skip

    a, strat = Tiny(shard=shard), make(config(tmp))
    trainer(2, [mc()], devices=world_size, strategy=strat).fit(a, loader(), loader())
    if shard:  # nothing trains after the last save: the live state is what was saved
        live = live_state(a.trainer, a)
        expected = {k: live[k] for k in ("params", "optimizer")}
        expected["global_step"], expected["epoch"] = a.trainer.global_step, 2
    else:
        expected = saved_state(strat.checkpoint_io.saved[str(tmp / "ckpt" / "last.ckpt")])

    restored, b = Restored(), Tiny(shard=shard)
    t = trainer(3, [mc(), restored], devices=world_size, strategy=make(config(tmp)))
    t.fit(b, loader(), loader(), ckpt_path="last")
    diffs = same({k: restored.state[k] for k in expected}, expected)
    return {"diffs": diffs, "restored_step": restored.state["global_step"],
            "world_size": t.world_size, "batches": t.num_training_batches}  # fmt: skip


@pytest.mark.slow
def test_ddp_and_fsdp2_save_on_every_rank_and_resume_exactly(tmp_path: Path) -> None:
    results = _two_ranks.run(str(tmp_path))
    for strategy in ("ddp", "fsdp2"):
        assert [r[strategy]["diffs"] for r in results] == [[], []], strategy
        sizes = [(r[strategy]["world_size"], r[strategy]["batches"]) for r in results]
        assert sizes == [(2, 3), (2, 3)]
        assert [r[strategy]["restored_step"] for r in results] == [6, 6]  # 3 steps an epoch
        newest = de.find_checkpoints(tmp_path / strategy / "exp" / "run")[0]
        assert newest.step == 9
        names = {Path(n).name for n in newest.extra[NAMES_KEY]}
        assert names == {"last.ckpt", "epoch=2-step=9.ckpt"}
        writers = {f.split("_")[2] for f in newest.files if f.startswith("__")}
        assert len(writers) == 2, newest.files  # both ranks wrote shards
    assert "DcpEngineDDPStrategy" in results[0]["rank 0 alone"]


# ---------------------------------------------------------------- the example (DDP by Lightning)


@pytest.mark.slow
def test_the_example_trains_on_two_ddp_ranks_and_resumes_on_one(tmp_path: Path) -> None:
    """The commands of docs/lightning.md: Lightning starts the second DDP rank by running
    the script again; the resume runs on one process (the checkpoint is not tied to a
    world size)."""

    def run(*args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, str(EXAMPLE), "--root", str(tmp_path), *args]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = run("--devices", "2", "--epochs", "2")  # 32 samples a rank: 4 steps an epoch
    assert "engine keeps steps [4, 8]" in out, out
    out = run("--devices", "1", "--epochs", "3", "--resume", "last")  # 8 steps an epoch
    assert "resumed from last.ckpt at epoch 2, global step 8" in out, out
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 16)
    kept = de.find_checkpoints(tmp_path / "experiments" / "lightning_example")
    named = {json.loads(p.read_text())["step"] for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert sorted(c.step for c in kept) == sorted(named) == [8, 16]
