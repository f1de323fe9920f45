"""The states the save and load benchmarks write: ``build("train" | "small", ...)``.

- ``train``: an FSDP2 MLP trained one step with AdamW (parameters + two moments), about
  ``mib_per_rank`` MiB per rank (504 MiB with 512 on 2 ranks), pre-faulted;
- ``small``: 600 plain tensors of 64 MiB in all in one module (the per-item overhead case;
  meant for one process).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .measure import MiB

HIDDEN = 2048
BATCH = 16
SMALL_TENSORS = 600
SMALL_MIB = 64


class State:
    """``app``: what the engine saves (a module and, for ``train``, its optimizer)."""

    def __init__(self, shape: str, app: dict[str, Any]) -> None:
        self.shape, self.app = shape, app

    @property
    def model(self) -> nn.Module:
        return self.app["model"]

    @property
    def optim(self) -> torch.optim.Optimizer | None:
        return self.app.get("optim")

    def tensors(self) -> list[torch.Tensor]:
        """This rank's tensors (its shards), as they lie in memory."""
        out = [_local(p).detach() for p in self.model.parameters()]
        if self.optim is not None:
            for st in self.optim.state.values():
                out += [_local(t) for t in st.values() if isinstance(t, torch.Tensor)]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def count(self) -> int:
        return len(self.tensors())

    def dcp_state(self) -> dict[str, Any]:
        """The state dict DCP saves and loads into (``get_state_dict``)."""
        if self.optim is None:
            msd, _ = get_state_dict(self.model, [])
            return {"model": msd}
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def set_dcp_state(self, sd: dict[str, Any]) -> None:
        """Back into the model and optimizer after ``dcp.load`` (``set_state_dict``)."""
        optims = [] if self.optim is None else [self.optim]
        set_state_dict(
            self.model,
            optims,
            model_state_dict=sd["model"],
            optim_state_dict=sd.get("optim", {}),
        )

    def full_state(self) -> dict[str, Any]:
        """Gathered to rank 0 and offloaded, as ``torch.save`` needs it (collective)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optims = [] if self.optim is None else [self.optim]
        msd, osd = get_state_dict(self.model, optims, options=opts)
        return {"model": msd, "optim": osd}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def build(shape: str, mib_per_rank: float) -> State:
    torch.manual_seed(0)
    if shape == "small":
        return State(shape, {"model": _many(SMALL_TENSORS, SMALL_MIB * MiB)})
    world = dist.get_world_size()
    per_layer_per_rank = HIDDEN * HIDDEN * 4 * 3 / world  # fp32 weight + two Adam moments
    n_layers = max(2, round(mib_per_rank * MiB / per_layer_per_rank))
    model = nn.Sequential(*(nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(n_layers)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = State(shape, {"model": model, "optim": torch.optim.AdamW(model.parameters())})
    train_step(state)  # creates (and touches) the optimizer state
    return state


class _Many(nn.Module):
    def __init__(self, n: int, nbytes: int) -> None:
        super().__init__()
        numel = nbytes // 4 // n
        sizes = [numel] * (n - 1) + [nbytes // 4 - numel * (n - 1)]
        self.params = nn.ParameterList(nn.Parameter(torch.rand(k)) for k in sizes)


def _many(n: int, nbytes: int) -> nn.Module:
    return _Many(n, nbytes)


def train_step(state: State) -> float:
    """One forward/backward/step of the ``train`` state; its wall time."""
    start = time.perf_counter()
    x = torch.randn(BATCH, HIDDEN)
    state.model(x).square().mean().backward()
    assert state.optim is not None
    state.optim.step()
    state.optim.zero_grad(set_to_none=False)
    return time.perf_counter() - start
