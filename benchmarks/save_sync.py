"""Synchronous save of a sharded state: dcp-engine next to its peers, in one run.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.save_sync [--gib 1] [--reps 5]

The state is an FSDP2 model of ``--gib`` GiB of fp32 parameters in total (each rank holds
its shard), pre-faulted. After one warm-up save of each method, the median of ``--reps``
saves is reported per method:

- ``copy``: one copy of this rank's shards into a reused buffer (the floor of a blocking save);
- ``raw_write``: this rank's bytes written to one file and fsynced (the storage floor);
- ``torch_save``: the full state gathered to rank 0, ``torch.save`` + fsync there;
- ``dcp_save``: ``torch.distributed.checkpoint.save`` (``sync_files=True``);
- ``engine``: ``CheckpointManager.save`` (DCP write + marker + rename + fsyncs + index).

Writes ``benchmarks/results/save_sync.json`` and ``.md``. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dcp_engine as de

LAYER = 4096  # one Linear(4096, 4096) without bias: 64 MiB of fp32


def build_model(gib: float) -> nn.Module:
    n_layers = max(1, round(gib * 2**30 / (LAYER * LAYER * 4)))
    model = nn.Sequential(*(nn.Linear(LAYER, LAYER, bias=False) for _ in range(n_layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().fill_(1.0 + dist.get_rank())  # pre-fault every page
    return model


def local_bytes(model: nn.Module) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def timed(fn: Callable[[], Any], reps: int, cleanup: Callable[[], None]) -> list[float]:
    """Warm-up once, then ``reps`` timed runs; every rank starts together."""
    out = []
    for i in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        elapsed = time.perf_counter() - start
        cleanup()
        if i > 0:
            out.append(elapsed)
    return out


def fsync_write(path: Path, chunks: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in chunks:
            f.write(t.numpy().data)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0, help="total state size over all ranks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default="/tmp/dcp_engine_bench")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.dir)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()

    model = build_model(args.gib)
    shards = [p.to_local().detach() for p in model.parameters()]
    nbytes = local_bytes(model)
    buffers = [torch.empty_like(t) for t in shards]
    for b in buffers:
        b.fill_(0)

    def rm(path: Path) -> Callable[[], None]:
        def clean() -> None:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            dist.barrier()

        return clean

    results: dict[str, list[float]] = {}
    results["copy"] = timed(
        lambda: [b.copy_(s) for b, s in zip(buffers, shards, strict=True)], args.reps, lambda: None
    )
    raw = root / "raw"
    raw.mkdir(exist_ok=True)
    results["raw_write"] = timed(
        lambda: fsync_write(raw / f"rank{rank}.bin", shards), args.reps, lambda: None
    )
    shutil.rmtree(raw, ignore_errors=True)

    full_path = root / "full.pt"

    def torch_save() -> None:
        sd = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            with open(full_path, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())

    results["torch_save"] = timed(torch_save, args.reps, lambda: full_path.unlink(missing_ok=True))

    dcp_dir = root / "dcp"
    results["dcp_save"] = timed(
        lambda: dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=dcp_dir),
        args.reps,
        rm(dcp_dir),
    )

    cfg = de.CheckpointConfig(
        root_dir=str(root), experiment_name="engine", capture_rng=False, async_mode="off"
    )
    mgr = de.CheckpointManager(cfg)
    counter = iter(range(10**6))
    engine_bytes: list[int] = []

    def engine_save() -> None:
        info = mgr.save(next(counter), {"model": model}).result()
        mine = sum(
            f.stat().st_size for f in info.path.glob(f"__{rank}_*.distcp")
        )  # this rank's shard files
        engine_bytes.append(mine)

    def engine_clean() -> None:
        dist.barrier()
        if rank == 0:
            for c in (root / "engine" / "checkpoints").glob("step_*"):
                shutil.rmtree(c)
        dist.barrier()

    results["engine"] = timed(engine_save, args.reps, engine_clean)
    mgr.close()

    gathered = [None] * world
    dist.all_gather_object(
        gathered, {"results": results, "bytes": nbytes, "file": engine_bytes[-1]}
    )
    if rank == 0:
        report(args, gathered, world)
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


def report(args: argparse.Namespace, per_rank: list[Any], world: int) -> None:
    # A method's time is the slowest rank's median (every rank must finish a save).
    methods = list(per_rank[0]["results"])
    med = {m: max(statistics.median(r["results"][m]) for r in per_rank) for m in methods}
    total = sum(r["bytes"] for r in per_rank)
    per_rank_bytes = per_rank[0]["bytes"]
    rows = []
    for m in methods:
        rows.append(
            {
                "method": m,
                "median_s": med[m],
                "runs_s": [max(r["results"][m][i] for r in per_rank) for i in range(args.reps)],
                "gb_per_s": total / med[m] / 1e9,  # aggregate over the ranks
                "vs_engine": med[m] / med["engine"],
            }
        )
    result = {
        "benchmark": "save_sync",
        "world_size": world,
        "state_bytes_total": total,
        "state_bytes_per_rank": per_rank_bytes,
        "engine_shard_file_bytes_per_rank": [r["file"] for r in per_rank],
        "reps": args.reps,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "save_sync.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# save_sync: {total / 2**30:.2f} GiB FSDP2 state on {world} ranks "
        f"({per_rank_bytes / 2**20:.0f} MiB per rank), median of {args.reps}",
        "",
        "| method | median s | aggregate GB/s | time vs engine |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['median_s']:.3f} | {r['gb_per_s']:.2f} | {r['vs_engine']:.2f} |"
        )
    lines.append("")
    lines.append(
        "GB/s: the whole state's bytes over the slowest rank's median time (ranks work in "
        "parallel). torch_save gathers the full state to rank 0 and writes it there."
    )
    (out / "save_sync.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
