"""PyTorch Lightning checkpointed by dcp-engine (docs/lightning.md). Run it twice:

    python launch/examples/lightning_example.py --epochs 2                  # train
    python launch/examples/lightning_example.py --epochs 3 --resume last    # continue

``--devices 2`` runs DDP on the CPU (Lightning starts the second process by running this
script again), ``--strategy fsdp2`` shards the model with FSDP2 (ModelParallelStrategy).
Checkpoints: ``<root>/experiments/lightning_example/`` (the engine's experiment) and
``<root>/checkpoints/*.ckpt`` (ModelCheckpoint's names for them).
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import dcp_engine as de
from dcp_engine.integrations.lightning import (
    DcpEngineCheckpointIO,
    DcpEngineDDPStrategy,
    DcpEngineModelParallelStrategy,
)


class Regressor(L.LightningModule):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def configure_model(self) -> None:
        if self.hparams.shard:  # FSDP2: each rank keeps a shard of every parameter
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)


class Report(Callback):
    """Says where a resumed run starts, and what is kept at the end (rank 0)."""

    def __init__(self, resume: str | None) -> None:
        self.resume = resume

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.resume and trainer.is_global_zero:
            name = os.path.basename(str(trainer.ckpt_path))
            print(f"resumed from {name} at epoch {trainer.current_epoch}, "
                  f"global step {trainer.global_step}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="lightning_run", help="where everything is written")
    p.add_argument("--epochs", type=int, default=2, help="train until this many epochs")
    p.add_argument("--resume", default=None, help="'last', or a path ModelCheckpoint saved")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (2+: DDP)")
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    args = p.parse_args()

    config = de.CheckpointConfig(
        root_dir=os.path.join(args.root, "experiments"),
        experiment_name="lightning_example",
        async_mode="thread",  # "process" (the default) writes from a process of its own
    )
    kw: dict = {}
    if args.strategy == "fsdp2":
        kw["strategy"] = DcpEngineModelParallelStrategy(
            config, data_parallel_size=args.devices, tensor_parallel_size=1
        )
    elif args.devices > 1:
        kw["strategy"] = DcpEngineDDPStrategy(config)  # every rank writes its share
    else:
        kw["plugins"] = [DcpEngineCheckpointIO(config)]
    best = ModelCheckpoint(
        dirpath=os.path.join(args.root, "checkpoints"),
        save_top_k=2,
        monitor="val_loss",
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        callbacks=[best, Report(args.resume)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    torch.manual_seed(0)
    model = Regressor(shard=args.strategy == "fsdp2")
    trainer.fit(model, data(64), data(16), ckpt_path=args.resume)
    if trainer.is_global_zero:
        kept = de.find_checkpoints(os.path.join(args.root, "experiments", "lightning_example"))
        print("best:", os.path.basename(best.best_model_path), "| engine keeps steps",
              sorted(c.step for c in kept), flush=True)  # fmt: skip


if __name__ == "__main__":  # Lightning (DDP) and the engine's writers run this file again
    main()
