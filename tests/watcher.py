"""A reader that polls an experiment while it is being written and collected, from
another process: at every instant some committed checkpoint must exist and load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

import dcp_engine as de
from dcp_engine import layout, resolve


def watch(experiment: str, stop_file: str, out: Any) -> None:
    """Poll until ``stop_file`` exists; put the tallies on the queue ``out``."""
    exp = layout.ExperimentLayout(Path(experiment))
    tally = {"polls": 0, "loads": 0, "empty": 0, "vanished": 0, "bad": [], "steps": set()}
    seen_commit = False
    while not Path(stop_file).exists():
        tally["polls"] += 1
        committed = resolve.scan(exp).committed
        if not committed:
            # A listing races with renames: count it only if a stable second look agrees.
            names = sorted(p.name for p in exp.checkpoints_dir.glob("*")) if seen_commit else []
            again = sorted(p.name for p in exp.checkpoints_dir.glob("*")) if seen_commit else []
            if seen_commit and names == again and not resolve.scan(exp).committed:
                tally["empty"] += 1
            time.sleep(0.002)
            continue
        seen_commit = True
        newest = committed[-1]
        try:
            w = de.open_checkpoint(newest.path).load_entries(["w"])["w"]
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            if not newest.path.exists():
                tally["vanished"] += 1  # collected after we listed it: a newer one exists
            else:
                tally["bad"].append(f"step {newest.step}: {type(e).__name__}: {e}")
            continue
        tally["loads"] += 1
        tally["steps"].add(newest.step)
        if not torch.equal(w, torch.full_like(w, float(newest.step))):
            tally["bad"].append(f"step {newest.step}: w is {w[:3].tolist()}...")
    tally["steps"] = sorted(tally["steps"])
    out.put(tally)
