"""Rank functions of the fault suite (importable by spawned processes)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

import dcp_engine as de


def state(step: int) -> dict[str, Any]:
    """What is saved at ``step``: values that say which step they belong to."""
    return {"w": torch.full((4096,), float(step)), "b": torch.arange(64) + step, "step": step}


def save_two(
    rank: int, world_size: int, root: str, mode: str, timeout_s: float,
    faults: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Save step 1, then try step 2 (a fault may strike there): how step 2 ended here.
    ``faults[rank]``: this rank's seams (``storage=``, ``hook=``)."""
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="faults", async_mode=mode, timeout_s=timeout_s
    )
    mgr = de.CheckpointManager(cfg, **(faults or {}).get(rank, {}))
    mgr.save(1, state(1))
    mgr.wait()
    start = time.monotonic()
    error = None
    try:
        mgr.save(2, state(2))
        mgr.wait()
    except de.CheckpointError as e:
        error = str(e)
    elapsed = time.monotonic() - start
    try:
        mgr.save(3, state(3))  # the next save after a failure
        mgr.wait()
        third = None
    except de.CheckpointError as e:
        third = str(e)
    with contextlib.suppress(de.CheckpointError):
        mgr.close()
    return {"error": error, "elapsed": elapsed, "third": third}


def load_latest(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A fresh job: resume from latest; what it loaded, checked against what was saved."""
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="faults", async_mode="off")
    app = {"w": torch.zeros(4096), "b": torch.zeros(64, dtype=torch.long), "step": -1}
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load(app)
        steps = [c.step for c in mgr.checkpoints()]
    assert info is not None, "no committed checkpoint to resume from"
    expected = state(info.step)
    assert app["step"] == info.step
    assert torch.equal(app["w"], expected["w"]) and torch.equal(app["b"], expected["b"])
    return {"step": info.step, "steps": steps}


def preempted(rank: int, world_size: int, root: str, double: bool) -> dict[str, Any]:
    """A callback loop with save_on_sigterm; the last rank gets SIGTERM before the end of
    step 3 (twice if ``double``). Never returns normally if the preemption works."""
    import os
    import signal

    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="faults", async_mode="thread", save_on_sigterm=True,
        save_every_n_steps=1000, save_on_train_end=False, timeout_s=20,
    )  # fmt: skip
    cb = de.CheckpointCallback(cfg)
    app = state(0)
    cb.on_train_start(app)
    for step in range(1, 30):
        fresh = state(step)
        app["w"].copy_(fresh["w"])
        app["b"].copy_(fresh["b"])
        app["step"] = step
        if step == 3 and rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
            if double:
                os.kill(os.getpid(), signal.SIGTERM)
        cb.on_step_end(step, app)
        time.sleep(0.02)
    cb.on_train_end(app)
    return {"finished": True}
