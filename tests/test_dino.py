"""The DINO client's pieces in one process: the model, the loss and its centre, the
schedules, the config overrides, and save_checkpoint/load_checkpoint with the guide's
names (real files, the manager without a process group)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

from dino import DINOLoss, DinoModel, load_checkpoint, save_checkpoint  # noqa: E402
from dino.config import load_config, parse_args  # noqa: E402
from dino.model import params_groups  # noqa: E402
from dino.schedules import cosine_scheduler  # noqa: E402

from tests import toy  # noqa: E402

CONFIG = load_config(REPO / "launch/configs/dino_tiny.yaml")


def small_config() -> dict:
    cfg = load_config(REPO / "launch/configs/dino_tiny.yaml")
    cfg["model"].update(embed_dim=48, depth=2, num_heads=3, out_dim=64, hidden_dim=32,
                        bottleneck_dim=16)  # fmt: skip
    return cfg


def crops(batch: int = 2, local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(local)
    ]


def test_the_tiny_model_has_the_issues_shape_and_runs_every_crop():
    """Pass: patch 8, dim 192, depth 4 on 32x32; the multi-crop wrapper returns one
    projection per crop and image, the features of the backbone on request; the last
    layer's norm is frozen and left out of the optimizer."""
    torch.manual_seed(0)
    model = DinoModel.from_config(CONFIG)
    assert model.backbone.patch_embed.kernel_size == (8, 8)
    assert model.backbone.embed_dim == 192 and len(model.backbone.blocks) == 4
    out = model(crops(2, 4))
    assert out.shape == (12, 1024)
    feats, proj = model(crops(3, 0)[0], return_backbone_features=True)
    assert feats.shape == (3, 192) and proj.shape == (3, 1024)
    assert not model.head.last_layer.weight_g.requires_grad
    grouped = {id(p) for g in params_groups(model) for p in g["params"]}
    assert id(model.head.last_layer.weight_g) not in grouped
    assert id(model.head.last_layer.weight_v) in grouped
    assert all(p.ndim > 1 for p in params_groups(model)[0]["params"])  # decay: matrices


def test_weight_norm_last_layer_equals_torchs_weight_norm():
    torch.manual_seed(0)
    model = DinoModel.from_config(small_config())
    layer = model.head.last_layer
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 64, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(layer.weight_g)
        ref.parametrizations.weight.original1.copy_(layer.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), ref(x))


def reference_dino_loss(student, teacher, center, t_temp, s_temp, ncrops, batch) -> float:
    """The DINO loss written out sample by sample: cross-entropy of the centred, sharpened
    teacher on each global crop against the student on every other crop."""
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            for b in range(batch):
                q = torch.softmax((teacher[iq * batch + b] - center[0]) / t_temp, dim=0)
                log_p = torch.log_softmax(student[v * batch + b] / s_temp, dim=0)
                total += float(-(q * log_p).sum()) / batch
            pairs += 1
    return total / pairs


def test_dino_loss_matches_the_written_out_loss_and_updates_its_centre():
    loss_fn = DINOLoss(8, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=3, nepochs=5)  # fmt: skip
    assert [round(loss_fn.teacher_temp(e), 3) for e in range(7)] == [
        0.04, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 8, generator=g)  # 2 global crops x 3 images
    student = torch.randn(12, 8, generator=g, requires_grad=True)  # 4 crops x 3 images
    center = torch.randn(1, 8, generator=g)
    loss_fn.center.copy_(center)
    loss = loss_fn(student, teacher, epoch=1)  # teacher temperature 0.055
    expected = reference_dino_loss(student.detach(), teacher, center, 0.055, 0.1, 4, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad is not None
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))
    assert "center" in loss_fn.state_dict()


def test_cosine_schedule_warms_up_then_decays_to_its_final_value():
    s = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(s) == 20 and s[0] == 0.0 and s[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(s[4:]))
    assert s[-1] == pytest.approx(0.1, abs=0.01)


def test_overrides_set_named_and_dotted_keys_and_refuse_typos(capsys):
    cfg, _ = parse_args(["--max-steps", "7", "--strategy", "ddp", "--checkpoint.dir", "/x",
                            "--checkpoint.resume", "latest", "--train.lr=0.1",
                            "--data.global_crops_scale", "[0.5, 1.0]", "--seed", "3"])  # fmt: skip
    assert cfg["train"]["max_steps"] == 7 and cfg["strategy"] == "ddp" and cfg["seed"] == 3
    assert cfg["checkpoint"]["dir"] == "/x" and cfg["checkpoint"]["resume"] == "latest"
    assert cfg["train"]["lr"] == 0.1 and cfg["data"]["global_crops_scale"] == [0.5, 1.0]
    assert parse_args(["--checkpoint.keep_top_k", "3"])[0]["checkpoint"]["keep_top_k"] == 3
    off = parse_args(["--checkpoint.async_mode", "off", "--checkpoint.experiment_name", "no"])[0]
    assert off["checkpoint"]["async_mode"] == "off" and off["checkpoint"]["experiment_name"] == "no"
    # a field's other spelling replaces the file's (dir -> root_dir, save_frequency -> ...)
    ck = parse_args(["--checkpoint.root_dir", "/y", "--checkpoint.save_every_n_epochs", "2"])[0]
    assert ck["checkpoint"]["root_dir"] == "/y" and "dir" not in ck["checkpoint"]
    assert ck["checkpoint"]["save_every_n_epochs"] == 2 and "save_frequency" not in ck["checkpoint"]
    with pytest.raises(SystemExit, match=r"--train\.lrr: the config has no key 'train\.lrr'; "
                                         r"did you mean 'train\.lr'"):  # fmt: skip
        parse_args(["--train.lrr", "1"])
    with pytest.raises(SystemExit, match=r"checkpoint\.save_evry_n_steps"):
        parse_args(["--checkpoint.save_evry_n_steps", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--train.lr"])  # no value
    assert "needs a value" in capsys.readouterr().err


def _dino_state(seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = small_config()
    student, teacher = DinoModel.from_config(cfg), DinoModel.from_config(cfg)
    optimizer = torch.optim.AdamW(params_groups(student), lr=1e-3)
    loss_fn = DINOLoss(64, 4, 0.04, 0.07, 2, 4)
    return {"student": student, "teacher": teacher, "optimizer": optimizer, "loss_fn": loss_fn}


def test_save_and_load_checkpoint_with_the_guides_names(tmp_path):
    """Pass: the guide's save_checkpoint/load_checkpoint round-trip student, teacher,
    optimizer and the loss centre bit for bit, return epoch, iteration, config, metrics and
    timestamp, and load through an alias or the experiment; a bad path names itself."""
    a = _dino_state(0)
    loss = a["loss_fn"](a["student"](crops(2, 2)), a["teacher"](crops(2, 0)), epoch=0)
    loss.backward()
    a["optimizer"].step()
    info = save_checkpoint(tmp_path / "exp", epoch=3, iteration=120, **a,
                           config={"lr": 1e-3}, metrics={"loss": 2.5})  # fmt: skip
    assert info.path.name == "step_00000120"
    b = _dino_state(1)
    for source in (info.path, tmp_path / "exp/checkpoints/latest", tmp_path / "exp"):
        got = load_checkpoint(source, **b)
        assert (got["epoch"], got["iteration"], got["config"]) == (3, 120, {"lr": 1e-3})
        assert got["metrics"] == {"loss": 2.5} and got["timestamp"].startswith("20")
        assert got["epoch_done"] is True  # the guide's epoch: the one completed
    for key in ("student", "teacher", "loss_fn"):
        toy.assert_equal(a[key].state_dict(), b[key].state_dict())
    toy.assert_equal(a["optimizer"].state_dict()["state"], b["optimizer"].state_dict()["state"])
    with pytest.raises(Exception, match=str(tmp_path / "nope")):
        load_checkpoint(tmp_path / "nope", student=b["student"])
    with pytest.raises(ValueError, match="pass student= too"):
        load_checkpoint(info.path, optimizer=b["optimizer"])
