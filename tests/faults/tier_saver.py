"""A job with a local tier whose upload of step 2 is SIGKILLed once every file is up but
before the remote marker: ``python -m tests.faults.tier_saver LOCAL ROOT``. Prints the
step of each local commit."""

from __future__ import annotations

import sys

import dcp_engine as de
from tests.faults.ranks import state
from tests.seams import KillAt

if __name__ == "__main__":
    local, root = sys.argv[1], sys.argv[2]
    cfg = de.CheckpointConfig(root_dir=root, local_dir=local, experiment_name="tiered",
                              async_mode="thread", timeout_s=30)  # fmt: skip
    mgr = de.CheckpointManager(cfg, hook=KillAt("upload:files", step=2))
    mgr.save(1, state(1)).result()
    assert mgr.wait_uploads(60)
    print(1, flush=True)
    mgr.save(2, state(2)).result()  # committed locally; its upload dies
    print(2, flush=True)
    mgr.wait_uploads(60)
    raise SystemExit("the upload of step 2 was not killed")
