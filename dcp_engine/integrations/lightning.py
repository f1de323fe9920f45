"""PyTorch Lightning through the engine (``docs/lightning.md``).

    from dcp_engine import CheckpointConfig
    from dcp_engine.integrations.lightning import DcpEngineCheckpointIO, DcpEngineDDPStrategy

    config = CheckpointConfig(root_dir="experiments", experiment_name="run1")
    trainer = Trainer(plugins=[DcpEngineCheckpointIO(config)],          # one device
                      callbacks=[ModelCheckpoint(save_top_k=2, monitor="val_loss",
                                                 save_last=True)])
    trainer = Trainer(strategy=DcpEngineDDPStrategy(config), devices=2)  # DDP
    trainer = Trainer(strategy=DcpEngineModelParallelStrategy(config))   # FSDP2 (+TP)
    trainer.fit(model, ckpt_path="last")

- ``DcpEngineCheckpointIO``: Lightning's ``CheckpointIO``; saves are asynchronous
  (``save_checkpoint`` returns once the state is staged; ``teardown`` waits).
- ``DcpEngineDDPStrategy``: Lightning's ``DDPStrategy`` calls a ``CheckpointIO`` on rank
  0 only; the engine writes on every rank (each its share), so this one calls it on all.
- ``DcpEngineModelParallelStrategy``: Lightning's ``ModelParallelStrategy`` (FSDP2,
  tensor parallel) bypasses ``CheckpointIO``; this one saves and loads the sharded module
  and optimizers through the engine (any world size on load).

Each path Lightning saves (``epoch=0-step=10.ckpt``, ``last.ckpt``) is a small name file
pointing at an engine checkpoint (``lightning_names.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from ..config import CheckpointConfig
from ..errors import CheckpointError
from . import lightning_payload as payload
from .lightning_engine import LightningEngine

_PATH = str | os.PathLike[str]


def _config(config: CheckpointConfig | None, fields: Mapping[str, Any]) -> CheckpointConfig:
    if config is not None and fields:
        raise TypeError(f"pass a CheckpointConfig or its fields, not both ({sorted(fields)})")
    return config if config is not None else CheckpointConfig(**fields)


def _no_storage_options(storage_options: Any, who: str) -> None:
    if storage_options is not None:
        raise TypeError(
            f"{who}.save_checkpoint(storage_options=...) is not supported: give the file "
            "system's options as CheckpointConfig(storage_options=...)"
        )


class DcpEngineCheckpointIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` over a ``CheckpointManager``: ``Trainer(plugins=[
    DcpEngineCheckpointIO(config)])`` on one device, or with ``DcpEngineDDPStrategy``.

    ``config`` (or its fields as keywords): where and how checkpoints are written. Its
    retention fields and ``resume`` are Lightning's (``ModelCheckpoint(save_top_k=...)``,
    ``trainer.fit(ckpt_path=...)``) and refused here.
    """

    def __init__(self, config: CheckpointConfig | None = None, **fields: Any) -> None:
        self.engine = LightningEngine(_config(config, fields))

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` as ``path`` (one process; under DDP see
        ``save_on_every_rank``). Returns once the state is staged."""
        _no_storage_options(storage_options, type(self).__name__)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise CheckpointError(
                f"saving {path} on rank {dist.get_rank()} only: the engine writes on every "
                "rank, and Lightning's DDPStrategy calls a CheckpointIO on rank 0 alone; use "
                "Trainer(strategy=DcpEngineDDPStrategy(...)) (FSDP2: "
                "DcpEngineModelParallelStrategy)"
            )
        self.save_on_every_rank(checkpoint, path)

    def save_on_every_rank(self, checkpoint: dict[str, Any], path: _PATH) -> None:
        """What ``DcpEngineDDPStrategy`` calls on every rank: a collective save."""
        self.engine.save(checkpoint, path, lambda: payload.app_state(checkpoint))

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict ``path`` names, tensors on the CPU (or ``map_location``: a
        device). A file that is not a name of ours (a plain Lightning ``.ckpt``) is read
        by ``TorchCheckpointIO``, so a run can move onto the engine; ``weights_only=True``
        is refused for ours (their non-tensor values are pickled)."""
        loaded = self.engine.load(path, map_location=map_location, weights_only=weights_only)
        if loaded is None:
            return TorchCheckpointIO().load_checkpoint(os.fspath(path), map_location, weights_only)
        return loaded

    def remove_checkpoint(self, path: _PATH) -> None:
        """Lightning dropped ``path`` (rank 0): the name goes once the save in flight has
        committed, and its checkpoint with it when no other name points at it."""
        self.engine.remove(path)

    def teardown(self) -> None:
        """End of ``fit``: wait for the save in flight and the names, close the manager."""
        self.engine.close()


class DcpEngineDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose checkpoints are saved by every rank through the engine.

    ``DcpEngineDDPStrategy(config, **ddp_kwargs)``; or ``checkpoint_io=`` /
    ``plugins=[DcpEngineCheckpointIO(...)]`` for the IO.
    """

    def __init__(self, config: CheckpointConfig | None = None, **kwargs: Any) -> None:
        if "checkpoint_io" not in kwargs:
            kwargs["checkpoint_io"] = DcpEngineCheckpointIO(config or CheckpointConfig())
        elif config is not None:
            raise TypeError("pass config or checkpoint_io, not both")
        super().__init__(**kwargs)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        io = self.checkpoint_io
        if not isinstance(io, DcpEngineCheckpointIO):
            raise TypeError(
                f"{type(self).__name__} saves through DcpEngineCheckpointIO, not "
                f"{type(io).__name__}"
            )
        _no_storage_options(storage_options, type(self).__name__)
        io.save_on_every_rank(checkpoint, self.broadcast(filepath))


class DcpEngineModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 and tensor parallel, in ``configure_model``) whose
    checkpoints go through the engine: each rank writes its shards of the module and the
    optimizers asynchronously, and a load reshards to the current world size.

    ``DcpEngineModelParallelStrategy(config, **model_parallel_kwargs)``. The checkpoint
    dict's ``state_dict`` and ``optimizer_states`` stay empty: the engine reads the module
    and the optimizers themselves, so ``on_save_checkpoint`` hooks do not see them.
    """

    def __init__(self, config: CheckpointConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = LightningEngine(config or CheckpointConfig())

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the engine reads the module at the save: no extra copy

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return {}  # the engine reads the optimizers at the save: no extra copy

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        _no_storage_options(storage_options, type(self).__name__)
        self.engine.save(checkpoint, self.broadcast(filepath), lambda: self._state(checkpoint))

    def _state(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in checkpoint.items() if k not in payload.HEAVY}
        with_optimizers = "optimizer_states" in checkpoint
        return {**self._objects(with_optimizers), **payload.app_state(rest)}

    def _objects(self, with_optimizers: bool) -> dict[str, Any]:
        assert self.model is not None
        objects: dict[str, Any] = {"model": self.model}
        if with_optimizers:
            objects.update({f"optimizer_{i}": o for i, o in enumerate(self.optimizers)})
        return objects

    def load_checkpoint(
        self, checkpoint_path: _PATH, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        assert self.lightning_module is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING

        def objects(removed: tuple[str, ...]) -> dict[str, Any]:
            return self._objects(fitting and "optimizer_states" not in removed)

        loaded = self.engine.load(path, into=objects, weights_only=weights_only)
        if loaded is None:
            return super().load_checkpoint(os.fspath(path), weights_only)
        return loaded

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.engine.remove(filepath)

    def teardown(self) -> None:
        try:
            self.engine.close()
        finally:
            super().teardown()


def load_checkpoint(path: _PATH, map_location: Any | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict a name file (``last.ckpt``) stands for, read in this
    process without a Trainer (e.g. to evaluate, or to export with ``torch.save``)."""
    return DcpEngineCheckpointIO().load_checkpoint(path, map_location)


__all__ = [
    "DcpEngineCheckpointIO",
    "DcpEngineDDPStrategy",
    "DcpEngineModelParallelStrategy",
    "load_checkpoint",
]
