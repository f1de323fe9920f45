"""Hugging Face Accelerate's ``save_state``/``load_state`` through the engine, with the real
``accelerate`` package: one process in this one, two gloo ranks in spawned processes and
under ``torch.distributed.run``."""

from __future__ import annotations

import copy
import os
import random
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration

import dcp_engine as de
from dcp_engine.integrations.accelerate import DcpEngineAccelerator, engine_config
from tests.distributed import multirank

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "launch" / "examples" / "accelerate_example.py"


class Progress:
    """A ``register_for_checkpointing`` object."""

    def __init__(self) -> None:
        self.step, self.history = 0, [0.0]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = state["step"], list(state["history"])


@dataclass
class Run:
    acc: DcpEngineAccelerator
    model: Any
    opt: Any
    sched: Any
    loader: Any
    progress: Progress
    batches: Any = None

    def train(self, n: int) -> list[list[int]]:
        """n optimizer steps, the loader's epoch going on across calls; the indices seen."""
        seen = []
        for _ in range(n):
            if self.batches is None:
                self.batches = iter(self.loader)
            try:
                x, idx = next(self.batches)
            except StopIteration:
                self.batches = None
                continue
            with self.acc.accumulate(self.model):
                loss = (self.model(x).squeeze(1) - x.sum(1)).pow(2).mean()
                self.acc.backward(loss)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
            self.progress.step += 1
            self.progress.history.append(loss.item() + random.random() + float(np.random.rand()))
            seen.append(idx.tolist())
        return seen


def accelerator(project_dir: Path, *, total_limit: int | None = None, **config: Any):
    config.setdefault("async_mode", "off")
    return DcpEngineAccelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir), automatic_checkpoint_naming=True, total_limit=total_limit
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, use_stateful_dataloader=True
        ),
        checkpoint_config=de.CheckpointConfig(**config),
    )


def build(acc: DcpEngineAccelerator, seed: int = 0, width: int = 16) -> Run:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(123))  # the same data
    data = torch.utils.data.TensorDataset(x, torch.arange(40))
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    return Run(acc, model, opt, sched, loader, progress)


def snapshot(run: Run) -> dict[str, Any]:
    """Everything save_state promises to bring back, copied."""
    return copy.deepcopy(
        {
            "model": run.acc.unwrap_model(run.model).state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "loader": run.loader.state_dict(),
            "loader_epoch": run.loader.iteration,
            "progress": run.progress.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state()[1],
            "python_rng": random.getstate(),
            "step": run.acc.step,
        }
    )


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def checkpoint_steps(project_dir: Path) -> list[int]:
    return sorted(c.step for c in de.find_checkpoints(project_dir))


# ---------------------------------------------------------------- one process


def test_load_state_brings_back_everything_save_state_saved(tmp_path):
    run = build(accelerator(tmp_path / "run"))
    run.train(5)  # mid-epoch (10 batches an epoch)
    handle = run.acc.save_state()
    assert isinstance(handle, de.SaveHandle) and handle.result().step == 0
    saved = snapshot(run)
    reference = run.train(7)  # across the epoch's end
    after = snapshot(run)
    run.acc.checkpoint_manager.close()

    # A new accelerator and new objects (another seed): the state comes from the checkpoint.
    again = build(accelerator(tmp_path / "run"), seed=1)
    info = again.acc.load_state()
    assert info.step == 0 and again.acc.save_iteration == 1
    assert info.path == tmp_path / "run" / "checkpoints" / "step_00000000"
    assert_same(saved, snapshot(again))
    assert again.train(7) == reference  # the rest of the epoch, then the next one
    assert_same(after, snapshot(again))
    again.acc.save_state()  # follows the loaded checkpoint
    assert checkpoint_steps(tmp_path / "run") == [0, 1]
    again.acc.end_training()


def test_total_limit_2_after_4_saves_keeps_the_newest_2_and_load_state_takes_the_newest(tmp_path):
    project = tmp_path / "run"
    run = build(accelerator(project, total_limit=2, async_mode="thread"))
    handles = []
    for _ in range(4):
        run.train(1)
        handles.append(run.acc.save_state())
    assert [h.result().step for h in handles] == [0, 1, 2, 3]
    newest = snapshot(run)
    run.train(2)
    run.acc.checkpoint_manager.wait()
    assert checkpoint_steps(project) == [2, 3]
    assert sorted(p.name for p in (project / "checkpoints").glob("step_*")) == [
        "step_00000002",
        "step_00000003",
    ]
    assert run.acc.checkpoint_manager.config.keep_last_n == 2
    assert run.acc.load_state().step == 3  # no argument: the newest committed
    assert_same(newest, snapshot(run))
    assert run.acc.save_iteration == 4
    run.acc.end_training()


def test_a_missing_or_corrupt_checkpoint_is_a_clear_error_and_leaves_the_objects_untouched(
    tmp_path,
):
    project = tmp_path / "run"
    run = build(accelerator(project))
    with pytest.raises(de.CheckpointNotFoundError, match="no committed checkpoint"):
        run.acc.load_state()  # nothing saved yet
    run.train(2)
    run.acc.save_state()
    run.train(2)
    run.acc.save_state()
    run.train(3)
    before = snapshot(run)
    iteration = run.acc.save_iteration

    missing = project / "checkpoints" / "checkpoint_7"  # Accelerate's naming: not ours
    with pytest.raises(de.CheckpointError, match="checkpoint_7"):
        run.acc.load_state(str(missing))
    shard = next((project / "checkpoints" / "step_00000001").glob("__*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(de.IntegrityError, match="step_00000001"):
        run.acc.load_state(str(project / "checkpoints" / "step_00000001"))
    assert_same(before, snapshot(run))
    assert run.acc.save_iteration == iteration

    # latest goes past the corrupt newest (quarantined) to the one before it
    assert run.acc.load_state().step == 0
    assert (project / "checkpoints" / "step_00000001.corrupt").is_dir()
    run.acc.end_training()


def test_a_checkpoint_of_another_model_is_refused_naming_the_key(tmp_path):
    first = build(accelerator(tmp_path / "a"))
    first.train(1)
    first.acc.save_state()
    first.acc.end_training()
    other = build(accelerator(tmp_path / "b"), width=32)
    other.train(1)
    before = snapshot(other)
    with pytest.raises(de.StateMismatchError, match="'model'"):
        other.acc.load_state(str(tmp_path / "a" / "checkpoints" / "step_00000000"))
    assert_same(before, snapshot(other))
    other.acc.end_training()


def test_state_hooks_save_and_load_their_own_files_and_models(tmp_path):
    """diffusers' pattern: the save hook writes a model itself and removes its weights;
    the load hook reads it back and removes the model from the ones left to load."""
    run = build(accelerator(tmp_path / "run"))
    encoder = run.acc.prepare(torch.nn.Linear(3, 3).requires_grad_(False))  # no optimizer
    calls: list[str] = []

    def make_dir(models, weights, output_dir):
        os.makedirs(os.path.join(output_dir, "encoder"))

    def save_hook(models, weights, output_dir):
        calls.append(f"save {len(models)} {len(weights)}")
        i = next(i for i, m in enumerate(models) if m is encoder)
        torch.save(weights.pop(i), os.path.join(output_dir, "encoder", "weights.pt"))

    def load_hook(models, input_dir):
        calls.append(f"load {len(models)}")
        models.remove(encoder)
        encoder.load_state_dict(torch.load(os.path.join(input_dir, "encoder", "weights.pt")))

    run.acc.register_save_state_pre_hook(make_dir)
    run.acc.register_save_state_pre_hook(save_hook)
    run.acc.register_load_state_pre_hook(load_hook)
    run.train(3)
    run.acc.save_state()
    saved, saved_encoder = snapshot(run), copy.deepcopy(encoder.state_dict())
    with de.open_checkpoint(tmp_path / "run") as ck:
        assert "model" in ck.keys and "model_1" not in ck.keys  # the hook's, as a file
        files = ck.load_entries(["accelerate_files"])["accelerate_files"]
        assert list(files) == ["encoder/weights.pt"]
    run.train(3)
    with torch.no_grad():
        encoder.weight.add_(1.0)
    run.acc.load_state()
    assert calls == ["save 2 2", "load 2"]
    assert_same(saved, snapshot(run))
    assert_same(saved_encoder, encoder.state_dict())
    run.acc.end_training()


def test_the_example_stopped_and_resumed_ends_exactly_as_a_run_never_stopped(tmp_path, monkeypatch):
    def example(*args: str) -> dict[str, Any]:
        monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *args])
        runpy.run_path(str(EXAMPLE), run_name="__main__")
        return torch.load(f"{args[-1]}.rank0")

    whole = example("--project-dir", str(tmp_path / "a"), "--record", str(tmp_path / "a"))
    common = ("--project-dir", str(tmp_path / "b"), "--async-mode", "off")
    first = example(*common, "--stop-after", "10", "--record", str(tmp_path / "b1"))
    assert checkpoint_steps(tmp_path / "b") == [0, 1]  # saved at steps 4 and 8
    second = example(*common, "--resume", "--record", str(tmp_path / "b2"))
    assert whole["batches"] == first["batches"][:8] + second["batches"]
    for key in ("model", "optimizer", "scheduler", "rng", "step", "samples"):
        assert_same(whole[key], second[key], key)
    # total_limit=2, and the checkpoint the second run resumed from is kept
    assert checkpoint_steps(tmp_path / "a") == [4, 5]
    assert checkpoint_steps(tmp_path / "b") == [1, 4, 5]


# ---------------------------------------------------------------- the mapping


def test_project_dir_is_the_experiment_and_total_limit_is_keep_last_n(tmp_path):
    project = ProjectConfiguration(project_dir=str(tmp_path / "runs" / "exp1"), total_limit=3)
    cfg = engine_config(project, de.CheckpointConfig(async_mode="off", monitor="loss"))
    assert (cfg.root_dir, cfg.experiment_name) == (str(tmp_path / "runs"), "exp1")
    assert (cfg.keep_last_n, cfg.monitor) == (3, "loss")
    s3 = engine_config(ProjectConfiguration(project_dir="s3://bucket/runs/exp1"), None)
    assert (s3.root_dir, s3.experiment_name) == ("s3://bucket/runs", "exp1")
    # without project_dir the checkpoint_config decides
    alone = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="x")
    assert engine_config(ProjectConfiguration(), alone) == alone


@pytest.mark.parametrize(
    ("project", "config", "match"),
    [
        (
            dict(total_limit=2, project_dir="/a/b"),
            dict(keep_last_n=5),
            "keep_last_n=5 .*total_limit=2",
        ),
        (dict(total_limit=0, project_dir="/a/b"), {}, "total_limit=0"),
        (dict(project_dir="/a/b"), dict(root_dir="/c", experiment_name="d"), "project_dir"),
        (dict(project_dir="/a/b"), dict(resume="latest"), "load_state"),
        (dict(save_on_each_node=True), {}, "save_on_each_node"),
        ({}, {}, "needs its experiment directory"),
    ],
)
def test_conflicting_configurations_are_refused_naming_both(project, config, match):
    with pytest.raises(ValueError, match=match):
        engine_config(ProjectConfiguration(**project), de.CheckpointConfig(**config))


def test_an_fsdp_plugin_that_accelerate_ignores_on_cpu_is_reported(tmp_path, caplog):
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = DcpEngineAccelerator(
        cpu=True,
        project_dir=str(tmp_path / "run"),
        fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2),
        checkpoint_config=de.CheckpointConfig(async_mode="off"),
    )
    assert acc.distributed_type != DistributedType.FSDP
    assert "models are not sharded" in caplog.text
    acc.end_training()


def test_arguments_the_engine_cannot_honour_are_refused_by_name(tmp_path):
    acc = DcpEngineAccelerator(
        cpu=True,
        project_dir=str(tmp_path / "run"),  # without automatic_checkpoint_naming
        checkpoint_config=de.CheckpointConfig(async_mode="off"),
    )
    assert acc.checkpoint_manager.experiment_dir == tmp_path / "run"
    model = acc.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"names its checkpoints itself.*save_state\(\)"):
        acc.save_state(str(tmp_path / "step_10"))
    with pytest.raises(TypeError, match="exclude_frozen_parameters"):
        acc.save_state(exclude_frozen_parameters=True)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    acc.save_state(str(tmp_path / "run"))  # the experiment itself is fine
    with pytest.raises(TypeError, match="strict"):
        acc.load_state(strict=False)
    before = copy.deepcopy(model.state_dict())
    assert acc.load_state(str(tmp_path / "run"), map_location="cpu").step == 0
    assert_same(before, model.state_dict())
    acc.prepare(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"'optimizer' steps parameters of no model"):
        acc.save_state()
    acc.end_training()

    # a new job on the same experiment that does not load_state() first
    again = DcpEngineAccelerator(
        cpu=True,
        project_dir=str(tmp_path / "run"),
        checkpoint_config=de.CheckpointConfig(async_mode="off"),
    )
    again.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(de.TimelineError, match=r"step 0 is already committed.*load_state\(\)"):
        again.save_state()
    again.end_training()


# ---------------------------------------------------------------- two processes


@multirank(2)
def _two_ranks(rank: int, world_size: int, project: str) -> dict[str, Any]:
    """DDP through prepare(), FSDP2 (fully_shard) registered for checkpointing: save,
    then new objects load_state() and hold exactly what each rank had."""
    from torch.distributed.fsdp import fully_shard

    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)  # one node (torchrun sets it)

    def make() -> tuple[Run, Any, Any]:
        acc = accelerator(Path(project), total_limit=2, async_mode="thread")
        run = build(acc)
        torch.manual_seed(7)
        sharded = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 4))
        fully_shard(sharded)  # each rank holds half of every parameter
        opt2 = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
        opt2 = acc.prepare(opt2)
        acc.register_for_checkpointing(sharded)
        return run, sharded, opt2

    def local(sharded: Any, opt2: Any) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "params": {k: v.to_local() for k, v in sharded.state_dict().items()},
                "momentum": [
                    opt2.state[p]["momentum_buffer"].to_local() for p in sharded.parameters()
                ],
            }
        )

    run, sharded, opt2 = make()
    assert run.acc.distributed_type == DistributedType.MULTI_CPU and run.acc.num_processes == 2
    for _ in range(4):
        run.train(2)
        sharded(torch.randn(3, 8)).sum().backward()
        opt2.step()
        run.acc.save_state()
    saved, saved_sharded = snapshot(run), local(sharded, opt2)
    run.train(3)
    run.acc.checkpoint_manager.close()  # (end_training would destroy the process group)

    again, sharded2, opt2b = make()
    again.acc.load_state()
    assert again.acc.save_iteration == 4
    loaded = snapshot(again)
    progress = (saved.pop("progress"), loaded.pop("progress"))
    assert_same(saved, loaded)  # this rank's RNG, shards, ...
    assert_same(saved_sharded, local(sharded2, opt2b))
    again.acc.checkpoint_manager.close()
    newest = Path(project) / "checkpoints" / "step_00000003"
    shards = sorted(p.name for p in newest.glob("__*"))
    full = {k: v.full_tensor() for k, v in sharded2.state_dict().items()}
    return {
        "kept": checkpoint_steps(Path(project)),
        "shards": shards,
        "progress": progress,
        "model": loaded["model"],
        "sharded": full,
    }


@pytest.mark.slow
def test_two_gloo_ranks_save_every_shard_and_load_state_restores_each_rank_exactly(tmp_path):
    out = _two_ranks.run(str(tmp_path / "run"))
    assert out[0]["kept"] == out[1]["kept"] == [2, 3]  # total_limit=2 after 4 saves
    assert out[0]["shards"] == ["__0_0.raw", "__1_0.raw"]  # each rank wrote its own
    # a registered object's state is rank 0's on every rank (as Accelerate saves it)
    rank0_saved = out[0]["progress"][0]
    assert out[1]["progress"][0] != rank0_saved
    assert out[0]["progress"][1] == out[1]["progress"][1] == rank0_saved

    # the same checkpoint in one process: the FSDP2 shards come back as whole tensors
    one = accelerator(tmp_path / "run")
    run = build(one)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 4))
    one.prepare(torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9))
    one.register_for_checkpointing(plain)
    assert one.load_state().step == 3
    assert_same(out[0]["model"], one.unwrap_model(run.model).state_dict())
    assert_same(out[0]["sharded"], plain.state_dict())
    assert run.progress.state_dict() == rank0_saved
    one.end_training()


@pytest.mark.slow
def test_the_example_under_torchrun_on_two_processes_resumes_what_it_saved(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    project = str(tmp_path / "run")

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(EXAMPLE), "--project-dir", project, *args]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    # stops right after its save at step 8; the second run loads it and trains no further
    torchrun("--stop-after", "8", "--record", str(tmp_path / "saved"))
    torchrun("--steps", "8", "--resume", "--record", str(tmp_path / "loaded"))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"saved.rank{rank}")
        loaded = torch.load(tmp_path / f"loaded.rank{rank}")
        assert loaded["batches"] == []
        for key in ("model", "optimizer", "scheduler", "rng", "step", "samples"):
            assert_same(saved[key], loaded[key], f"rank {rank} {key}")
    assert checkpoint_steps(Path(project)) == [0, 1]
