"""torchtitan: its ``[checkpoint]`` keys with their meanings, the engine features they
need (a given step, keys left out of a load, an initial load, a model-only final save in
a dtype), and a checkpoint manager with torchtitan's interface (2 gloo ranks, FSDP2)."""

from __future__ import annotations

import copy
import functools
import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchdata.stateful_dataloader import StatefulDataLoader

import dcp_engine as de
from dcp_engine import cli, layout
from dcp_engine.config_torchtitan import UNSUPPORTED
from dcp_engine.integrations.torchtitan import CheckpointManager
from dcp_engine.marker import Marker
from tests import toy
from tests.distributed import multirank
from tests.test_adopt import CrossDevice, FullDisk
from tests.toy import full_state, make_model, wrap

C = de.CheckpointConfig

# ---------------------------------------------------------------- the keys


def test_every_torchtitan_key_is_accepted_with_its_torchtitan_meaning(tmp_path):
    cfg = C.from_dict(
        {
            "enable_checkpoint": True,
            "folder": "checkpoint",
            "interval": 10,
            "keep_latest_k": 3,
            "async_mode": "async_with_pinned_mem",
            "load_step": 20,
            "export_dtype": "bfloat16",
            "exclude_from_loading": ["dataloader", "lr_scheduler"],
            "last_save_model_only": True,
            "initial_load_path": str(tmp_path / "pretrained"),
        },
        base_folder=str(tmp_path / "outputs"),
    )
    assert cfg.enabled and cfg.save_every_n_steps == 10 and cfg.keep_last_n == 3
    assert (cfg.root_dir, cfg.experiment_name) == (str(tmp_path / "outputs"), "checkpoint")
    assert cfg.async_mode == "process" and cfg.resume_step == 20
    assert cfg.last_save_only == ("model",) and cfg.export_dtype == "bfloat16"
    assert cfg.exclude_from_loading == ("dataloader", "lr_scheduler")
    # the initial load: a branch from that path, only its model (torchtitan's default)
    assert cfg.resume == str(tmp_path / "pretrained") and cfg.initial_load_only == ("model",)
    assert C.from_dict({"enable": False}).enabled is False  # torchtitan 0.2+ spelling


def test_keep_latest_k_zero_keeps_all_and_load_step_minus_one_is_the_newest():
    cfg = C.from_dict({"folder": "ckpt", "keep_latest_k": 0, "load_step": -1})
    assert cfg.keep_last_n is None and cfg.retention.keep_last_n is None
    assert cfg.resume == "latest" and cfg.resume_step is None
    assert C.from_dict({"keep_latest_k": 1}).keep_last_n == 1  # commits are atomic here


@pytest.mark.parametrize(
    "theirs, ours", [("disabled", "off"), ("async", "thread"), ("async_with_pinned_mem", "process")]
)
def test_async_modes_of_torchtitan(theirs, ours):
    assert C.from_dict({"async_mode": theirs}).async_mode == ours


def test_folder_is_the_experiment_directory_relative_to_the_dump_folder(tmp_path):
    cfg = C.from_dict({"folder": "checkpoint"})
    assert (cfg.root_dir, cfg.experiment_name) == ("experiments", "checkpoint")  # under root_dir
    assert cfg.resume == "latest"
    cfg = C.from_dict({"folder": "ckpt/llama3_8b/"}, base_folder="./outputs")
    assert (cfg.root_dir, cfg.experiment_name) == ("outputs/ckpt", "llama3_8b")
    cfg = C.from_dict({"root_dir": str(tmp_path), "folder": "c"}, base_folder="ignored")
    assert (cfg.root_dir, cfg.experiment_name) == (str(tmp_path), "c")
    cfg = C.from_dict({"folder": "/mnt/ckpt/run1"}, base_folder="./outputs")
    assert (cfg.root_dir, cfg.experiment_name) == ("/mnt/ckpt", "run1")
    cfg = C.from_dict({"folder": "c"}, base_folder="memory://bucket/outputs")
    assert (cfg.root_dir, cfg.experiment_name) == ("memory://bucket/outputs", "c")
    assert C.from_dict({"folder": "c", "resume": None}).resume is None  # said explicitly
    with pytest.raises(de.ConfigError, match=r"checkpoint\.folder='\.' is invalid"):
        C.from_dict({"folder": "."})
    with pytest.raises(de.ConfigError, match="one of 'folder' and 'experiment_name'"):
        C.from_dict({"folder": "a", "experiment_name": "b"})


def test_initial_load_path_needs_a_folder_and_loads_the_model_only_by_default():
    cfg = C.from_dict({"folder": "f", "initial_load_path": "/p", "initial_load_model_only": False})
    assert cfg.resume == "/p" and cfg.initial_load_only is None
    cfg = C.from_dict({"folder": "f", "initial_load_path": None, "initial_load_model_only": True})
    assert cfg.resume == "latest" and cfg.initial_load_only is None  # no effect without a path
    with pytest.raises(de.ConfigError, match=r"initial_load_path='/p' .*folder"):
        C.from_dict({"initial_load_path": "/p"})


def test_export_dtype_applies_to_a_model_only_final_save():
    cfg = C.from_dict({"last_save_model_only": False, "export_dtype": "float16"})
    assert cfg.last_save_only is None and cfg.export_dtype is None  # ignored, as in torchtitan
    with pytest.raises(de.ConfigError, match=r"export_dtype='bfloat16' .*model-only final save"):
        C.from_dict({"export_dtype": "bfloat16"})
    with pytest.raises(de.ConfigError, match=r"checkpoint\.export_dtype='int8'"):
        C.from_dict({"last_save_model_only": True, "export_dtype": "int8"})


@pytest.mark.parametrize(
    "block, message",
    [
        ({"interval": "often"}, r"checkpoint\.interval='often'"),
        ({"keep_latest_k": -1}, r"checkpoint\.keep_latest_k=-1 .*>= 0"),
        ({"load_step": -2}, r"checkpoint\.load_step=-2"),
        ({"async_mode": "sometimes"}, r"checkpoint\.async_mode='sometimes'"),
        ({"exclude_from_loading": 3}, r"checkpoint\.exclude_from_loading=3"),
        ({"last_save_model_only": "yes"}, r"checkpoint\.last_save_model_only='yes'"),
        ({"enable": "yes"}, r"checkpoint\.enable='yes'"),
    ],
)
def test_a_bad_torchtitan_value_names_the_key_as_written(block, message):
    with pytest.raises(de.ConfigError, match=message):
        C.from_dict(block)


@pytest.mark.parametrize(
    "key, hint",
    [
        ("fodler", "; did you mean 'folder'\\?$"),
        ("Keep-Latest-K", "; did you mean 'keep_latest_k'\\?$"),
        ("save_frequncy", "; did you mean 'save_frequency'\\?$"),
        ("save_total_limit", "; that is Hugging Face Trainer's key; ours is keep_last_n$"),
        ("dirpath", "; that is Lightning's ModelCheckpoint's key; ours is root_dir$"),
        ("max_to_keep", "; that is Orbax's key; ours is keep_last_n$"),
        ("folders_root", "$"),  # no sure guess: no guess
        ("experiment", "$"),
        ("zzz", "$"),
    ],
)
def test_an_unknown_key_gets_a_suggestion_only_when_it_is_certain(key, hint):
    with pytest.raises(de.UnknownKeyError, match=f"unknown key '{key}' in checkpoint{hint}"):
        C.from_dict({key: 1})


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_an_unsupported_torchtitan_key_is_refused_saying_why(key):
    with pytest.raises(de.UnsupportedKeyError, match=rf"checkpoint\.{key}=True is not supported: "):
        C.from_dict({key: True})
    why = UNSUPPORTED[key][1]
    assert "torchtitan" in why
    for off in UNSUPPORTED[key][0]:  # the value that turns the feature off asks for nothing
        assert C.from_dict({key: off}) == C()


def test_from_toml_reads_a_torchtitan_job_file_verbatim(tmp_path):
    path = tmp_path / "llama3_debug.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [job]
            dump_folder = "{tmp_path}/outputs"
            description = "Llama 3 debug training"

            [training]
            steps = 10

            [checkpoint]
            enable = true
            folder = "checkpoint"
            interval = 10
            last_save_model_only = false
            export_dtype = "float32"
            async_mode = "disabled"  # ["disabled", "async", "async_with_pinned_mem"]
            """
        )
    )
    cfg = C.from_toml(path)
    assert cfg.enabled and cfg.async_mode == "off" and cfg.save_every_n_steps == 10
    assert (cfg.root_dir, cfg.experiment_name) == (f"{tmp_path}/outputs", "checkpoint")
    assert cfg.keep_last_n == 10 and cfg.last_save_only is None  # torchtitan's default k
    bare = tmp_path / "bare.toml"
    bare.write_text("[job]\ndescription = 'no checkpoint table'\n")
    cfg = C.from_toml(bare)  # torchtitan's defaults: disabled, a model-only final save
    assert not cfg.enabled and cfg.root_dir == "torchtitan/outputs"
    assert (cfg.save_every_n_steps, cfg.last_save_only, cfg.export_dtype) == (
        500, ("model",), "float32",
    )  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text("[checkpoint]\nfolder = 'x'\nkeep_latest = 3\n")
    with pytest.raises(de.UnknownKeyError, match=r"bad\.toml: checkpoint; did you mean"):
        C.from_toml(bad)


def test_from_yaml_takes_torchtitan_keys_too(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("checkpoint:\n  enable: true\n  folder: runs/a\n  async_mode: async\n")
    cfg = C.from_yaml(path)
    assert (cfg.root_dir, cfg.experiment_name) == ("experiments/runs", "a")  # under root_dir
    assert cfg.async_mode == "thread"


# ---------------------------------------------------------------- the engine features


def _app(seed: int) -> dict[str, Any]:
    model = make_model(seed, hidden=8)
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=0.1),
            "center": torch.zeros(3), "epochs": 0}  # fmt: skip


def _train(app: dict[str, Any], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    app["model"](torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    app["optim"].step()
    app["optim"].zero_grad()
    app["center"] += step


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cfg(root: Path, **kw: Any) -> de.CheckpointConfig:
    return C(root_dir=str(root), experiment_name="exp", async_mode="off", **kw)


def _run(root: Path, steps: range, **kw: Any) -> dict[int, dict[str, torch.Tensor]]:
    """Saves every step; the model's weights at each step."""
    app, seen = _app(0), {}
    with de.CheckpointManager(_cfg(root, **kw)) as mgr:
        for step in steps:
            _train(app, step)
            mgr.save(step, app)
            seen[step] = _weights(app["model"])
    return seen


def test_resume_step_loads_that_step_and_a_missing_step_is_named(tmp_path):
    seen = _run(tmp_path, range(1, 4))
    app = _app(1)
    with de.CheckpointManager(_cfg(tmp_path, resume="latest", resume_step=2)) as mgr:
        info = mgr.resume(app)
        assert info is not None and info.step == 2 and _same(_weights(app["model"]), seen[2])
        assert float(app["center"][0]) == 1 + 2
        with pytest.raises(de.TimelineError, match="step 3 is already committed"):
            mgr.save(3, app)  # going back is a branch
        mgr.save(4, app)
    missing = pytest.raises(de.CheckpointNotFoundError, match="no checkpoint for step 9 in")
    with de.CheckpointManager(_cfg(tmp_path, resume="latest", resume_step=9)) as mgr, missing:
        mgr.resume(_app(1))
    with pytest.raises(de.ConfigError, match=r"resume_step=2 .*'latest' or a path"):
        _cfg(tmp_path, resume_step=2)


def test_exclude_from_loading_leaves_those_keys_as_they_are(tmp_path):
    seen = _run(tmp_path, range(1, 3))
    app = _app(1)
    app["center"].fill_(-1.0)
    cfg = _cfg(tmp_path, resume="latest", exclude_from_loading=("optim", "center", "epochs"))
    with de.CheckpointManager(cfg) as mgr:
        mgr.resume(app)
    assert _same(_weights(app["model"]), seen[2]) and not app["optim"].state
    assert torch.equal(app["center"], torch.full((3,), -1.0))
    unknown = pytest.raises(ValueError, match=r"exclude_from_loading names \['x'\], which")
    cfg = _cfg(tmp_path, resume="latest", exclude_from_loading=["x"])
    with de.CheckpointManager(cfg) as mgr, unknown:
        mgr.resume(_app(1))


def test_an_initial_load_is_used_only_while_the_experiment_has_no_checkpoint(tmp_path):
    seen = _run(tmp_path / "pre", range(1, 8))
    block = {"root_dir": str(tmp_path), "folder": "run", "initial_load_path":
             str(tmp_path / "pre" / "exp"), "async_mode": "disabled"}  # fmt: skip
    cb = de.CheckpointCallback(C.from_dict(block))
    app = _app(1)
    start = cb.on_train_start(app)
    # only the model came, and the loop starts at 0: a new training from those weights
    assert (start.step, start.epoch) == (0, 0) and start.resumed_from.step == 7
    assert _same(_weights(app["model"]), seen[7]) and not app["optim"].state
    assert float(app["center"][0]) == 0
    _train(app, 1)
    cb.on_step_end(1, app)
    cb.on_train_end(app)
    mine = _weights(app["model"])
    again = de.CheckpointCallback(C.from_dict(block))
    app = _app(2)
    start = again.on_train_start(app)  # a restart: its own newest, whole
    assert start.step == 1 and _same(_weights(app["model"]), mine) and app["optim"].state
    assert float(app["center"][0]) == 1
    again.close()


def test_the_final_save_is_the_model_only_in_export_dtype(tmp_path):
    block = {"root_dir": str(tmp_path), "folder": "run", "interval": 2,
             "last_save_model_only": True, "export_dtype": "bfloat16",
             "async_mode": "async"}  # fmt: skip
    cb = de.CheckpointCallback(C.from_dict(block))
    app = _app(0)
    cb.on_train_start(app)
    for step in range(1, 4):
        _train(app, step)
        cb.on_step_end(step, app)
    cb.on_train_end(app)
    with de.open_checkpoint(tmp_path / "run") as ck:
        assert ck.info.step == 3 and ck.keys == ["model"]
        weights = ck.load_entries(["model"])["model"]
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    model = make_model(5, hidden=8)
    de.load_weights(model, tmp_path / "run")
    bf16 = {k: v.to(torch.bfloat16).float() for k, v in _weights(app["model"]).items()}
    assert _same(_weights(model), bf16)
    with de.open_checkpoint(tmp_path / "run", which=2) as ck:
        assert set(ck.keys) == {"model", "optim", "center", "epochs"}  # periodic: whole
    wrong = de.CheckpointCallback(C.from_dict(block))
    with pytest.raises(ValueError, match=r"last_save_only names \['model'\], which app_state"):
        wrong.on_train_start({"net": make_model(0)})  # at the start, not at the end
    wrong.close()


# ---------------------------------------------------------------- the manager


class Optimizers(torch.optim.Optimizer):
    """Shaped like torchtitan's OptimizersContainer: one optimizer per model part, an
    ``Optimizer`` itself, its state flattened and keyed by parameter name."""

    def __init__(self, model_parts: list[nn.Module], lr: float) -> None:
        self.model_parts = model_parts
        self.optimizers = [torch.optim.AdamW(m.parameters(), lr=lr) for m in model_parts]
        params = [p for m in model_parts for p in m.parameters()]
        torch.optim.Optimizer.__init__(self, params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        fn = functools.partial(get_optimizer_state_dict, options=opts)
        return {k: v for sd in map(fn, self.model_parts, self.optimizers) for k, v in sd.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        for m, o in zip(self.model_parts, self.optimizers, strict=True):
            set_optimizer_state_dict(m, o, optim_state_dict=state_dict, options=opts)


class Schedulers:
    """Shaped like torchtitan's LRSchedulersContainer."""

    def __init__(self, optimizers: Optimizers) -> None:
        self.schedulers = [torch.optim.lr_scheduler.StepLR(o, 2) for o in optimizers.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for s in self.schedulers:
            s.load_state_dict(dict(state_dict))


class TrainState:
    """torchtitan's train_state: the step and the tokens seen, as tensors."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "ntokens_seen": torch.tensor(self.ntokens_seen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.ntokens_seen = int(state_dict["ntokens_seen"])


def _titan(seed: int, wrapper: str = "plain") -> tuple[list[nn.Module], Optimizers, Schedulers]:
    parts = [wrap(make_model(seed), wrapper)]
    optimizers = Optimizers(parts, lr=1e-2)
    return parts, optimizers, Schedulers(optimizers)


def _titan_step(parts, optimizers, schedulers, state: TrainState, rank: int) -> None:
    state.step += 1
    g = torch.Generator().manual_seed(100 * state.step + rank)
    parts[0](torch.randn(6, 8, generator=g)).pow(2).mean().backward()
    optimizers.step()
    optimizers.zero_grad()
    schedulers.step()
    state.ntokens_seen += 6


def _checkpointer(config: Any, base: Path, parts, optimizers, schedulers, state, **kw: Any):
    return CheckpointManager(
        config, dataloader=None, model_parts=parts, optimizers=optimizers,
        lr_schedulers=schedulers, states={"train_state": state}, base_folder=str(base), **kw,
    )  # fmt: skip


def test_the_torchtitan_manager_on_one_process(tmp_path):
    parts, optimizers, schedulers = _titan(0)
    state = TrainState()
    off = _checkpointer({"folder": "c"}, tmp_path, parts, optimizers, schedulers, state)
    assert not off.enable and not off.load() and not off.save(500, last_step=True)
    off.close()
    assert not (tmp_path / "c").exists()  # torchtitan's default: disabled
    config = {"enable": True, "folder": "c", "interval": 3, "keep_latest_k": 2,
              "enable_first_step_checkpoint": True, "last_save_model_only": False}  # fmt: skip
    ck = _checkpointer(config, tmp_path, parts, optimizers, schedulers, state)
    assert ck.folder == str(tmp_path / "c") and not ck.load()  # a fresh start
    saved = []
    for step in range(1, 8):
        _titan_step(parts, optimizers, schedulers, state, 0)
        if ck.save(step, last_step=step == 7):
            saved.append(step)
    ck.close()
    assert saved == [1, 3, 6, 7] and [c.step for c in ck.manager.checkpoints()] == [6, 7]
    parts2, optimizers2, schedulers2 = _titan(1)
    state2 = TrainState()
    again = _checkpointer(config, tmp_path, parts2, optimizers2, schedulers2, state2)
    assert again.load(step=6) and state2.step == 6 and again.states["train_state"] is state2
    assert again.load() and (state2.step, state2.ntokens_seen) == (7, 42)
    assert _same(_weights(parts2[0]), _weights(parts[0]))
    assert schedulers2.state_dict() == schedulers.state_dict()
    assert torch.equal(
        optimizers2.state_dict()["state.0.weight.exp_avg"],
        optimizers.state_dict()["state.0.weight.exp_avg"],
    )
    with pytest.raises(de.CheckpointNotFoundError, match="no checkpoint for step 3"):
        again.load(step=3)  # purged by keep_latest_k
    again.close()
    reader = _checkpointer({**config, "load_only": True, "folder": "c"}, tmp_path,
                           *_titan(2), TrainState())  # fmt: skip
    assert reader.load() and not reader.save(9)
    reader.close()
    with pytest.raises(de.UnsupportedKeyError, match="torchft"):
        _checkpointer(config, tmp_path, *_titan(3), TrainState(), ft_manager=object())
    with pytest.raises(de.ConfigError, match="keys but 'model'"):
        _checkpointer({**config, "exclude_from_loading": ["model"]}, tmp_path, *_titan(3),
                      TrainState())  # fmt: skip


@multirank(2)
def _fsdp2_rank(rank: int, world_size: int, base: str) -> dict[str, Any]:
    config = {"enable": True, "folder": "checkpoint", "interval": 2, "keep_latest_k": 2,
              "async_mode": "async", "last_save_model_only": True,
              "export_dtype": "bfloat16", "exclude_from_loading": "lr_scheduler"}  # fmt: skip
    parts, optimizers, schedulers = _titan(0, "fsdp")
    state = TrainState()
    ck = _checkpointer(config, Path(base), parts, optimizers, schedulers, state)
    assert not ck.load()
    for step in range(1, 5):
        _titan_step(parts, optimizers, schedulers, state, rank)
        ck.save(step)
        ck.maybe_wait_for_staging()
    ck.close()
    at4 = full_state({"model": parts[0], "optim": optimizers.optimizers[0], "sched": schedulers,
                      "center": torch.zeros(1)})  # fmt: skip
    # a restarted job: other weights, a fresh optimizer, a scheduler that must stay as it is
    parts2, optimizers2, schedulers2 = _titan(7, "fsdp")
    state2 = TrainState()
    ck2 = _checkpointer(config, Path(base), parts2, optimizers2, schedulers2, state2)
    assert ck2.load() and state2.step == 4
    now = full_state({"model": parts2[0], "optim": optimizers2.optimizers[0],
                      "sched": schedulers2, "center": torch.zeros(1)})  # fmt: skip
    for step in range(5, 7):
        _titan_step(parts2, optimizers2, schedulers2, state2, rank)
        ck2.save(step, last_step=step == 6)
    ck2.close()
    dist.barrier()
    out: dict[str, Any] = {"at4": at4, "now": now, "sched2_epoch": None}
    out["sched2_epoch"] = schedulers2.schedulers[0].last_epoch
    if rank == 0:
        with de.open_checkpoint(Path(base) / "checkpoint") as ck:
            out["final"] = (ck.info.step, ck.keys, ck.load_entries(["model"])["model"])
        out["steps"] = [c.step for c in de.find_checkpoints(Path(base) / "checkpoint")]
    return out


@pytest.mark.slow
def test_the_torchtitan_manager_under_fsdp2_on_two_ranks_resumes_exactly(tmp_path):
    r0, _ = _fsdp2_rank.run(str(tmp_path))
    at4, now = r0["at4"], r0["now"]
    assert _same(now["model"], at4["model"])
    assert now["optim"].keys() == at4["optim"].keys()
    for key, value in at4["optim"].items():
        assert (
            torch.equal(now["optim"][key], value)
            if torch.is_tensor(value)
            else (now["optim"][key] == value)
        ), key
    assert r0["sched2_epoch"] == 2  # excluded from loading: 0 + its own 2 steps
    step, keys, weights = r0["final"]
    assert step == 6 and keys == ["model"] and r0["steps"] == [6, 4]
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


# ---------------------------------------------------------------- torchtitan's step-N/, adopted


class Block(nn.Module):
    """A transformer block with torchtitan's Llama names (``layers.<i>.attention.wq``...)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.ModuleDict({"wq": nn.Linear(dim, dim), "wo": nn.Linear(dim, dim)})
        self.feed_forward = nn.ModuleDict(
            {"w1": nn.Linear(dim, 2 * dim), "w2": nn.Linear(2 * dim, dim)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, ff = self.attention, self.feed_forward
        x = x + attn["wo"](torch.tanh(attn["wq"](self.attention_norm(x))))
        return x + ff["w2"](torch.relu(ff["w1"](self.ffn_norm(x))))


class TinyLlama(nn.Module):
    VOCAB, DIM = 32, 8

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok_embeddings = nn.Embedding(self.VOCAB, self.DIM)
        self.layers = nn.ModuleDict({str(i): Block(self.DIM) for i in range(2)})
        self.norm = nn.LayerNorm(self.DIM)
        self.output = nn.Linear(self.DIM, self.VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


class TitanLoader(StatefulDataLoader):
    """torchtitan's ``ParallelAwareDataloader``: its position pickled under its dp rank."""

    def __init__(self, dp_rank: int, dp_world_size: int) -> None:
        g = torch.Generator().manual_seed(5)
        data = [torch.randint(0, TinyLlama.VOCAB, (7,), generator=g) for _ in range(48)]
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._rank_id = f"dp_rank_{dp_rank}"
        super().__init__(data[dp_rank::dp_world_size], batch_size=2)

    def state_dict(self) -> dict[str, Any]:
        return {self._rank_id: pickle.dumps(super().state_dict()), "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert self.dp_world_size == state_dict["world_size"]
        super().load_state_dict(pickle.loads(state_dict[self._rank_id]))


class TitanTrainState(TrainState):
    """torchtitan 0.3's trainer: ``{"step": int, "ntokens_seen": int}``."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}


class Titan:
    """One torchtitan job: the model, its optimizer and LR scheduler containers, the
    dataloader, the train state, and the loop's iterator over the loader."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1) -> None:
        model = TinyLlama(seed)
        if world_size > 1:  # FSDP2 per block, then the root, as torchtitan applies it
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world_size,))
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.parts = [model]
        self.optimizers = Optimizers(self.parts, lr=1e-2)
        self.schedulers = Schedulers(self.optimizers)
        self.loader = TitanLoader(rank, world_size)
        self.state = TitanTrainState()
        self.batches: Any = None
        self.tokens = torch.empty(0)

    def step(self) -> None:
        if self.batches is None:
            self.batches = iter(self.loader)
        self.tokens = next(self.batches)
        logits = self.parts[0](self.tokens[:, :-1])
        target = self.tokens[:, 1:].flatten()
        nn.functional.cross_entropy(logits.flatten(0, 1), target).backward()
        self.optimizers.step()
        self.optimizers.zero_grad()
        self.schedulers.step()
        self.state.step += 1
        self.state.ntokens_seen += self.tokens.numel()

    def torchtitan_save(self, path: Path, **kw: Any) -> None:
        """What torchtitan's ``CheckpointManager._save`` writes: the model's state dict at
        the top level (``_flattened_model_states_sd``), beside its other states."""
        states: dict[str, Any] = {
            "train_state": self.state,
            "optimizer": self.optimizers,
            "dataloader": self.loader,
            "lr_scheduler": self.schedulers,
        }
        states.update({k: v for m in self.parts for k, v in m.state_dict().items()})
        dcp.save(states, checkpoint_id=str(path), **kw)

    def checkpointer(self, base: Path) -> CheckpointManager:
        config = {"enable": True, "folder": "checkpoint", "interval": 1,
                  "last_save_model_only": False}  # fmt: skip
        return CheckpointManager(
            config, dataloader=self.loader, model_parts=self.parts, optimizers=self.optimizers,
            lr_schedulers=self.schedulers, states={"train_state": self.state},
            base_folder=str(base),
        )  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """What a resume must give back, as plain CPU values (complete on rank 0)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optim = self.parts[0], self.optimizers.optimizers[0]
        return copy.deepcopy({
            "model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, optim, options=opts),
            "sched": self.schedulers.state_dict(),
            "train_state": self.state.state_dict(),
        })  # fmt: skip


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("move", [False, True])
def test_torchtitans_own_step_dir_is_adopted_and_the_manager_continues_the_run_exactly(
    tmp_path, move
):
    """Pass: torchtitan's ``outputs/checkpoint/step-10/`` (stock ``dcp.save``: the model's
    parameters at the top level, the flattened optimizer container, LR scheduler, a
    dataloader mid-epoch, ``train_state``) is adopted into its own folder with
    ``dcp-engine adopt --layout torchtitan``; the manager's ``load()`` on fresh objects gives
    model, AdamW moments, scheduler, train state and the data position back exactly, the
    run goes on in step with the original, and its next save reloads exactly. A copy leaves
    the source as it was; a move leaves no ``step-10/``."""
    outputs = tmp_path / "outputs"
    folder, step10 = outputs / "checkpoint", outputs / "checkpoint" / "step-10"
    job = Titan(seed=0)
    for _ in range(10):
        job.step()
    job.torchtitan_save(step10, no_dist=True)
    saved = job.snapshot()
    before = tree(step10)
    args = ["adopt", str(step10), str(folder), "--step", "10", "--layout", "torchtitan"]
    assert cli.main(args + (["--move"] if move else [])) == 0
    assert not step10.exists() if move else tree(step10) == before
    ckpt = folder / "checkpoints" / "step_00000010"
    marker = Marker.from_bytes((ckpt / layout.MARKER_FILE).read_bytes(), "t")
    assert set(marker.entries) == {"model", "optimizer", "lr_scheduler", "dataloader",
                                   "train_state"}  # fmt: skip
    assert marker.extra["adopted_layout"] == "torchtitan"
    assert cli.main(["verify", str(folder)]) == 0  # the rewritten .metadata's digest too
    with de.open_checkpoint(folder) as ck:
        names = set(ck.metadata.state_dict_metadata)
    assert "model.layers.1.attention.wq.weight" in names
    assert "layers.1.attention.wq.weight" not in names and "train_state.step" in names

    fresh = Titan(seed=7)
    ck = fresh.checkpointer(outputs)
    assert ck.load() and fresh.state.step == 10
    toy.assert_equal(saved, fresh.snapshot())
    job.step()
    fresh.step()  # the same batch: the loader went on from its position
    assert torch.equal(job.tokens, fresh.tokens)
    toy.assert_equal(job.snapshot(), fresh.snapshot())
    assert ck.save(11)
    ck.close()
    again = Titan(seed=9)
    ck = again.checkpointer(outputs)
    assert ck.load() and again.state.step == 11
    toy.assert_equal(job.snapshot(), again.snapshot())
    job.step()
    again.step()
    assert torch.equal(job.tokens, again.tokens)
    ck.close()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize(
    "case, message",
    [
        ("model", "has a 'model' entry already, so it is not in torchtitan's layout"),
        ("nested", "has no model parameters at the top level of its state dict"),
    ],
)
def test_adopt_layout_torchtitan_refuses_another_layout_with_one_line(
    tmp_path, capsys, case, message
):
    """Pass: a checkpoint that is not torchtitan's (a ``model`` entry already; nothing at the
    top level) is refused with exit 2 and one line naming the directory and what is wrong,
    before anything is written (no experiment), the source as it was."""
    src = tmp_path / "src"
    w = torch.arange(4.0)
    state = {"model": {"w": w}, "optim": {"m": w}} if case == "model" else {"app": {"w": w}}
    dcp.save(state, checkpoint_id=str(src), no_dist=True)
    before = tree(src)
    capsys.readouterr()
    code = cli.main(["adopt", str(src), str(tmp_path / "exp"), "--step", "1",
                     "--layout", "torchtitan"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(src) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert tree(src) == before and not (tmp_path / "exp").exists()
    with pytest.raises(ValueError, match="layout must be one of stock, torchtitan; got 'titan'"):
        de.adopt(src, tmp_path / "exp", step=1, layout="titan")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("move", [False, True])
def test_a_failed_torchtitan_adopt_leaves_no_tmp_and_the_source_whole(tmp_path, move):
    """Pass: a copy finds the disk full at the data file (after the renamed ``.metadata``);
    a move fails at the commit's rename, after the data file was moved: the error names
    the cause, no ``step_X.tmp`` is left, the source is byte for byte as it was (its own
    ``.metadata`` included, the data file moved back); the retry commits."""
    src = tmp_path / "step-4"
    job = Titan(seed=1)
    for _ in range(4):
        job.step()
    job.torchtitan_save(src, no_dist=True)
    before = tree(src)
    exp = tmp_path / "exp"
    failing, cause = (CrossDevice(), "cross-device") if move else (FullDisk(), "No space left")
    with pytest.raises(OSError, match=cause):
        de.adopt(src, exp, step=4, move=move, layout="torchtitan", storage=failing)
    assert tree(src) == before and list((exp / "checkpoints").iterdir()) == []
    info = de.adopt(src, exp, step=4, move=move, layout="torchtitan")
    assert info.step == 4 and (not src.exists() if move else tree(src) == before)


@multirank(2)
def _adopt_titan_rank(rank: int, world_size: int, base: str) -> dict[str, Any]:
    outputs = Path(base) / "outputs"
    step6 = outputs / "checkpoint" / "step-6"
    job = Titan(seed=0, rank=rank, world_size=world_size)
    for _ in range(6):
        job.step()
    job.torchtitan_save(step6)  # collective: each rank's shards and its dp_rank_<r>
    saved = job.snapshot()
    dist.barrier()
    if rank == 0:
        args = ["adopt", str(step6), str(outputs / "checkpoint"), "--step", "6"]
        assert cli.main([*args, "--layout", "torchtitan", "--move"]) == 0
    dist.barrier()
    fresh = Titan(seed=7, rank=rank, world_size=world_size)
    ck = fresh.checkpointer(outputs)
    assert ck.load() and fresh.state.step == 6
    out: dict[str, Any] = {"saved": saved, "loaded": fresh.snapshot()}
    job.step()
    fresh.step()  # this rank's next batch: its own position came back
    out["same_batch"] = torch.equal(job.tokens, fresh.tokens)
    out["stepped"] = (job.snapshot(), fresh.snapshot())
    assert ck.save(7)
    ck.close()
    again = Titan(seed=9, rank=rank, world_size=world_size)
    ck = again.checkpointer(outputs)
    assert ck.load() and again.state.step == 7
    out["reloaded"] = again.snapshot()
    job.step()
    again.step()
    out["same_batch"] &= torch.equal(job.tokens, again.tokens)
    ck.close()
    return out


@pytest.mark.slow
@pytest.mark.multirank
def test_torchtitans_step_dir_of_two_fsdp2_ranks_is_adopted_and_resumed_on_two_ranks(tmp_path):
    """Pass: what 2 FSDP2 ranks of torchtitan wrote (DTensor shards, a dataloader position
    per dp rank) is adopted in place with ``--move`` and loaded by the manager on 2 FSDP2
    ranks exactly, each rank getting its own data position back; step 7 saves and
    reloads exactly, positions included."""
    r0, r1 = _adopt_titan_rank.run(str(tmp_path))
    assert r0["same_batch"] and r1["same_batch"]
    assert not (tmp_path / "outputs" / "checkpoint" / "step-6").exists()
    toy.assert_equal(r0["saved"], r0["loaded"])
    toy.assert_equal(*r0["stepped"])
    toy.assert_equal(r0["stepped"][0], r0["reloaded"])
