"""The fault suite's shared scenarios: the state each step saves, and the rank bodies
that the kill, disk and preemption tests run (``@multirank``) before and after a fault."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

import dcp_engine as de
from tests.distributed import multirank


def state(step: int) -> dict[str, Any]:
    """What is saved at ``step``: values that say which step they belong to."""
    return {"w": torch.full((4096,), float(step)), "b": torch.arange(64) + step, "step": step}


@multirank(2)
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


@multirank(2)
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
