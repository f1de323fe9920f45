"""A process that resumes and then saves forever (keep_last_n=1, async): the victim of
the kill loop. ``python -m tests.faults.saver ROOT MODE``; prints each step it saved."""

from __future__ import annotations

import sys

import dcp_engine as de
from tests.faults.ranks import state

if __name__ == "__main__":
    root, mode = sys.argv[1], sys.argv[2]
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="faults", async_mode=mode, keep_last_n=1, timeout_s=30
    )
    app = state(0)
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load(app)
        step = info.step if info is not None else 0
        while True:
            step += 1
            fresh = state(step)
            app["w"].copy_(fresh["w"])
            app["b"].copy_(fresh["b"])
            app["step"] = step
            handle = mgr.save(step, app)
            if info is None and step == 1:
                # A fresh experiment: the kills start once there is something to lose (the
                # writer process may still be starting when the first save is staged).
                handle.result()
            print(step, flush=True)
