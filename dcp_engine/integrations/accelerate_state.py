"""What ``DcpEngineAccelerator.save_state`` saves: Accelerate's objects as an ``app_state``.

Keys (Accelerate's file names without their suffix; a second object of a kind gets
``_1``, ``_2``...): ``model``, ``optimizer``, ``scheduler``, ``dataloader``, ``scaler``,
``custom_checkpoint_<i>`` (``register_for_checkpointing``), ``accelerator`` (its step
counter) and ``accelerate_files`` (what the save hooks wrote). The RNG states of every
rank are the engine's own (``CheckpointConfig.capture_rng``).

Invariant: the states Accelerate writes on the main process only (schedulers, scaler,
registered objects, the loader's position) are rank 0's on every rank before they reach
DCP (``rank0_values``). The engine writes a non-tensor value from rank 0 anyway, but the
tensors inside such a state are replicated values, which DCP writes from whichever rank
has the least to write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL, OPTIMIZER, SCHEDULER, DATALOADER, SCALER = (
    "model",
    "optimizer",
    "scheduler",
    "dataloader",
    "scaler",
)
CUSTOM = "custom_checkpoint"
ACCELERATOR = "accelerator"
FILES = "accelerate_files"


def key(kind: str, i: int) -> str:
    """Accelerate's numbering: ``model``, ``model_1``, ``model_2``...; custom objects
    count from 0 (``custom_checkpoint_0``)."""
    if kind == CUSTOM:
        return f"{CUSTOM}_{i}"
    return kind if i == 0 else f"{kind}_{i}"


class Rank0State:
    """A Stateful whose saved state is fixed at the save (rank 0's on every rank); a load
    goes to ``target``. ``state=None``: the target's own state (the template of a load)."""

    def __init__(self, target: Any, state: Any = None) -> None:
        self.target, self.state = target, state

    def state_dict(self) -> Any:
        return self.target.state_dict() if self.state is None else self.state

    def load_state_dict(self, state: Any) -> None:
        self.target.load_state_dict(state)


class LoaderState:
    """An Accelerate dataloader's position: its epoch counter (``iteration``), the seed of
    its ``SeedableRandomSampler`` (``use_seedable_sampler``: the shuffle of an epoch is
    seed + epoch) and, with ``use_stateful_dataloader``, torchdata's ``StatefulDataLoader``
    state (the batches of this epoch already seen)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def _sampler(self) -> Any:
        get = getattr(self.loader, "get_sampler", None)
        return get() if callable(get) else None

    def state_dict(self) -> dict[str, Any]:
        stateful = getattr(self.loader, "use_stateful_dataloader", False)
        seed = getattr(self._sampler(), "initial_seed", None)
        return {
            "iteration": int(getattr(self.loader, "iteration", 0)),
            "seed": None if seed is None else int(seed),
            "position": self.loader.state_dict() if stateful else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        position = state["position"]
        stateful = getattr(self.loader, "use_stateful_dataloader", False)
        if position is not None and not stateful:
            raise ValueError(
                "the checkpoint holds a StatefulDataLoader position but this dataloader "
                "was prepared without use_stateful_dataloader=True"
            )
        sampler = self._sampler()
        if state["seed"] is not None and hasattr(sampler, "initial_seed"):
            sampler.initial_seed = int(state["seed"])
        if position is not None:
            self.loader.load_state_dict(position)
            # Accelerate's state_dict() returns this snapshot until the next batch: a save
            # right after the load must write the loaded position, not the fresh one.
            self.loader.dl_state_dict = position
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(int(state["iteration"]))


def rank0_values(
    values: Mapping[str, Any], decide: Callable[[Callable[[], Any], str], Any]
) -> dict[str, Any]:
    """``values`` as rank 0 has them, on every rank (one collective)."""
    return dict(decide(lambda: dict(values), "save_state's values (rank 0's)"))


def stateful_of(value: Any) -> Any:
    """What the engine saves for an object Accelerate hands over: the inner optimizer (its
    step hooks fire; its state is what DCP reshards), modules as they are."""
    inner = getattr(value, "optimizer", None)
    if isinstance(value, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
        return inner
    return value


def owns_optimizer(model: Any, optimizers: list[Any]) -> bool:
    """Some optimizer steps parameters of ``model``: the engine keys that optimizer's state
    by parameter name through the model, so the model must be in the ``app_state``."""
    mine = {id(p) for p in model.parameters()}
    return any(id(p) in mine for opt in optimizers for g in opt.param_groups for p in g["params"])


def check_optimizers(native: Mapping[str, Any]) -> None:
    """Every optimizer steps parameters of one module of ``native`` (the engine names its
    state through that module); else a ``ValueError`` in Accelerate's terms."""
    modules = [m for m in native.values() if isinstance(m, nn.Module)]
    for name, opt in native.items():
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        wanted = {id(p) for g in opt.param_groups for p in g["params"]}
        if not any(wanted <= {id(p) for p in m.parameters()} for m in modules):
            raise ValueError(
                f"save_state(): {name!r} steps parameters of no model the accelerator "
                "checkpoints: pass that model to accelerator.prepare() or "
                "accelerator.register_for_checkpointing()"
            )


def is_engine_native(value: Any) -> bool:
    """Modules and optimizers: saved by the engine's own codecs (sharded per rank)."""
    return isinstance(value, (nn.Module, torch.optim.Optimizer))


# ---------------------------------------------------------------- hook files


def read_files(root: str) -> dict[str, bytes]:
    """Every regular file under ``root``, by path relative to it (``/``-separated)."""
    out: dict[str, bytes] = {}
    for here, _, names in os.walk(root):
        for name in names:
            path = Path(here, name)
            if path.is_file() and not path.is_symlink():
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def write_files(root: str, files: Mapping[str, bytes]) -> None:
    """The inverse of ``read_files``; a name that would leave ``root`` is refused."""
    base = Path(root).resolve()
    for rel, data in files.items():
        path = (base / rel).resolve()
        if base not in path.parents:
            raise ValueError(f"{FILES} holds {rel!r}, a path outside the checkpoint")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@contextmanager
def scratch_dir(what: str) -> Iterator[str]:
    """A private local directory for the hooks, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"dcp_engine_accelerate_{what}_") as d:
        yield d


__all__ = [
    "ACCELERATOR",
    "CUSTOM",
    "DATALOADER",
    "FILES",
    "MODEL",
    "OPTIMIZER",
    "SCALER",
    "SCHEDULER",
    "LoaderState",
    "Rank0State",
    "check_optimizers",
    "is_engine_native",
    "key",
    "owns_optimizer",
    "rank0_values",
    "read_files",
    "scratch_dir",
    "stateful_of",
    "write_files",
]
