"""The five reference guides (``/work/shared/reference``) run as written: their YAML blocks
through ``CheckpointConfig.from_yaml``, their calls through our API (``docs/guides.md``
maps each key and call). One test per guide runs its examples; the others pin the cases
issue 16 found, each of which failed before."""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import dcp_engine as de
from dcp_engine import cli, layout, resolve
from dcp_engine.weights import load_weights
from tests.distributed import multirank

# ----------------------------------------------------------------------------- helpers


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def quiet(**kw: Any) -> dict[str, Any]:
    """Test settings that change nothing the guides document: in-line writes, no fsync."""
    return {"async_mode": "off", "fsync": False, **kw}


def make_app(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return {"model": model, "optim": torch.optim.Adam(model.parameters(), lr=0.01)}


def train_step(app: dict[str, Any]) -> None:
    app["optim"].zero_grad()
    app["model"](torch.randn(2, 4)).sum().backward()
    app["optim"].step()


def run_loop(cb: de.CheckpointCallback, app: dict[str, Any], epochs: int, per_epoch: int,
             val: list[float] | None = None, key: str = "val_loss") -> int:  # fmt: skip
    start = cb.on_train_start(app)
    step = start.step
    for epoch in range(start.epoch, epochs):
        for _ in range(per_epoch):
            train_step(app)
            step += 1
            cb.on_step_end(step, app)
        if val is not None:
            cb.on_validation_end({key: val[epoch]})
        cb.on_epoch_end(epoch, app)
    cb.on_train_end(app)
    return step


def steps_in(exp: Path) -> list[int]:
    return sorted(c.step for c in de.find_checkpoints(exp))


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Center(nn.Module):
    """A DINO loss: its running centre is a buffer (the guide's ``dino_loss_center``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, 3))


def dino_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss_fn = Center()
    loss_fn.center += seed
    return {"student": student, "teacher": teacher, "optimizer": optimizer, "loss_fn": loss_fn}


# ============================================================================= the guides


def test_experiment_config_guide_runs_as_written(tmp_path, monkeypatch):
    """Every YAML block of experiment-checkpoint-config.md loads as written, with its
    documented defaults; the resume block's ``.../checkpoints/latest.pt`` resumes; its
    manual load (``best.pt``, ``model_state_dict``) maps onto ``load_weights``."""
    monkeypatch.chdir(tmp_path)
    blocks = {
        "basic": 'enabled: true\ndir: "./experiments"\nsave_best: true\n',
        "full": 'enabled: true\ndir: "./experiments"\nexperiment_name: ""\n'
        "save_frequency: 10\nsave_best: true\nresume: \"\"\n",
        "auto": 'enabled: true\ndir: "./experiments"\n',
        "custom": 'enabled: true\ndir: "./experiments"\nexperiment_name: "my_experiment_v1"\n',
        "frequent": 'enabled: true\ndir: "./experiments"\nsave_frequency: 5\nsave_best: true\n',
        "disable": "enabled: false\n",
    }
    got = {}
    for name, body in blocks.items():
        text = "checkpoint:\n" + textwrap.indent(body, "  ")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # save_best without a monitor: tested below
            got[name] = de.CheckpointConfig.from_yaml(write_yaml(tmp_path, text, f"{name}.yaml"))
    assert got["basic"].enabled and got["basic"].save_best
    assert got["basic"].save_every_n_epochs == 10  # the guide's default save_frequency
    assert got["full"].experiment_name == "" and got["full"].resume is None
    assert got["auto"].root_dir == "./experiments" and got["auto"].save_every_n_epochs == 10
    assert got["custom"].experiment_name == "my_experiment_v1"
    assert got["frequent"].save_every_n_epochs == 5
    assert got["disable"].enabled is False
    # A run with the "Frequent saves" block (and a metric to rank by), then the "Resume
    # Experiment" block exactly as printed, pointed at that run's latest.pt.
    first = de.CheckpointConfig.from_dict(
        {"enabled": True, "dir": "./experiments", "experiment_name": "my_experiment",
         "save_frequency": 5, "save_best": True, "monitor": "best_acc", "mode": "max",
         **quiet()}
    )  # fmt: skip
    app = make_app(0)
    run_loop(de.CheckpointCallback(first), app, epochs=10, per_epoch=2,
             val=[0.1 * e for e in range(10)], key="best_acc")  # fmt: skip
    assert steps_in(tmp_path / "experiments/my_experiment") == [10, 20]
    resume = write_yaml(tmp_path, """
        checkpoint:
          enabled: true
          dir: "./experiments"
          save_frequency: 10
          save_best: true
          resume: "./experiments/my_experiment/checkpoints/latest.pt"
    """)  # fmt: skip
    with pytest.warns(UserWarning, match="monitor"):
        second = de.CheckpointConfig.from_yaml(resume)
    again = make_app(1)
    cb = de.CheckpointCallback(second.__class__(**{**second.to_dict(), **quiet()}))
    start = cb.on_train_start(again)
    assert (start.step, start.epoch) == (20, 10) and start.resumed_from is not None
    assert start.resumed_from.step == 20 and same(again["model"], app["model"])
    cb.close()
    # "Loading Checkpoints Manually": torch.load(".../best.pt")["model_state_dict"].
    model = nn.Linear(4, 3)
    load_weights(model, "experiments/my_experiment/checkpoints/best.pt", key="model_state_dict")
    assert same(model, app["model"])


def test_dino_guide_runs_as_written(tmp_path, monkeypatch):
    """dino-checkpointing.md: its YAML block, ``save_checkpoint``/``load_checkpoint`` from
    the package with its arguments and dict, ``checkpoint_latest.pth`` and
    ``checkpoint_epoch_0050.pth`` (the CLI's ``--resume``), and loading the teacher for
    evaluation."""
    monkeypatch.chdir(tmp_path)
    block = write_yaml(tmp_path, """
        checkpoint:
          save_dir: ./checkpoints     # Where to save
          save_freq: 10               # Save every N epochs
          save_latest: true           # Keep checkpoint_latest.pth
          save_best: true             # Keep checkpoint_best.pth
    """)  # fmt: skip
    with pytest.warns(UserWarning, match=r"checkpoint\.save_best.*monitor"):
        cfg = de.CheckpointConfig.from_yaml(block)
    assert (cfg.root_dir, cfg.save_every_n_epochs, cfg.save_last, cfg.enabled) == (
        "./checkpoints", 10, True, True,
    )  # fmt: skip
    from dcp_engine import load_checkpoint, save_checkpoint

    a = dino_state(0)
    config = {"lr": 1e-3, "checkpoint": {"monitor": "loss", "mode": "min"}}
    for epoch, iteration, loss in ((40, 8000, 3.0), (50, 10000, 2.5)):
        save_checkpoint(
            path="checkpoints/my_checkpoint.pth",
            epoch=epoch,
            iteration=iteration,
            student=a["student"],
            teacher=a["teacher"],
            optimizer=a["optimizer"],
            loss_fn=a["loss_fn"],
            config=config,
            metrics={"loss": loss},
        )
    b = dino_state(1)
    checkpoint = load_checkpoint(
        "checkpoints/checkpoint_latest.pth",
        student=b["student"],
        teacher=b["teacher"],
        optimizer=b["optimizer"],
        loss_fn=b["loss_fn"],
    )
    start_epoch = checkpoint["epoch"] + 1
    iteration = checkpoint["iteration"]
    assert (start_epoch, iteration) == (51, 10000)
    assert checkpoint["config"] == config and checkpoint["metrics"] == {"loss": 2.5}
    assert checkpoint["timestamp"].startswith("20")
    assert same(a["teacher"], b["teacher"]) and same(a["loss_fn"], b["loss_fn"])
    older = load_checkpoint("checkpoints/checkpoint_epoch_0040.pth", student=b["student"])
    assert (older["epoch"], older["iteration"]) == (40, 8000)
    # python scripts/train.py --resume checkpoints/checkpoint_epoch_0050.pth
    resumed = de.CheckpointConfig(resume="checkpoints/checkpoint_epoch_0050.pth",
                                  root_dir="runs", **quiet())  # fmt: skip
    with de.CheckpointManager(resumed) as mgr:
        c = dino_state(2)
        app = {"student": c["student"], "teacher": c["teacher"],
               "optimizer": c["optimizer"], "dino_loss": c["loss_fn"]}  # fmt: skip
        assert mgr.resume(app).step == 10000
    assert same(c["student"], a["student"])
    # "Loading for Evaluation": the teacher of checkpoint_best.pth (by the config's monitor).
    model = nn.Linear(4, 3)
    load_weights(model, "checkpoints/checkpoint_best.pth", key="teacher_state_dict")
    assert same(model, a["teacher"])


class ModelA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)


class ModelB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        # The guide writes Sequential([conv]), which torch refuses (a list is no Module).
        self.CONV2 = nn.Sequential(nn.Conv2d(6, 16, 5))


def test_super_gradients_guide_runs_as_written(tmp_path):
    """super-gradients-checkpoints.md: the ``checkpoint_params`` and resume blocks load as
    printed; a training block with ``metric_to_watch``, ``save_ckpt_epoch_list`` and
    ``average_best_models`` saves and keeps those epochs and writes ``average_model``;
    ``ckpt_best.pth``/``ckpt_latest.pth``/``ckpt_epoch_N.pth`` load; ``run_id`` resumes;
    ``checkpoint_path``/``strict_load: no_key_matching`` load ModelA's weights into ModelB."""
    defaults = write_yaml(tmp_path, """
        load_backbone: False # whether to load only the backbone part of the checkpoint
        checkpoint_path: # checkpoint path that is located in super_gradients/checkpoints
        strict_load: True # key matching strictness for loading checkpoint's weights
        pretrained_weights: # a string describing the dataset of the pre-trained weights (for example, "imagenent").
    """, "checkpoint_params.yaml")  # noqa: E501  # fmt: skip
    cfg = de.CheckpointConfig.from_yaml(defaults)
    assert cfg.init_weights is None and cfg.init_weights_strict is True
    assert cfg.init_weights_backbone_only is False
    resume = write_yaml(tmp_path, """
        resume: False  # Option to continue training from the latest checkpoint.
        run_id:        # ID to resume from a specific run within the same experiment.
        resume_path:   # Direct path to a specific checkpoint file (.pth) to resume training.
    """, "resume.yaml")  # fmt: skip
    assert de.CheckpointConfig.from_yaml(resume).resume is None
    root = tmp_path / "ckpts"
    train = {"ckpt_root_dir": str(root), "experiment_name": "my_resnet18_training_experiment",
             "metric_to_watch": "Accuracy", "save_ckpt_epoch_list": [2, 3],
             "average_best_models": True, "keep_last_n": 1, **quiet()}  # fmt: skip
    cfg = de.CheckpointConfig.from_dict(train)
    assert (cfg.monitor, cfg.mode, cfg.save_at_epochs) == ("Accuracy", "max", (2, 3))
    app = make_app(0)
    acc = [0.1, 0.5, 0.3, 0.4, 0.2]
    run_loop(de.CheckpointCallback(cfg), app, epochs=5, per_epoch=2, val=acc, key="Accuracy")
    exp = root / "my_resnet18_training_experiment"
    # epochs 2 and 3 (steps 4 and 6) saved and kept; 10 (train end) is the newest.
    assert steps_in(exp) == [4, 6, 10]
    infos = {c.step: c for c in de.find_checkpoints(exp)}
    assert [infos[s].metrics.get("Accuracy") for s in (4, 6, 10)] == [0.5, 0.3, None]
    average = torch.load(exp / "average_model.pth", weights_only=True)
    tops = []
    for step in (4, 6):  # every one with an Accuracy (up to 10)
        with de.open_checkpoint(exp, which=step) as ck:
            tops.append(ck.load_entries(["model"])["model"])
    assert set(average) == {"model"}
    for name, value in average["model"].items():
        assert torch.allclose(value, (tops[0][name] + tops[1][name]) / 2)
    model = nn.Linear(4, 3)
    load_weights(model, exp / "average_model.pth")  # its one model, found without a key
    for path, step in (("ckpt_latest.pth", 10), ("ckpt_epoch_2.pth", 4), ("ckpt_epoch_3.pth", 6),
                       ("ckpt_best.pth", 4)):  # fmt: skip
        assert resolve.checkpoint_dir_of(exp / path).name == layout.step_dirname(step), path
    # run_id: resume that run (our experiment), whatever `resume` says.
    again = de.CheckpointConfig.from_dict({"ckpt_root_dir": str(root), "resume": False,
                                           "run_id": "my_resnet18_training_experiment",
                                           "metric_to_watch": "Accuracy", **quiet()})  # fmt: skip
    assert again.resume == "latest" and again.experiment_name == "my_resnet18_training_experiment"
    other = make_app(3)
    cb = de.CheckpointCallback(again)
    assert cb.on_train_start(other).step == 10 and same(other["model"], app["model"])
    cb.close()
    # checkpoint_path + strict_load: no_key_matching (ModelA's checkpoint into ModelB).
    torch.manual_seed(0)
    src = ModelA()
    torch.save({"net": src.state_dict(), "acc": 0.9, "epoch": 3}, tmp_path / "ckpt_best.pth")
    fine = de.CheckpointConfig.from_dict({"ckpt_root_dir": str(tmp_path / "ft"),
                                          "experiment_name": "ft",
                                          "checkpoint_path": str(tmp_path / "ckpt_best.pth"),
                                          "strict_load": "no_key_matching", **quiet()})  # fmt: skip
    dst = ModelB()
    cb = de.CheckpointCallback(fine)
    cb.on_train_start({"net": dst})
    cb.close()
    for x, y in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(x, y)


class CustomCheckpointCallback(de.CheckpointCallback):
    """The guide's "Custom Checkpoint Logic", verbatim."""

    def should_save(self) -> bool:
        """Custom logic for when to save."""
        # Save only if validation loss improved by 1%
        if self._current_metric is None:
            return False

        if not hasattr(self, "best_metric"):
            self.best_metric = float("inf")

        improvement = (self.best_metric - self._current_metric) / self.best_metric
        if improvement > 0.01:
            self.best_metric = self._current_metric
            return True

        return False


class FromOne(CustomCheckpointCallback):
    best_metric = 1.0  # the guide's rule, from a finite best


class MetricCheckpointCallback:
    """The guide's "Integration with Other Callbacks" (its ``Callback[BaseTrainer]`` base
    is Dream Trainer's), verbatim."""

    def __init__(self, checkpoint_callback: de.CheckpointCallback):
        self.checkpoint_callback = checkpoint_callback
        self.best_accuracy = 0
        self.best_f1 = 0

    def post_validation_epoch(self, result: dict[str, Any]):
        accuracy = result.get("val_accuracy", 0)
        f1 = result.get("val_f1", 0)

        # Save if both metrics improve
        if accuracy > self.best_accuracy and f1 > self.best_f1:
            self.best_accuracy = accuracy
            self.best_f1 = f1

            # Trigger checkpoint save
            self.checkpoint_callback._current_metric = accuracy
            self.checkpoint_callback.save()


def test_dream_trainer_guide_runs_as_written(tmp_path, monkeypatch):
    """dream-trainer-checkpoint-callbacks.md: every ``CheckpointParameters(...)`` of the
    guide (the ones keeping top-k without a monitor are refused naming ``monitor``), the
    callbacks, ``resume_mode``, the custom ``should_save``, ``save()`` from another
    callback and ``find_checkpoints(checkpoint_dir=..., mode=...)`` with ``.metric``."""
    monkeypatch.chdir(tmp_path)
    from dcp_engine import AsyncCheckpointCallback, CheckpointCallback, CheckpointParameters

    checkpoint_config = CheckpointParameters(
        root_dir="./checkpoints",
        monitor="val_loss",  # Metric to monitor
        mode="min",  # Save when metric is minimized
        keep_top_k=3,  # Keep best 3 checkpoints
        save_last=True,  # Always save last checkpoint
    )
    callback = CheckpointCallback(checkpoint_config)
    assert callback.config.keep_top_k == 3
    advanced = CheckpointParameters(
        root_dir="/mnt/checkpoints",
        monitor="val_accuracy",
        mode="max",  # Save when metric is maximized
        keep_top_k=5,
        save_last=True,
        save_every_n_epochs=5,  # Save every 5 epochs
        save_every_n_steps=1000,  # Save every 1000 steps
        resume_mode="best",  # Resume from best checkpoint
    )
    assert advanced.resume == "best" and advanced.save_every_n_steps == 1000
    automatic = CheckpointParameters(
        root_dir="./checkpoints",
        resume_mode="latest",  # Resume from most recent
    )
    assert automatic.resume == "latest"
    assert CheckpointParameters(root_dir="./checkpoints", resume_mode=None).resume is None
    for monitor, mode in (("val_perplexity", "min"), ("val_accuracy", "max"),
                          ("val_combined_score", "max")):  # fmt: skip
        assert CheckpointParameters(monitor=monitor, mode=mode).monitor == monitor
    with pytest.raises(de.ConfigError, match=r"keep_top_k=3.*monitor"):
        CheckpointParameters(root_dir="/fast_ssd/checkpoints", keep_top_k=3, save_last=True)
    with pytest.raises(de.ConfigError, match=r"keep_top_k=5.*monitor"):
        CheckpointParameters(save_every_n_steps=500, save_every_n_epochs=1, keep_top_k=5)
    assert isinstance(AsyncCheckpointCallback(checkpoint_config), CheckpointCallback)

    # The custom should_save (no arguments) runs and decides. As printed it never saves:
    # its first improvement is (inf - x) / inf, NaN. From a finite best_metric it does.
    params = CheckpointParameters(root_dir="./checkpoints", monitor="val_loss", mode="min",
                                  save_every_n_epochs=1, experiment_name="custom",
                                  **quiet())  # fmt: skip
    run_loop(CustomCheckpointCallback(params), make_app(), epochs=4, per_epoch=2,
             val=[1.0, 0.995, 0.5, 0.6])  # fmt: skip
    assert steps_in(Path("checkpoints/custom")) == [8]  # only save_on_train_end's
    params = CheckpointParameters(**{**params.to_dict(), "experiment_name": "from_one"})
    run_loop(FromOne(params), make_app(), epochs=4, per_epoch=2, val=[1.0, 0.995, 0.5, 0.6])
    # 1.0 and 0.995 improve on 1.0 by less than 1 %; 0.5 does (epoch 2 ends at step 6).
    # The end of training saves as save_on_train_end says (the guide's should_save(self)
    # cannot tell that event from another): step 8.
    assert steps_in(Path("checkpoints/from_one")) == [6, 8]

    # MetricCheckpointCallback: save() now, with _current_metric as the monitor's value.
    params = CheckpointParameters(root_dir="./dt", monitor="val_accuracy", mode="max",
                                  experiment_name="metric", save_on_train_end=False,
                                  **quiet())  # fmt: skip
    ckpt = CheckpointCallback(params)
    other = MetricCheckpointCallback(ckpt)
    app = make_app()
    ckpt.on_train_start(app)
    step = 0
    for accuracy, f1 in ((0.6, 0.5), (0.7, 0.4), (0.8, 0.6)):
        for _ in range(2):
            train_step(app)
            step += 1
            ckpt.on_step_end(step, app)
        other.post_validation_epoch({"val_accuracy": accuracy, "val_f1": f1})
    ckpt.on_train_end(app)
    # find_checkpoints as printed, on the experiment (Dream Trainer's checkpoint_dir).
    checkpoints = de.find_checkpoints(
        checkpoint_dir="./dt/metric",
        mode="best",  # or "latest"
    )
    assert [(ckpt.step, ckpt.metric) for ckpt in checkpoints] == [(6, 0.8), (2, 0.6)]
    for ckpt in de.find_checkpoints(checkpoint_dir="./dt/metric/checkpoints", mode="latest"):
        print(f"Step: {ckpt.step}, Metric: {ckpt.metric}")
    latest = de.find_checkpoints(checkpoint_dir="./dt/metric", mode="latest")
    assert [(c.step, c.metric) for c in latest] == [(6, 0.8), (2, 0.6)]

    # resume_mode="best" from the constructor resumes the best; None starts fresh.
    for mode, step in (("best", 6), ("latest", 6), (None, 0)):
        cb = CheckpointCallback(CheckpointParameters(root_dir="./dt", experiment_name="metric",
                                                     monitor="val_accuracy", mode="max",
                                                     resume_mode=mode, **quiet()))  # fmt: skip
        assert cb.on_train_start(make_app(5)).step == step, mode
        cb.close()


def test_mammoth_guide_runs_as_written(tmp_path):
    """mammoth-checkpoints.rst: a checkpoint in Mammoth's format (``model`` with
    ``backbone.*``, ``optimizer``, ``scheduler``, ``args``, ``results``) and a simple
    ``.pt`` holding only the backbone's parameters both load, from disk and from a URL."""
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone, model.head = nn.Linear(4, 4), nn.Linear(4, 10)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    mammoth = tmp_path / "checkpoints" / "er_seq-cifar10_500_50_20240101-120000_0.pt"
    mammoth.parent.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": optim.state_dict(), "scheduler": None,
                "args": {"model": "er"}, "results": [[0.9]]}, mammoth)  # fmt: skip
    into = nn.Module()
    into.backbone, into.head = nn.Linear(4, 4), nn.Linear(4, 10)
    load_weights(into, mammoth)
    assert same(into, model)
    plain = tmp_path / "plain_backbone.pt"
    torch.save(model.backbone.state_dict(), plain)  # keys without "backbone."
    backbone = nn.Linear(4, 4)
    load_weights(backbone, plain, backbone_only=True)
    assert same(backbone, model.backbone)
    # --loadcheck with a URL: the same loads from a URL.
    import fsspec

    with fsspec.open("memory://mammoth/plain_backbone.pt", "wb") as f:
        torch.save(model.backbone.state_dict(), f)
    remote = nn.Module()
    remote.backbone, remote.head = nn.Linear(4, 4), nn.Linear(4, 3)
    result = load_weights(remote, "memory://mammoth/plain_backbone.pt", backbone_only=True)
    assert result.missing_keys == [] and same(remote.backbone, model.backbone)


# ============================================================================= the cases


def test_checkpoint_config_takes_resume_mode_and_refuses_two_different_resumes():
    assert de.CheckpointConfig(resume_mode="best", monitor="m").resume == "best"
    assert de.CheckpointConfig(resume_mode="latest").resume == "latest"
    assert de.CheckpointConfig(resume_mode=None).resume is None
    assert de.CheckpointConfig(resume="latest", resume_mode="latest").resume == "latest"
    with pytest.raises(de.ConfigError, match=r"resume_mode.*resume"):
        de.CheckpointConfig(resume="latest", resume_mode="best", monitor="m")
    with pytest.raises(de.ConfigError, match=r"resume_mode='best'.*monitor"):
        de.CheckpointConfig(resume_mode="best")
    assert de.CheckpointParameters is de.CheckpointConfig
    assert "resume_mode" not in de.CheckpointConfig().to_dict()
    # In a file: `resume_mode: None` (a string to YAML) and `null` start fresh.
    for text in ("resume_mode: None\n", "resume_mode: null\n", "resume_mode: best\n"):
        block = yaml.safe_load("root_dir: x\nmonitor: m\n" + text)
        want = "best" if "best" in text else None
        assert de.CheckpointConfig.from_dict(block).resume == want, text


class KeywordRule(de.CheckpointCallback):
    def should_save(self, *, event, step, epoch, metrics):
        return event == "step" and step % 3 == 0


def test_should_save_overrides_with_and_without_arguments(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="kw",
                            save_on_train_end=False, **quiet())  # fmt: skip
    run_loop(KeywordRule(c), make_app(), epochs=2, per_epoch=4)
    assert steps_in(tmp_path / "kw") == [3, 6]

    class NoArgs(de.CheckpointCallback):
        def should_save(self) -> bool:
            return self._step % 4 == 0

    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="none",
                            save_on_train_end=False, **quiet())  # fmt: skip
    run_loop(NoArgs(c), make_app(), epochs=2, per_epoch=4)
    assert steps_in(tmp_path / "none") == [4, 8]


def test_current_metric_follows_the_monitor_and_is_none_after_resume(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="m", monitor="val_loss",
                            save_every_n_epochs=1, **quiet())  # fmt: skip
    cb = de.CheckpointCallback(c)
    app = make_app()
    assert cb.on_train_start(app).step == 0 and cb._current_metric is None
    cb.on_step_end(1, app, metrics={"val_loss": 0.7})
    assert cb._current_metric == 0.7
    cb.on_validation_end({"val_loss": 0.4, "other": 1.0})
    assert cb._current_metric == 0.4
    cb.on_epoch_end(0, app)
    cb.on_train_end(app)
    again = de.CheckpointCallback(de.CheckpointConfig(**{**c.to_dict(), "resume": "latest"}))
    again.on_train_start(make_app())
    assert again._current_metric is None
    again.close()


def test_find_checkpoints_takes_checkpoint_dir_and_gives_the_metric(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", monitor="loss",
                            **quiet())  # fmt: skip
    with de.CheckpointManager(c) as mgr:
        app = make_app()
        for step, loss in ((1, 0.5), (2, 0.2), (3, math.nan)):
            mgr.save(step, app, metrics={"loss": loss})
        mgr.save(4, app)
    best = de.find_checkpoints(checkpoint_dir=tmp_path / "e", mode="best")
    assert [c.step for c in best] == [2, 1, 4, 3]  # no finite loss: last
    assert (best[0].metric, best[1].metric, best[2].metric) == (0.2, 0.5, None)
    latest = de.find_checkpoints(checkpoint_dir=tmp_path / "e" / "checkpoints")
    assert [c.step for c in latest] == [4, 3, 2, 1]
    assert (latest[0].metric, latest[2].metric, latest[3].metric) == (None, 0.2, 0.5)
    assert de.find_checkpoints(tmp_path / "e")[0].step == 4  # the positional form
    with pytest.raises(TypeError, match="experiment_dir or checkpoint_dir"):
        de.find_checkpoints(tmp_path / "e", checkpoint_dir=tmp_path / "e")
    with pytest.raises(ValueError, match="'latest' or 'best'"):
        de.find_checkpoints(checkpoint_dir=tmp_path / "e", mode="last")


def test_callback_save_saves_now_with_the_current_metric(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="s", monitor="acc",
                            mode="max", save_every_n_steps=2, save_on_train_end=False,
                            **quiet())  # fmt: skip
    cb = de.CheckpointCallback(c)
    with pytest.raises(RuntimeError, match="on_train_start"):
        cb.save()
    app = make_app()
    cb.on_train_start(app)
    train_step(app)
    cb.on_step_end(1, app)
    cb._current_metric = torch.tensor(0.25)  # Dream Trainer keeps a scalar tensor here
    handle = cb.save()
    assert handle is not None and handle.result().step == 1
    cb.on_step_end(2, app)  # the step trigger saves step 2
    cb._current_metric = 0.75
    assert cb.save() is None  # step 2 is saved already: the metric goes to it
    cb.on_train_end(app)
    found = {i.step: i.metrics for i in de.find_checkpoints(tmp_path / "s")}
    assert found == {1: {"acc": 0.25}, 2: {"acc": 0.75}}
    off = de.CheckpointCallback(de.CheckpointConfig(root_dir=str(tmp_path), enabled=False))
    off.on_train_start(app)
    assert off.save() is None and not (tmp_path / "off").exists()


def test_super_gradients_keys_map_to_our_fields_or_are_refused_by_name():
    cfg = de.CheckpointConfig.from_dict({
        "metric_to_watch": "val_loss", "greater_metric_to_watch_is_better": False,
        "save_ckpt_epoch_list": [10, 15], "average_best_models": True,
        "checkpoint_path": "/w/ckpt_best.pth", "strict_load": "no_key_matching",
        "load_backbone": True, "pretrained_weights": None,
    })  # fmt: skip
    assert (cfg.monitor, cfg.mode, cfg.save_at_epochs) == ("val_loss", "min", (10, 15))
    assert cfg.average_best_models and cfg.init_weights == "/w/ckpt_best.pth"
    assert cfg.init_weights_strict == "shape" and cfg.init_weights_backbone_only
    assert de.CheckpointConfig.from_dict({"strict_load": False}).init_weights_strict is False
    assert de.CheckpointConfig.from_dict({"metric_to_watch": "Accuracy"}).mode == "max"
    both = de.CheckpointConfig.from_dict({"resume": True, "resume_path": None})
    assert both.resume == "latest"
    for block, message in (
        ({"pretrained_weights": "imagenet"}, r"pretrained_weights.*checkpoint_path"),
        ({"strict_load": "sometimes"}, r"strict_load='sometimes'.*no_key_matching"),
        ({"save_ckpt_epoch_list": [0]}, r"save_ckpt_epoch_list=\[0\]"),
        ({"average_best_models": True}, r"average_best_models.*monitor"),
        ({"run_id": "RUN_1", "experiment_name": "x"}, "one of 'run_id' and 'experiment_name'"),
        ({"run_id": "RUN_1", "resume_path": "/a/b"}, "run_id.*resume"),
    ):
        with pytest.raises((de.ConfigError, de.UnknownKeyError), match=message):
            de.CheckpointConfig.from_dict(block)


def test_save_ckpt_epoch_list_saves_those_epochs_and_retention_keeps_them(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", save_at_epochs=[1, 3],
                            save_every_n_epochs=2, keep_last_n=1, **quiet())  # fmt: skip
    run_loop(de.CheckpointCallback(c), make_app(), epochs=6, per_epoch=1)
    # epochs 1 and 3 (from the list) kept for good; 2, 4 (periodic) retired; 6: train end.
    assert steps_in(tmp_path / "e") == [1, 3, 6]
    with pytest.raises(de.ConfigError, match="save_at_epochs"):
        de.CheckpointConfig(save_at_epochs=[2, -1])


def test_average_best_models_averages_the_best_at_train_end(tmp_path):
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="avg", monitor="loss",
                            save_every_n_epochs=1, average_best_models=True,
                            **quiet())  # fmt: skip
    app = {"model": nn.Linear(2, 2), "head": nn.Linear(2, 1)}
    cb = de.CheckpointCallback(c)
    cb.on_train_start(app)
    for epoch, loss in enumerate((0.3, 0.1, 0.2)):
        with torch.no_grad():
            app["model"].weight.fill_(float(epoch))
            app["head"].weight.fill_(10.0 * epoch)
        cb.on_validation_end({"loss": loss})
        cb.on_epoch_end(epoch, app, step=epoch + 1)
    cb.on_train_end(app)
    average = torch.load(tmp_path / "avg" / "average_model.pth", weights_only=True)
    assert set(average) == {"model", "head"}  # every module of the checkpoint
    assert torch.allclose(average["model"]["weight"], torch.full((2, 2), 1.0))
    assert torch.allclose(average["head"]["weight"], torch.full((1, 2), 10.0))
    into = nn.Linear(2, 1)
    load_weights(into, tmp_path / "avg" / "average_model.pth", key="head")
    assert torch.allclose(into.weight, torch.full((1, 2), 10.0))


def test_init_weights_load_at_train_start_only_on_a_fresh_run(tmp_path):
    torch.manual_seed(0)
    src = nn.Module()
    src.backbone, src.head = nn.Linear(4, 4), nn.Linear(4, 5)
    torch.save({"net": src.state_dict()}, tmp_path / "pre.pth")
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="ft",
                            init_weights=str(tmp_path / "pre.pth"),
                            init_weights_backbone_only=True, save_every_n_steps=1,
                            **quiet())  # fmt: skip
    model = nn.Module()
    model.backbone, model.head = nn.Linear(4, 4), nn.Linear(4, 2)  # a new head
    head = model.head.weight.clone()
    cb = de.CheckpointCallback(c)
    cb.on_train_start({"model": model, "step": 0})
    assert same(model.backbone, src.backbone) and torch.equal(model.head.weight, head)
    with torch.no_grad():
        model.backbone.weight.add_(1.0)
    cb.on_step_end(1, {"model": model, "step": 0})
    cb.on_train_end({"model": model, "step": 0})
    # A resumed run keeps its trained weights: the initial ones are not loaded over them.
    resumed = nn.Module()
    resumed.backbone, resumed.head = nn.Linear(4, 4), nn.Linear(4, 2)
    again = de.CheckpointCallback(de.CheckpointConfig(**{**c.to_dict(), "resume": "latest"}))
    again.on_train_start({"model": resumed, "step": 0})
    again.close()
    assert same(resumed, model)
    two = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    cb = de.CheckpointCallback(de.CheckpointConfig(**{**c.to_dict(), "experiment_name": "two"}))
    with pytest.raises(de.ConfigError, match="init_weights_into"):
        cb.on_train_start(two)
    cb.close()
    named = de.CheckpointConfig(**{**c.to_dict(), "experiment_name": "named",
                                   "init_weights_into": "b"})  # fmt: skip
    cb = de.CheckpointCallback(named)
    cb.on_train_start(two)
    cb.close()
    assert same(two["b"], src.backbone)


def test_load_weights_prefers_ema_net_and_says_so(tmp_path, caplog):
    torch.manual_seed(0)
    net, ema = nn.Linear(3, 3), nn.Linear(3, 3)
    torch.save({"net": net.state_dict(), "ema_net": ema.state_dict(), "acc": 0.5, "epoch": 9},
               tmp_path / "ckpt_best.pth")  # fmt: skip
    model = nn.Linear(3, 3)
    with caplog.at_level("INFO", logger="dcp_engine"):
        load_weights(model, tmp_path / "ckpt_best.pth")
    assert same(model, ema) and "ema_net" in caplog.text
    load_weights(model, tmp_path / "ckpt_best.pth", key="net")
    assert same(model, net)
    # In a checkpoint of ours, an ema_net entry is preferred alike.
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="ema", **quiet())
    with de.CheckpointManager(c) as mgr:
        mgr.save(1, {"net": net, "ema_net": ema})
    load_weights(model, tmp_path / "ema")
    assert same(model, ema)


def test_save_and_load_checkpoint_live_in_the_package(tmp_path):
    import dcp_engine.dino as package
    from launch.dino import checkpoint as launched

    assert launched.save_checkpoint is package.save_checkpoint is de.save_checkpoint
    assert launched.load_checkpoint is package.load_checkpoint is de.load_checkpoint
    a = dino_state(0)
    info = de.save_checkpoint(tmp_path / "run", epoch=1, iteration=5, **a)
    b = dino_state(1)
    got = de.load_checkpoint(info.path, student=b["student"], loss_fn=b["loss_fn"])
    assert (got["epoch"], got["iteration"]) == (1, 5) and set(got) >= {
        "epoch", "iteration", "config", "metrics", "timestamp",
    }  # fmt: skip
    assert torch.equal(b["loss_fn"].center, a["loss_fn"].center)


def guide_experiment(root: Path, name: str = "exp", monitor: str | None = "loss") -> Path:
    """An experiment with steps 1..3 saved at the ends of epochs 0..2 (loss best at 2)."""
    c = de.CheckpointConfig(root_dir=str(root), experiment_name=name, monitor=monitor,
                            save_every_n_epochs=1, save_on_train_end=False,
                            **quiet())  # fmt: skip
    run_loop(de.CheckpointCallback(c), make_app(), epochs=3, per_epoch=1,
             val=[0.5, 0.1, 0.3], key="loss")  # fmt: skip
    return root / name


@pytest.mark.parametrize(
    "spelling, step",
    [
        ("checkpoint_latest.pth", 3), ("checkpoint_best.pth", 2), ("latest.pt", 3),
        ("best.pt", 2), ("ckpt_latest.pth", 3), ("ckpt_best.pth", 2),
        ("checkpoint_epoch_0001.pth", 2), ("epoch_0001.pt", 1), ("ckpt_epoch_3.pth", 3),
        ("checkpoint_step_2", 2),
    ],
)  # fmt: skip
def test_a_guides_file_name_resolves_to_our_alias_or_step(tmp_path, spelling, step):
    exp = guide_experiment(tmp_path / "root")
    want = layout.step_dirname(step)
    for where in (exp, exp / "checkpoints", tmp_path / "root"):  # the experiment: the only one
        assert resolve.follow(where / spelling).name == want, where
        assert resolve.checkpoint_dir_of(where / spelling).name == want
    with de.open_checkpoint(exp / "checkpoints" / spelling) as ck:
        assert ck.info.step == step
    model = nn.Linear(4, 3)
    load_weights(model, exp / spelling, key="model")
    c = de.CheckpointConfig(root_dir=str(tmp_path / "b"), experiment_name="b",
                            resume=str(exp / "checkpoints" / spelling), **quiet())  # fmt: skip
    with de.CheckpointManager(c) as mgr:
        assert mgr.resume(make_app(1)).step == step


def test_guide_file_names_in_the_cli_and_where_they_cannot_resolve(tmp_path, capsys):
    exp = guide_experiment(tmp_path / "root")
    assert cli.main(["inspect", str(exp / "checkpoints" / "checkpoint_best.pth")]) == 0
    assert "step_00000002" in capsys.readouterr().out
    assert cli.main(["verify", str(exp / "latest.pt")]) == 0
    capsys.readouterr()
    # A real file of that name wins.
    torch.save(nn.Linear(4, 3).state_dict(), exp / "best.pt")
    assert not resolve.follow(exp / "best.pt").name.startswith("step_")
    # A second experiment makes the root ambiguous; no monitor: no best; no such epoch.
    guide_experiment(tmp_path / "root", "other", monitor=None)
    with pytest.raises(de.CheckpointNotFoundError, match=r"several experiments.*exp.*other"):
        resolve.follow(tmp_path / "root" / "checkpoint_latest.pth")
    with pytest.raises(de.CheckpointNotFoundError, match=r"no best.*monitor"):
        resolve.follow(tmp_path / "root" / "other" / "checkpoint_best.pth")
    with pytest.raises(de.CheckpointNotFoundError, match=r"epoch 7.*epochs 0, 1, 2"):
        resolve.follow(exp / "checkpoint_epoch_0007.pth")
    with pytest.raises(de.CheckpointNotFoundError, match=r"nope\.pth does not exist"):
        resolve.follow(exp / "nope.pth")
    assert cli.main(["inspect", str(tmp_path / "root" / "ckpt_latest.pth")]) == 2
    assert "several experiments" in capsys.readouterr().err


def test_save_best_without_a_monitor_warns_naming_monitor():
    with pytest.warns(UserWarning, match=r"checkpoint\.save_best: true.*monitor: <metric>"):
        de.CheckpointConfig.from_dict({"enabled": True, "save_best": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        de.CheckpointConfig.from_dict({"save_best": True, "monitor": "acc"})
        de.CheckpointConfig.from_dict({"save_dir": "x"})  # save_best not written: no warning


def test_the_experiment_guides_defaults_apply_to_a_block_in_its_keys():
    """Its table: enabled false, save_frequency 10, save_best true, dir ./experiments. A
    block with other keys too (the DINO guide's, the engine's) keeps the engine's."""
    with pytest.warns(UserWarning, match="enabled: true"):
        cfg = de.CheckpointConfig.from_dict({"dir": "./runs"})
    assert cfg.enabled is False and cfg.save_every_n_epochs == 10 and cfg.save_best
    with pytest.warns(UserWarning, match="enabled"):
        empty = de.CheckpointConfig.from_dict({})
    assert empty.enabled is False and empty.root_dir == "./experiments"
    on = de.CheckpointConfig.from_dict({"enabled": True, "save_frequency": 3})
    assert on.enabled and on.save_every_n_epochs == 3
    mixed = de.CheckpointConfig.from_dict({"dir": "./runs", "save_every_n_steps": 5})
    assert mixed.enabled and mixed.save_every_n_epochs is None
    for path in ("launch/configs/dino_tiny.yaml", "launch/examples/checkpoint.yaml"):
        assert de.CheckpointConfig.from_yaml(Path(__file__).parents[1] / path).enabled, path


def test_backbone_prefix_is_stripped_into_a_bare_backbone(tmp_path):
    """The DINO port's item (3): the teacher (``backbone.*``, ``head.*``) of a checkpoint of
    ours into a bare backbone; and a bare backbone's file into a full model."""
    torch.manual_seed(0)
    teacher = nn.Module()
    teacher.backbone, teacher.head = nn.Linear(4, 4), nn.Linear(4, 8)
    c = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="dino", **quiet())
    with de.CheckpointManager(c) as mgr:
        mgr.save(1, {"teacher": teacher, "student": nn.Linear(2, 2)})
    ckpt = tmp_path / "dino" / "checkpoints" / "latest"
    backbone = nn.Linear(4, 4)
    result = load_weights(backbone, ckpt, key="teacher", backbone_only=True,
                          backbone_prefix="backbone.")  # fmt: skip
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert same(backbone, teacher.backbone)
    lenient = nn.Linear(4, 4)
    result = load_weights(lenient, ckpt, key="teacher", backbone_only=True, strict=False)
    assert result.missing_keys == [] and same(lenient, teacher.backbone)
    torch.save(teacher.backbone.state_dict(), tmp_path / "bare.pt")
    full = nn.Module()
    full.backbone, full.head = nn.Linear(4, 4), nn.Linear(4, 8)
    load_weights(full, tmp_path / "bare.pt", backbone_only=True)
    assert same(full.backbone, teacher.backbone)
    wrong = nn.Linear(4, 5)
    before = wrong.weight.clone()
    with pytest.raises(de.StateMismatchError, match="shape"):
        load_weights(wrong, ckpt, key="teacher", backbone_only=True)
    assert torch.equal(wrong.weight, before)


# ----------------------------------------------------------------------------- two ranks


@multirank(2)
def dream_on_two_ranks(rank: int, world_size: int, root: str) -> list[int]:
    """The guide's custom ``should_save`` (decided by rank 0), ``save()`` from another
    callback, and the train-end average, collective on two real ranks."""
    params = de.CheckpointParameters(root_dir=root, experiment_name="two", monitor="val_loss",
                                     save_every_n_epochs=1, average_best_models=True,
                                     **quiet())  # fmt: skip
    cb = FromOne(params)
    app = make_app(0)
    cb.on_train_start(app)
    step = 0
    # Each rank has its own loss; the decisions and the markers see their mean.
    losses = [(0.9, 0.895, 0.8), (0.9, 0.795, 0.8)][rank]  # means 0.9, 0.845, 0.8
    for epoch, loss in enumerate(losses):
        train_step(app)
        step += 1
        cb.on_step_end(step, app)
        cb.on_validation_end({"val_loss": loss})
        cb.on_epoch_end(epoch, app)
    train_step(app)
    cb.on_step_end(step + 1, app)
    cb._current_metric = 0.5
    cb.save()
    cb._current_metric = 0.3 + 0.2 * rank  # saved already: the mean, 0.4, goes to step 4
    cb.save()
    cb.on_train_end(app)  # step 4 is saved: no second save; then the average
    return [c.step for c in de.find_checkpoints(Path(root) / "two")]


@pytest.mark.slow
@pytest.mark.multirank
def test_dream_trainer_callbacks_on_two_ranks(tmp_path):
    got = dream_on_two_ranks.run(str(tmp_path))
    # Every mean improved by more than 1 % (rank 0's own 0.895 would not have).
    assert got == [[4, 3, 2, 1]] * 2
    info = {c.step: c for c in de.find_checkpoints(tmp_path / "two")}
    assert info[4].metrics["val_loss"] == pytest.approx(0.4)
    assert info[2].metrics["val_loss"] == pytest.approx(0.845)
    average = torch.load(tmp_path / "two" / "average_model.pth", weights_only=True)
    expected = {}
    for step in (4, 3, 2, 1):
        with de.open_checkpoint(tmp_path / "two", which=step) as ck:
            for k, v in ck.load_entries(["model"])["model"].items():
                expected[k] = expected.get(k, 0) + v / 4
    assert set(average) == {"model"}
    assert all(torch.allclose(average["model"][k], v) for k, v in expected.items())
