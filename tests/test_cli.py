"""The ``dcp-engine`` command end to end (subprocess) on a checkpoint written by 2 ranks,
and ``load_weights`` into models that are not quite the same."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dcp_engine as de
from dcp_engine.weights import load_weights
from tests import toy
from tests.distributed import multirank

pytestmark = pytest.mark.multirank


@multirank(2)
def teacher_student_experiment(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """3 checkpoints of a 2-rank FSDP2 DINO-like state (student, teacher, optimizer,
    centre) with val_loss 0.5, 0.3, 0.4; the teacher's full state at each step (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    student = toy.wrap(toy.make_model(1), "fsdp")
    teacher = toy.wrap(toy.make_model(2), "fsdp")
    optim = torch.optim.AdamW(student.parameters(), lr=1e-2)
    app = {"student": student, "teacher": teacher, "optim": optim, "center": torch.zeros(4)}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="dino", async_mode="thread", monitor="val_loss"
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    teachers = {}
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in ((1, 0.5), (2, 0.3), (3, 0.4)):
            toy.train({"model": student, "optim": optim, "sched": _NoSched(),
                       "center": app["center"]}, 1, rank, start=step)  # fmt: skip
            with torch.no_grad():
                for p in teacher.parameters():
                    p.mul_(0.5).add_(float(step))
            mgr.save(step, app, epoch=0, metrics={"val_loss": loss})
            full = get_model_state_dict(teacher, options=options)
            teachers[step] = {k: v.clone() for k, v in full.items()}
        mgr.wait()
    return {"teachers": teachers if rank == 0 else None}


class _NoSched:
    def step(self) -> None:
        pass


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(experiment dir, {step: the teacher's full state}) from a 2-rank FSDP2 run."""
    root = tmp_path_factory.mktemp("cli")
    out = teacher_student_experiment.run(str(root))
    return root / "dino", out[0]["teachers"]


@pytest.fixture
def exp(written, tmp_path):
    """A private copy of the experiment (tests may corrupt or collect it)."""
    copy = tmp_path / "dino"
    shutil.copytree(written[0], copy, symlinks=True)
    return copy


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dcp_engine", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_entry_point_is_installed():
    exe = shutil.which("dcp-engine", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))  # fmt: skip
    assert exe is not None, "pip install -e . installs the dcp-engine command"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "verify" in proc.stdout


def test_help_and_version_answer_without_importing_torch_and_name_every_argument():
    code = ("import sys; from dcp_engine import cli; cli._parser(); "
            "print('torch' in sys.modules)")  # fmt: skip
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("dcp-engine ")
    for command in ("ls", "inspect", "verify", "export", "gc", "average", "adopt"):
        helped = cli(command, "--help")
        positional, options = helped.stdout.split("positional arguments:")[1].split("options:")
        lines = [ln for ln in positional.splitlines() if ln.strip()]
        # every positional argument has its line of help, not its bare name
        assert lines and all(len(ln.split()) > 1 or ln.startswith("    ") for ln in lines), (
            command, positional,
        )  # fmt: skip
        # every option too: text after its flags, or an indented line of help below them
        entries = [e.rstrip() for e in re.split(r"\n(?=  -)", "\n" + options)[1:]]
        bare = [e for e in entries if len(re.split(r"\s{2,}", e.strip())) < 2 and "\n" not in e]
        assert entries and not bare, (command, bare)


def test_ls_lists_steps_metrics_aliases_and_marks_torn_ones(exp):
    (exp / "checkpoints" / "step_00000009.tmp").mkdir()
    (exp / "checkpoints" / "step_00000008").mkdir()  # no marker
    proc = cli("ls", exp)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("2 ") and "val_loss=0.3" in ln and ln.endswith("best") for ln in lines)
    assert any(ln.startswith("3 ") and ln.endswith("latest") for ln in lines)
    assert any(ln.startswith("8 ") and "TORN" in ln for ln in lines)
    assert any(ln.startswith("9 ") and "TORN" in ln for ln in lines)
    rows = json.loads(cli("ls", exp.parent, "--json").stdout)
    committed = [r for r in rows if not r["torn"]]
    assert [r["step"] for r in committed] == [1, 2, 3]
    assert committed[1]["aliases"] == ["best"] and committed[0]["metrics"] == {"val_loss": 0.5}


def test_inspect_shows_keys_world_size_and_tensors(exp):
    proc = cli("inspect", exp / "checkpoints" / "step_00000002", "--tensors")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "saved by    2 rank(s)" in out and "DCP metadata version" in out
    assert any(ln.split()[:3] == ["teacher", "module", "6"] for ln in out.splitlines())
    assert any(ln.split()[:2] == ["optim", "optimizer"] for ln in out.splitlines())
    assert any(ln.split() == ["teacher.0.weight", "16x8", "float32"] for ln in out.splitlines())


def test_verify_passes_then_names_a_flipped_byte(exp):
    ok = cli("verify", exp)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("OK ") == 3 and "by digest" in ok.stdout
    shard = sorted((exp / "checkpoints" / "step_00000002").glob("*.raw"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = cli("verify", exp)
    assert bad.returncode == 1
    assert f"BAD  {shard}" in bad.stdout.replace(str(shard.resolve()), str(shard))
    assert "crc32" in bad.stdout and bad.stdout.count("OK ") == 2
    assert cli("verify", exp / "checkpoints" / "step_00000001").returncode == 0


def test_export_teacher_loads_into_a_plain_model(exp, written, tmp_path):
    teachers = written[1]
    out = tmp_path / "teacher.pt"
    proc = cli("export", exp / "checkpoints" / "best", out, "--key", "teacher")
    assert proc.returncode == 0, proc.stderr
    model = toy.make_model(99)
    model.load_state_dict(torch.load(out, weights_only=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, teachers[2][k]), k
    half = tmp_path / "teacher_bf16.pt"
    assert cli("export", exp, half, "--key", "teacher", "--dtype", "bf16").returncode == 0
    sd = torch.load(half, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["0.weight"], teachers[3]["0.weight"].to(torch.bfloat16))
    whole = tmp_path / "all.pt"
    assert cli("export", exp, whole).returncode == 0
    everything = torch.load(whole, weights_only=False)
    assert set(everything) == {"student", "teacher", "optim", "center"}
    # the FSDP2 AdamW of 2 ranks: int ids, whole moments, what load_state_dict takes
    fresh = torch.optim.AdamW(toy.make_model(5).parameters(), lr=1.0)
    fresh.load_state_dict(everything["optim"])
    assert len(fresh.state) == 6 and fresh.param_groups[0]["lr"] == 1e-2
    assert all(s["exp_avg"].shape == p.shape for p, s in fresh.state.items())


def test_the_cli_page_renders_without_an_escaped_pipe():
    import markdown

    page = Path(__file__).parents[1] / "docs" / "cli.md"
    html = markdown.markdown(page.read_text(), extensions=["tables", "fenced_code", "toc"])
    assert "\\|" not in html and "<table>" in html


def test_average_of_three_equals_the_hand_computed_mean(exp, written, tmp_path):
    teachers = written[1]
    out = tmp_path / "average_model.pth"
    proc = cli("average", exp, out, "--top-k", "3", "--key", "teacher")
    assert proc.returncode == 0, proc.stderr
    assert "steps [2, 3, 1]" in proc.stdout
    avg = torch.load(out, weights_only=True)
    for k in teachers[1]:
        expected = (teachers[1][k].double() + teachers[2][k].double() + teachers[3][k].double()) / 3
        torch.testing.assert_close(avg[k], expected.float(), rtol=0, atol=1e-6)
    two = tmp_path / "top2.pth"
    assert "steps [2, 3]" in cli("average", exp, two, "--top-k", "2", "--key", "teacher").stdout


def test_gc_dry_run_then_for_real_keeps_newest_and_best(exp):
    dry = cli("gc", exp, "--keep-last-n", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout and "step_00000001" in dry.stdout
    assert len(list((exp / "checkpoints").glob("step_*"))) == 3
    real = cli("gc", exp, "--keep-last-n", "1")
    assert real.returncode == 0, real.stderr
    assert sorted(p.name for p in (exp / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000003"
    ]  # fmt: skip
    assert [c.step for c in de.find_checkpoints(exp)] == [3, 2]
    index = json.loads((exp / "index.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/no/such/path"], "does not exist"),
        (["verify", "/no/such/path"], "does not exist"),
        (["export", "{tmp}", "{tmp}/x.pt"], "not a committed checkpoint"),
        (["export", "{exp}", "{tmp}/x.pt", "--key", "nope"], "no key 'nope'"),
        (["inspect", "{exp}/checkpoints/step_00000009.tmp"], "in flight or torn"),
        (["gc", "{exp}"], "no retention policy"),
        (["ls", "{tmp}/empty"], "neither an experiment"),
    ],
)
def test_errors_are_one_line_and_no_traceback(exp, tmp_path, args, message):
    (exp / "checkpoints" / "step_00000009.tmp").mkdir()
    (tmp_path / "empty").mkdir()
    proc = cli(*[a.format(tmp=tmp_path, exp=exp) for a in args])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- load_weights


class SGNet(nn.Module):
    """The two models of the SuperGradients guide: ``conv2`` vs ``CONV2 = Sequential(conv)``."""

    def __init__(self, upper: bool, out: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        if upper:
            self.CONV2 = nn.Sequential(nn.Conv2d(6, out, 5))
        else:
            self.conv2 = nn.Conv2d(6, out, 5)


@pytest.mark.parametrize("upper_from", [False, True])
def test_strict_shape_loads_all_weights_across_the_sg_models(tmp_path, upper_from):
    torch.manual_seed(0)
    src, dst = SGNet(upper_from), SGNet(not upper_from)
    path = tmp_path / "ckpt.pth"
    torch.save({"net": src.state_dict(), "epoch": 3}, path)
    with pytest.raises(de.StateMismatchError, match="strict load refused"):
        load_weights(dst, path)
    partial = load_weights(dst, path, strict=False)
    assert len(partial.missing_keys) == 2 and len(partial.unexpected_keys) == 2
    result = load_weights(dst, path, strict="shape")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_strict_shape_refuses_a_shape_mismatch_and_leaves_the_model(tmp_path):
    src, dst = SGNet(False, out=16), SGNet(True, out=8)
    path = tmp_path / "ckpt.pth"
    torch.save(src.state_dict(), path)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(de.StateMismatchError, match="strict='shape' refused"):
        load_weights(dst, path, strict="shape")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_weights_from_a_checkpoint_key_and_through_wrapper_prefixes(exp, written, tmp_path):
    teachers = written[1]
    model = toy.make_model(7)
    load_weights(model, exp / "checkpoints" / "best", key="teacher")
    for k, v in model.state_dict().items():
        assert torch.equal(v, teachers[2][k])
    # A DDP-style file ("module." prefixes) in a "model_state_dict" dict (the experiment
    # guide's format) into a torch.compile-style wrapper ("_orig_mod.").
    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in teachers[3].items()}}, path)
    wrapper = nn.Module()
    wrapper._orig_mod = toy.make_model(8)
    load_weights(wrapper, path)
    for k, v in wrapper._orig_mod.state_dict().items():
        assert torch.equal(v, teachers[3][k])


def test_backbone_only_loads_the_prefix_the_caller_names(tmp_path):
    torch.manual_seed(0)
    src = nn.Module()
    src.backbone, src.head = nn.Linear(4, 4), nn.Linear(4, 10)
    dst = nn.Module()
    dst.backbone, dst.head = nn.Linear(4, 4), nn.Linear(4, 3)  # another head
    head_before = dst.head.weight.clone()
    path = tmp_path / "simple.pt"
    torch.save(src.state_dict(), path)  # Mammoth's "simple .pt"
    result = load_weights(dst, path, backbone_only=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dst.backbone.weight, src.backbone.weight)
    assert torch.equal(dst.head.weight, head_before)
