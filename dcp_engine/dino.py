"""``save_checkpoint`` and ``load_checkpoint`` with the names and arguments of the DINO
checkpointing guide (its ``dino.utils``), on top of ``CheckpointManager``.

A checkpoint is a directory of shards written by every rank, not one ``.pth`` file:

- ``save_checkpoint(path, ...)``: ``path`` names the experiment (a directory, whatever
  its name: ``checkpoints/my_checkpoint.pth`` works as written); the checkpoint is
  committed as ``path/checkpoints/step_<iteration>`` and ``latest`` moves to it (``best``
  too, by ``config["checkpoint"]["monitor"]`` when the training config names one);
- ``load_checkpoint(path, ...)``: ``path`` is a checkpoint directory, an alias
  (``.../checkpoints/latest``, ``best``), an experiment (its latest), or one of the
  guide's file names (``checkpoints/checkpoint_latest.pth``, ``checkpoint_epoch_0050.pth``:
  ``spellings.py``).

The guide's entries map to ``student``, ``teacher``, ``optimizer``, ``dino_loss`` (whose
``center`` buffer is the guide's ``dino_loss_center``) in the checkpoint, and ``epoch``,
``iteration`` (the step), ``metrics``, ``config`` and ``timestamp`` in its marker. Both
are collective: every rank calls them, as with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .callbacks import LOOP_KEY, loop_position
from .config import CheckpointConfig
from .config_checks import MODES
from .index import CheckpointInfo
from .location import as_location
from .manager import CheckpointManager
from .reader import open_checkpoint

CONFIG_KEY = "config"  # in the marker's extra: the training config


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    epoch: int,
    iteration: int,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    **state: Any,
) -> CheckpointInfo:
    """Write and commit a checkpoint of the DINO state (plus any ``state`` entries: a
    scaler, a sampler) into experiment ``path``; returns it once committed. ``epoch`` is
    the one completed (the training loop goes on with ``epoch + 1``)."""
    exp = as_location(path)  # a local path or a URL (s3://...)
    monitor, mode = _monitor_of(config)
    cfg = CheckpointConfig(root_dir=str(exp.parent), experiment_name=exp.name,
                           async_mode="off", monitor=monitor, mode=mode)  # fmt: skip
    app = {"student": student, "teacher": teacher, "optimizer": optimizer, "dino_loss": loss_fn}
    app.update(state)
    extra = {CONFIG_KEY: dict(config or {}), LOOP_KEY: loop_position(iteration, epoch, True)}
    with CheckpointManager(cfg, run_config=config) as mgr:
        return mgr.save(iteration, app, epoch=epoch, metrics=metrics, extra=extra).result()


def _monitor_of(config: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """The metric the training config ranks by (``checkpoint.monitor``/``mode``), if any."""
    block = (config or {}).get("checkpoint")
    monitor = block.get("monitor") if isinstance(block, Mapping) else None
    if not isinstance(monitor, str) or not monitor:
        return None, "min"
    mode = block.get("mode") if isinstance(block, Mapping) else None
    return monitor, mode if mode in MODES else "min"


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: nn.Module | None = None,
    **state: Any,
) -> dict[str, Any]:
    """Restore what is given from checkpoint ``path`` (nothing changes if any of it fails)
    and return the guide's dict: ``epoch``, ``iteration``, ``config``, ``metrics``,
    ``timestamp`` and the checkpoint's ``path``, plus ``epoch_done``: False for a
    checkpoint the training loop saved in the middle of ``epoch`` (then the next epoch to
    run is ``epoch`` itself, not the guide's ``epoch + 1``). The RNG states are not
    restored: use the training loop's resume for a bit-exact continuation. Read through
    ``open_checkpoint``: it never writes, so it may run beside a job saving there."""
    given = {"student": student, "teacher": teacher, "optimizer": optimizer, "dino_loss": loss_fn}
    app = {k: v for k, v in given.items() if v is not None}
    app.update(state)
    if not app:
        raise ValueError(
            "load_checkpoint: pass at least one of student, teacher, optimizer, loss_fn"
        )
    if optimizer is not None and student is None:
        raise ValueError(
            "load_checkpoint: the optimizer's state is keyed by the student's "
            "parameter names; pass student= too"
        )
    with open_checkpoint(path) as ckpt:
        info = ckpt.load(app)
    trainer = info.extra.get(LOOP_KEY, {})
    return {
        "epoch": info.epoch if info.epoch is not None else trainer.get("epoch", 0),
        "epoch_done": bool(trainer.get("epoch_done", True)),
        "iteration": info.step,
        "config": info.extra.get(CONFIG_KEY, {}),
        "metrics": dict(info.metrics),
        "timestamp": dt.datetime.fromtimestamp(info.created, dt.timezone.utc).isoformat(),
        "path": str(info.path),
    }


__all__ = ["CONFIG_KEY", "load_checkpoint", "save_checkpoint"]
