"""A toy FSDP2 training job that checkpoints through dcp-engine (the demo until DINO lands).

    torchrun --standalone --nproc_per_node=2 launch/toy_fsdp.py --root ./demo_runs \
        --experiment run --steps 40 --save-every 10 [--kill-at-step 25] [--resume latest]

The model has dropout and the data comes from the global RNG, so a resume is bit-exact
only if the model, AdamW moments, scheduler, loss centre *and* every rank's RNG state are
restored. ``--kill-at-step`` SIGKILLs the last rank mid-training (not a clean exit).
``--out`` receives rank 0's SHA-256 of the final full state.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dcp_engine as de

log = logging.getLogger("toy_fsdp")


def build(hidden: int) -> dict:
    torch.manual_seed(0)  # same init on every rank
    model = nn.Sequential(
        nn.Linear(32, hidden), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(hidden, 16),
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.04)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=1000)
    return {"model": model, "optim": optim, "sched": sched, "center": torch.zeros(16), "step": 0}


def train_step(app: dict) -> float:
    x = torch.randn(64, 32)  # global RNG: restored per rank on resume
    out = app["model"](x)
    loss = (out - app["center"]).pow(2).mean()
    loss.backward()
    app["optim"].step()
    app["optim"].zero_grad()
    app["sched"].step()
    batch_center = out.detach().mean(0)
    dist.all_reduce(batch_center)
    app["center"].mul_(0.9).add_(0.1 * batch_center / dist.get_world_size())
    return loss.item()


def state_digest(app: dict) -> str:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(app["model"], app["optim"], options=opts)
    buf = io.BytesIO()
    torch.save({"model": msd, "optim": osd, "center": app["center"]}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="./demo_runs")
    p.add_argument("--experiment", default="toy_fsdp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--resume", default="", help="'latest', 'best', a step or a path")
    p.add_argument("--out", default=None, help="file for rank 0's digest of the final state")
    p.add_argument("--async-mode", default="process", choices=["off", "thread", "process"])
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(message)s")  # fmt: skip
    torch.manual_seed(1234 + rank)  # per-rank data and dropout streams

    app = build(args.hidden)
    cfg = de.CheckpointConfig(
        root_dir=args.root, experiment_name=args.experiment, monitor="loss",
        async_mode=args.async_mode,
    )  # fmt: skip
    with de.CheckpointManager(cfg) as mgr:
        if args.resume:
            which = int(args.resume) if args.resume.isdigit() else args.resume
            info = mgr.load(app, which)
            log.info("resumed from %s", "nothing (fresh run)" if info is None else info.path)
        start, t0 = app["step"], time.perf_counter()
        for step in range(start + 1, args.steps + 1):
            loss = train_step(app)
            app["step"] = step
            last_rank = rank == dist.get_world_size() - 1
            if step == args.kill_at_step and last_rank:
                print(f"[rank{rank}] SIGKILL at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if step % 10 == 0:
                log.info("step %d loss %.5f (%.1f steps/s)", step, loss,
                         (step - start) / (time.perf_counter() - t0))  # fmt: skip
            if step % args.save_every == 0 or step == args.steps:
                mgr.save(step, app, metrics={"loss": loss})
        mgr.wait()  # the last save is committed (async writers)
        digest = state_digest(app)
        if rank == 0:
            print("step   bytes        blocked_ms  GB/s")
            for s in mgr.stats():
                print(f"{s.step:<6} {s.bytes:<12} {s.blocked_s * 1e3:<11.1f} {s.gbps:.3f}")
            print("committed checkpoints:", [c.path.name for c in mgr.checkpoints()])
            print(f"final state sha256 {digest}")
            if args.out:
                with open(args.out, "w") as f:
                    f.write(digest + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
