"""A small training state shared by the tests: model (plain, DDP or FSDP2), AdamW, an LR
scheduler and an extra tensor buffer (a loss centre), with deterministic per-rank data."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

WRAPPERS = ("plain", "ddp", "fsdp")


def make_model(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4)
    )


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "plain":
        return model
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(wrapper)


def make_app(wrapper: str, seed: int, hidden: int = 16) -> dict[str, Any]:
    model = wrap(make_model(seed, hidden), wrapper)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=10)
    return {"model": model, "optim": optim, "sched": sched, "center": torch.zeros(4)}


def train(app: dict[str, Any], steps: int, rank: int, start: int = 0) -> None:
    model, optim, sched, center = app["model"], app["optim"], app["sched"], app["center"]
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        out = model(torch.randn(6, 8, generator=g))
        out.pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
        sched.step()
        batch_center = out.detach().mean(0)
        if dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        center.mul_(0.9).add_(0.1 * batch_center)


def full_state(app: dict[str, Any]) -> dict[str, Any]:
    """The whole state as plain CPU tensors (collective under FSDP2; complete on rank 0)."""
    msd, osd = get_state_dict(
        app["model"],
        app["optim"],
        options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True
        ),
    )
    snapshot = {"model": msd, "optim": osd, "sched": app["sched"].state_dict()}
    snapshot["center"] = app["center"]
    # A snapshot, not views: cpu_offload leaves CPU tensors aliasing the live state.
    return copy.deepcopy(snapshot)


def full_model_state(app: dict[str, Any]) -> dict[str, Any]:
    """The model's full state only (leaves the optimizer untouched)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(app["model"], options=options)


def assert_equal(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), (
            f"{path}: values differ (max abs diff {(a.float() - b.float()).abs().max()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
