"""Retention on disk, aliases, resume modes, experiment directories and the callbacks
(one process; the multi-rank retention test is in test_retention_multirank.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

import dcp_engine as de
from dcp_engine import layout
from tests.seams import FaultyStorage


def make_app(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optim": torch.optim.Adam(model.parameters(), lr=0.01),
            "extra": {"seen": 0}}  # fmt: skip


def train_step(app: dict) -> None:
    app["optim"].zero_grad()
    app["model"](torch.randn(2, 4)).sum().backward()
    app["optim"].step()
    app["extra"]["seen"] += 1


def cfg(tmp_path: Path, **kw) -> de.CheckpointConfig:
    base = {"root_dir": str(tmp_path), "experiment_name": "exp", "async_mode": "off",
            "fsync": False}  # fmt: skip
    return de.CheckpointConfig(**{**base, **kw})


def steps_on_disk(exp: Path) -> list[int]:
    return sorted(
        s
        for p in (exp / "checkpoints").iterdir()
        if (s := layout.parse_step_dirname(p.name)) is not None
    )


def loop(cb: de.CheckpointCallback, app: dict, epochs: int, per_epoch: int, losses=None) -> int:
    """A custom loop as in the docs; ``losses[epoch]`` is the validation metric."""
    start = cb.on_train_start(app)
    step = start.step
    for epoch in range(start.epoch, epochs):
        for _ in range(per_epoch):
            train_step(app)
            step += 1
            cb.on_step_end(step, app, metrics={"train_loss": 1.0 / step})
        if losses is not None:
            cb.on_validation_end({"val_loss": losses[epoch]})
        cb.on_epoch_end(epoch, app)
    cb.on_train_end(app)
    return step


# ----------------------------------------------------------------------------- when to save


def test_step_and_epoch_triggers_save_each_step_once(tmp_path):
    cb = de.CheckpointCallback(cfg(tmp_path, save_every_n_steps=2, save_every_n_epochs=2,
                                   save_on_train_end=False))  # fmt: skip
    loop(cb, make_app(), epochs=4, per_epoch=3)
    # steps 2,4,6,...,12; the ends of epochs 1 and 3 (steps 6 and 12) are saved already.
    assert steps_on_disk(tmp_path / "exp") == [2, 4, 6, 8, 10, 12]
    epochs = {c.step: c.epoch for c in de.find_checkpoints(tmp_path / "exp")}
    assert epochs == {2: 0, 4: 1, 6: 1, 8: 2, 10: 3, 12: 3}


def test_epoch_trigger_and_train_end(tmp_path):
    cb = de.CheckpointCallback(cfg(tmp_path, save_every_n_epochs=2))
    loop(cb, make_app(), epochs=3, per_epoch=3)
    assert steps_on_disk(tmp_path / "exp") == [6, 9]  # end of epoch 1; train end at step 9
    assert cb.manager is None  # on_train_end closed it


def test_seconds_trigger_follows_the_clock(tmp_path):
    now = [0.0]
    cb = de.CheckpointCallback(cfg(tmp_path, save_every_n_seconds=10, save_on_train_end=False),
                               clock=lambda: now[0])  # fmt: skip
    app = make_app()
    cb.on_train_start(app)
    saved = []
    for step in range(1, 8):
        now[0] += 4.0
        if cb.on_step_end(step, app):
            saved.append(step)
    cb.on_train_end(app)
    assert saved == [3, 6]  # 12 s after the start, then 12 s after the save at step 3


def test_save_best_only_saves_only_new_bests(tmp_path):
    c = cfg(tmp_path, monitor="val_loss", save_best_only=True, save_on_train_end=False)
    loop(de.CheckpointCallback(c), make_app(), epochs=5, per_epoch=2,
         losses=[0.9, 1.2, 0.5, 0.5, 0.7])  # fmt: skip
    found = de.find_checkpoints(tmp_path / "exp", "best")
    assert [(c.step, c.metrics["val_loss"]) for c in found] == [(6, 0.5), (2, 0.9)]
    assert os.readlink(tmp_path / "exp" / "checkpoints" / "best") == "step_00000006"


class EveryThird(de.CheckpointCallback):
    def should_save(self, *, event, step, epoch, metrics):
        return event == "step" and step % 3 == 0


def test_should_save_can_be_overridden(tmp_path):
    loop(EveryThird(cfg(tmp_path, save_on_train_end=False)), make_app(), epochs=2, per_epoch=4)
    assert steps_on_disk(tmp_path / "exp") == [3, 6]


def test_disabled_callback_does_nothing(tmp_path):
    cb = de.CheckpointCallback(cfg(tmp_path, enabled=False, save_every_n_steps=1))
    assert loop(cb, make_app(), epochs=1, per_epoch=2) == 2
    assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------- resume


def test_resume_latest_continues_the_newest_default_named_run_in_place(tmp_path):
    c = cfg(tmp_path, experiment_name="", model_name="vit", dataset_name="toy",
            save_every_n_epochs=1, save_on_train_end=False)  # fmt: skip
    app = make_app()
    loop(de.CheckpointCallback(c), app, epochs=2, per_epoch=3)
    (run,) = [p for p in tmp_path.iterdir()]
    assert layout.is_default_experiment_name(run.name, "vit", "toy")
    (tmp_path / "vit_toy_19990101_000000").mkdir()  # an older run: not picked
    (tmp_path / "vit_toy_29990101_000000").mkdir()  # newer, but nothing committed

    fresh = make_app(seed=1)
    cb = de.CheckpointCallback(dataclasses.replace(c, resume="latest"))
    start = cb.on_train_start(fresh)
    assert (start.step, start.epoch) == (6, 2) and cb.manager.experiment_dir == run
    assert fresh["extra"] == {"seen": 6}
    for a, b in zip(app["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    cb.close()


def test_resume_from_a_path_branches_and_leaves_the_source_untouched(tmp_path):
    c = cfg(tmp_path, save_every_n_steps=2, keep_last_n=1, save_on_train_end=False)
    loop(de.CheckpointCallback(c), make_app(), epochs=1, per_epoch=4)
    source_exp = tmp_path / "exp"
    assert steps_on_disk(source_exp) == [4]
    before = sorted((p.relative_to(source_exp), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in source_exp.rglob("*"))  # fmt: skip

    source = source_exp / "checkpoints" / "latest"  # an alias is a fine path
    branch = de.CheckpointCallback(dataclasses.replace(c, resume=str(source)))
    app = make_app(seed=3)
    start = branch.on_train_start(app)
    assert start.step == 4 and app["extra"] == {"seen": 4}
    new_exp = branch.manager.experiment_dir
    assert new_exp != source_exp and new_exp.name.startswith("exp_branch_")
    for step in (5, 6, 7, 8):
        train_step(app)
        branch.on_step_end(step, app)
    branch.on_train_end(app)
    assert steps_on_disk(new_exp) == [8]  # keep_last_n=1 in the branch, not the source
    after = sorted((p.relative_to(source_exp), p.stat().st_mtime_ns, p.stat().st_size)
                   for p in source_exp.rglob("*"))  # fmt: skip
    assert after == before
    written = yaml.safe_load((new_exp / "config.yaml").read_text())
    assert written["checkpoint"]["resume"] == str(source)


def test_resume_of_a_missing_path_names_it(tmp_path):
    with pytest.raises(de.CheckpointNotFoundError, match="nowhere"):
        de.CheckpointManager(cfg(tmp_path, resume=str(tmp_path / "nowhere")))


def test_config_yaml_is_written_once(tmp_path):
    run_config = {"model": {"name": "vit"}, "checkpoint": {"dir": str(tmp_path)}}
    with de.CheckpointManager(cfg(tmp_path), run_config=run_config):
        pass
    path = tmp_path / "exp" / "config.yaml"
    assert yaml.safe_load(path.read_text()) == run_config
    with de.CheckpointManager(cfg(tmp_path), run_config={"other": 1}):
        pass
    assert yaml.safe_load(path.read_text()) == run_config


# ----------------------------------------------------------------------------- retention


def test_top_k_deletes_on_disk_keeps_aliases_and_foreign_names(tmp_path):
    c = cfg(tmp_path, monitor="loss", keep_top_k=2)
    exp = tmp_path / "exp"
    (exp / "checkpoints" / "notes").mkdir(parents=True)
    (exp / "checkpoints" / "step_00000999.backup").mkdir()
    losses = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.7, 5: 0.8, 6: math.nan}
    app = make_app()
    with de.CheckpointManager(c) as mgr:
        for step, loss in losses.items():
            mgr.save(step, app, metrics={"loss": loss})
        mgr.wait()
        assert [e.step for e in mgr.checkpoints()] == [1, 3, 6]
    # Top 2 by loss (3, 1) and the newest (6, its NaN ranks worst but it is the newest).
    assert steps_on_disk(exp) == [1, 3, 6]
    assert (exp / "checkpoints" / "notes").is_dir()
    assert (exp / "checkpoints" / "step_00000999.backup").is_dir()
    assert os.readlink(exp / "checkpoints" / "latest") == "step_00000006"
    assert os.readlink(exp / "checkpoints" / "best") == "step_00000003"
    index = yaml.safe_load((exp / "index.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [1, 3, 6] and index["best"] == 3
    assert not list((exp / "checkpoints").glob("*.tmp"))


def test_collector_survives_a_checkpoint_already_gone(tmp_path):
    app = make_app()
    with de.CheckpointManager(cfg(tmp_path, keep_last_n=1)) as mgr:
        mgr.save(1, app)
        # Someone deleted step 1 by hand: the next collection must not fail.
        import shutil

        shutil.rmtree(tmp_path / "exp" / "checkpoints" / "step_00000001")
        mgr.save(2, app)
        mgr.wait()
        assert [e.step for e in mgr.checkpoints()] == [2]
        assert mgr._exp.catalog.deleted == []
    assert steps_on_disk(tmp_path / "exp") == [2]


def test_the_checkpoint_resumed_from_is_kept(tmp_path):
    app = make_app()
    with de.CheckpointManager(cfg(tmp_path)) as mgr:  # keeps everything
        mgr.save(1, app)
        mgr.save(2, app)
    with de.CheckpointManager(cfg(tmp_path, keep_last_n=1)) as mgr:
        assert mgr.load(app, which=1).step == 1
        for step in (3, 4):
            mgr.save(step, app)
        mgr.wait()
        assert [e.step for e in mgr.checkpoints()] == [1, 4]


def test_find_checkpoints_reads_the_monitor_from_config_yaml(tmp_path):
    app = make_app()
    with de.CheckpointManager(cfg(tmp_path, monitor="acc", mode="max")) as mgr:
        for step, acc in ((1, 0.3), (2, 0.8), (3, 0.5)):
            mgr.save(step, app, epoch=0, metrics={"acc": acc})
    exp = tmp_path / "exp"
    assert [c.step for c in de.find_checkpoints(exp)] == [3, 2, 1]
    assert [c.step for c in de.find_checkpoints(exp, "best")] == [2, 3, 1]
    assert [c.step for c in de.find_checkpoints(exp, "best", monitor="acc", metric_mode="min")] == [
        1, 3, 2
    ]  # fmt: skip
    with pytest.raises(de.CheckpointNotFoundError, match="missing"):
        de.find_checkpoints(tmp_path / "missing")


# ----------------------------------------------------------------------------- exceptions


def test_on_exception_flushes_without_a_new_save_unless_configured(tmp_path):
    for save_on_exception, expected in ((False, [2]), (True, [2, 3])):
        root = tmp_path / str(save_on_exception)
        c = cfg(root, save_every_n_steps=2, save_on_exception=save_on_exception,
                async_mode="thread")  # fmt: skip
        cb = de.CheckpointCallback(c)
        app = make_app()
        cb.on_train_start(app)
        try:
            for step in (1, 2, 3):
                train_step(app)
                cb.on_step_end(step, app)
            raise FloatingPointError("loss is NaN")
        except FloatingPointError as e:
            cb.on_exception(app, e)
        assert steps_on_disk(root / "exp") == expected
        assert cb.manager is None


def test_async_callback_refuses_off_and_the_plain_callback_keeps_it(tmp_path):
    with pytest.raises(ValueError, match="use CheckpointCallback"):
        de.AsyncCheckpointCallback(cfg(tmp_path))
    assert de.CheckpointCallback(cfg(tmp_path)).config.async_mode == "off"


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_validation_after_a_step_save_goes_to_that_checkpoint(tmp_path, mode):
    """Pass: with save_every_n_steps on the epoch's last step, the validation metrics that
    come after it are recorded in that checkpoint's marker (also while its async write is
    still in flight), so top-k and ``best`` rank by them."""
    c = cfg(tmp_path, async_mode=mode, save_every_n_steps=3, monitor="val_loss",
            keep_top_k=1, save_on_train_end=False)  # fmt: skip
    slow_disk = FaultyStorage(slow_s=0.3 if mode == "thread" else 0.0)  # still writing
    loop(de.CheckpointCallback(c, storage=slow_disk), make_app(), epochs=4, per_epoch=3,
         losses=[0.9, 0.2, 0.5, 0.7])  # fmt: skip
    exp = tmp_path / "exp"
    found = {e.step: e.metrics.get("val_loss") for e in de.find_checkpoints(exp)}
    assert found == {6: 0.2, 12: 0.7}  # the best and the newest
    assert os.readlink(exp / "checkpoints" / "best") == "step_00000006"
    marker = json.loads((exp / "checkpoints" / "step_00000012" / "COMMITTED").read_text())
    assert marker["metrics"]["val_loss"] == 0.7 and "train_loss" in marker["metrics"]


def test_an_epoch_end_on_a_step_save_resumes_at_the_next_epoch(tmp_path):
    """Pass: the step trigger saves the epoch's last step; the epoch end then marks that
    checkpoint as the epoch's end, so a resumed run starts the next epoch."""
    c = cfg(tmp_path, save_every_n_steps=3, save_on_train_end=False)
    loop(de.CheckpointCallback(c), make_app(), epochs=2, per_epoch=3, losses=[0.5, 0.4])
    (last,) = de.find_checkpoints(tmp_path / "exp")[:1]
    assert last.step == 6 and last.extra["trainer"] == {
        "step": 6, "epoch": 1, "epoch_done": True, "batches_done": 3
    }  # fmt: skip
    cb = de.CheckpointCallback(dataclasses.replace(c, resume="latest"))
    start = cb.on_train_start(make_app(seed=2))
    assert (start.step, start.epoch) == (6, 2)
    cb.close()


def test_load_with_optional_keys_keeps_what_the_checkpoint_lacks(tmp_path):
    app = make_app()
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        mgr.save(1, app)
        grown = {**make_app(seed=5), "ema": torch.ones(3)}
        with pytest.raises(de.StateMismatchError, match="no entry 'ema'"):
            mgr.load(grown)
        assert mgr.load(grown, optional=("ema",)).step == 1
        assert torch.equal(grown["ema"], torch.ones(3))
        assert torch.equal(grown["model"].weight, app["model"].weight)


def test_extra_is_kept_in_every_marker_beside_the_position(tmp_path):
    """Pass: ``extra=`` is in the markers of step, epoch-end (a metric update of a step just
    saved) and train-end saves, beside the callback's ``trainer``; and ``trainer`` itself
    is refused as a key of ``extra``."""
    config = {"model": {"arch": "vit_tiny"}, "lr": 0.1}
    c = cfg(tmp_path, save_every_n_steps=3, save_every_n_epochs=1)
    loop(de.CheckpointCallback(c, extra={"config": config}), make_app(), epochs=2, per_epoch=3,
         losses=[0.5, 0.4])  # fmt: skip
    found = {i.step: i for i in de.find_checkpoints(tmp_path / "exp")}
    assert sorted(found) == [3, 6]
    for info in found.values():
        assert info.extra["config"] == config
        assert info.extra["trainer"]["epoch_done"] is True  # updated at the epoch end
        assert info.metrics["val_loss"] in (0.5, 0.4)
    with pytest.raises(ValueError, match=r"extra\['trainer'\] is the callback's"):
        de.CheckpointCallback(c, extra={"trainer": 1})
