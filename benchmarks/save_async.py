"""Async saves: dcp-engine next to its peers, on one training state, in one run.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.save_async throughput
    torchrun --standalone --nproc_per_node=2 -m benchmarks.save_async stall

The state is an FSDP2 MLP trained one step with AdamW (parameters + two moments), about
``--mib-per-rank`` MiB per rank, pre-faulted. Every method saves the same state; after one
warm-up save, the median of ``--reps`` saves is reported (the slowest rank's time).

``throughput`` (idle between saves), per method: blocking ms (until the call returns),
time until committed (durable), GB/s, extra memory (PSS of the rank and its children, so
shared memory is not counted twice) after the first and the last save (the engine's
methods save ``--growth-saves`` times, to show whether that memory grows).
Methods: ``copy`` (T_copy, one copy into reused buffers), ``raw_write`` (the same bytes,
one file per rank, fsync: the storage floor), ``torch_save`` (gathered to rank 0, +fsync),
``dcp_save``, ``dcp_async_save`` (as shipped), ``dcp_async_save_stager`` (with a reused
``DefaultStager``), ``engine_thread``, ``engine_process``, ``engine_overlap`` (process +
overlapped staging), each after the start-up ``load()`` of a fresh run (which allocates the
staging buffers), and ``engine_process_cold`` without it.

``stall`` (training between saves): per mode, the median training step in the
``--window`` steps after each save against the median step without saves, and the
save's time until committed while training runs.

Run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``make bench`` does): otherwise glibc keeps
freed large buffers of one method in its heap for the next, and the memory columns lie.

Results: ``benchmarks/results/save_async_<cmd>.json`` and ``.md`` (and ``.png`` where
matplotlib is installed). Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any, cast

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dcp_engine as de

HIDDEN = 2048
BATCH = 16


# ----------------------------------------------------------------------------- the state


def build(mib_per_rank: float) -> dict[str, Any]:
    world = dist.get_world_size()
    per_layer_per_rank = HIDDEN * HIDDEN * 4 * 3 / world  # fp32 weight + two Adam moments
    n_layers = max(2, round(mib_per_rank * 2**20 / per_layer_per_rank))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(n_layers)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    app = {"model": model, "optim": optim}
    train_step(app)  # creates (and touches) the optimizer state
    return app


def train_step(app: dict[str, Any]) -> float:
    start = time.perf_counter()
    x = torch.randn(BATCH, HIDDEN)
    app["model"](x).square().mean().backward()
    app["optim"].step()
    app["optim"].zero_grad(set_to_none=False)
    return time.perf_counter() - start


def local_tensors(app: dict[str, Any]) -> list[torch.Tensor]:
    out = [p.to_local().detach() for p in app["model"].parameters()]
    for st in app["optim"].state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                out.append(t.to_local() if isinstance(t, DTensor) else t)
    return out


def pss_bytes() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


# ----------------------------------------------------------------------------- methods


class Method:
    """``start()`` returns when the caller could go on; ``done()`` when durable."""

    name = ""

    def __init__(self, app: dict[str, Any], root: Path) -> None:
        self.app, self.root, self.n = app, root, 0

    def start(self) -> None: ...

    def done(self) -> None: ...

    def cleanup(self) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            for p in self.root.glob("*"):
                if p.is_dir() and p.name != "engine":
                    shutil.rmtree(p)
            for p in (self.root / "engine").glob("*/checkpoints/step_*"):
                shutil.rmtree(p)
        dist.barrier()

    def close(self) -> None: ...


class Copy(Method):
    name = "copy"

    def __init__(self, app: dict[str, Any], root: Path) -> None:
        super().__init__(app, root)
        self.src = local_tensors(app)
        self.dst = [torch.empty_like(t).zero_() for t in self.src]

    def start(self) -> None:
        for d, s in zip(self.dst, self.src, strict=True):
            d.copy_(s)


class RawWrite(Method):
    name = "raw_write"

    def start(self) -> None:
        d = self.root / f"raw{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank{dist.get_rank()}.bin", "wb") as f:
            for t in local_tensors(self.app):
                f.write(t.numpy().data)
            f.flush()
            os.fsync(f.fileno())
        self.n += 1


class TorchSave(Method):
    name = "torch_save"

    def start(self) -> None:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(self.app["model"], self.app["optim"], options=opts)
        if dist.get_rank() == 0:
            with open(self.root / f"full{self.n}.pt", "wb") as f:
                torch.save({"model": msd, "optim": osd}, f)
                f.flush()
                os.fsync(f.fileno())
        self.n += 1

    def cleanup(self) -> None:
        if dist.get_rank() == 0:
            for p in self.root.glob("full*.pt"):
                p.unlink()
        super().cleanup()


def dcp_state(app: dict[str, Any]) -> dict[str, Any]:
    msd, osd = get_state_dict(app["model"], app["optim"])
    return {"model": msd, "optim": osd}


class DcpSave(Method):
    name = "dcp_save"

    def start(self) -> None:
        dcp.save(dcp_state(self.app), checkpoint_id=self.root / f"dcp{self.n}")
        self.n += 1


_SIDE_GROUP: dist.ProcessGroup | None = None


def side_group() -> dist.ProcessGroup:
    """A gloo group for dcp.async_save's collectives, as DCP's docs advise: on the default
    group its background collectives interleave with training's, and the run hangs (it
    does here, with FSDP2 on gloo)."""
    global _SIDE_GROUP
    if _SIDE_GROUP is None:
        _SIDE_GROUP = dist.new_group(backend="gloo")
    return _SIDE_GROUP


class DcpAsyncSave(Method):
    name = "dcp_async_save"
    stager: Any = None

    def start(self) -> None:
        kwargs = {"async_stager": self.stager} if self.stager is not None else {}
        self.future = dcp.async_save(
            dcp_state(self.app), checkpoint_id=self.root / f"dcpa{self.n}",
            process_group=side_group(), **kwargs,
        )  # fmt: skip
        self.n += 1

    def done(self) -> None:
        f = self.future
        (f.upload_completion if hasattr(f, "upload_completion") else f).result()

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


class DcpAsyncSaveStager(DcpAsyncSave):
    name = "dcp_async_save_stager"

    def __init__(self, app: dict[str, Any], root: Path) -> None:
        super().__init__(app, root)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(StagingOptions(False, False, False, False))


class Engine(Method):
    """The engine as a run uses it: ``load()`` at start-up (a fresh run's finds nothing,
    and allocates the staging buffers), then ``save``/``wait``."""

    mode, staging, cold = "thread", "sync", False

    def __init__(self, app: dict[str, Any], root: Path) -> None:
        super().__init__(app, root)
        cfg = de.CheckpointConfig(
            root_dir=str(root / "engine"), experiment_name=self.name, async_mode=self.mode,
            staging=self.staging, capture_rng=False,
        )  # fmt: skip
        self.mgr = de.CheckpointManager(cfg)
        if not self.cold:
            assert self.mgr.load(self.app) is None

    def start(self) -> None:
        self.mgr.save(self.n, self.app)
        self.n += 1

    def done(self) -> None:
        self.mgr.wait()

    def close(self) -> None:
        self.mgr.close()


class EngineThread(Engine):
    name, mode = "engine_thread", "thread"


class EngineProcess(Engine):
    name, mode = "engine_process", "process"


class EngineOverlap(Engine):
    name, mode, staging = "engine_overlap", "process", "overlap"


class EngineProcessCold(EngineProcess):
    """Process mode without the start-up ``load()``: the first save allocates the pool."""

    name, cold = "engine_process_cold", True


THROUGHPUT = [Copy, RawWrite, TorchSave, DcpSave, DcpAsyncSave, DcpAsyncSaveStager,
              EngineThread, EngineProcess, EngineOverlap, EngineProcessCold]  # fmt: skip
STALL = [RawWrite, DcpAsyncSave, DcpAsyncSaveStager, EngineThread, EngineProcess, EngineOverlap]


def slowest(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ----------------------------------------------------------------------------- runs


def run_throughput(app: dict[str, Any], root: Path, reps: int, growth: int) -> dict[str, Any]:
    rows = []
    for cls in THROUGHPUT:
        gc.collect()
        base = pss_bytes()
        method = cls(app, root)
        blocking, committed, extra = [], [], []
        # The engine saves `growth` times, to see its memory over many saves; the timings
        # are the medians of the `reps` saves after the warm-up, alike for every method.
        n_saves = max(reps + 1, growth) if issubclass(cls, Engine) else reps + 1
        for i in range(n_saves):
            dist.barrier()
            t0 = time.perf_counter()
            method.start()
            t1 = time.perf_counter()
            method.done()
            t2 = time.perf_counter()
            blocking.append(slowest(t1 - t0))
            committed.append(slowest(t2 - t0))
            extra.append(slowest(pss_bytes() - base))
            method.cleanup()
            if dist.get_rank() == 0:
                print(f"{cls.name} #{i}: blocking {blocking[-1] * 1e3:.1f} ms, "
                      f"committed {committed[-1]:.3f} s", flush=True)  # fmt: skip
        method.close()
        del method  # its buffers must not count in the next method's baseline
        rows.append({
            "method": cls.name,
            "first_blocking_s": blocking[0],
            "blocking_s": statistics.median(blocking[1 : reps + 1]),
            "committed_s": statistics.median(committed[1 : reps + 1]),
            "runs_blocking_s": blocking[1:],
            "runs_committed_s": committed[1:],
            "saves": n_saves,
            "extra_pss_first_bytes": extra[0],
            "extra_pss_last_bytes": extra[-1],
        })  # fmt: skip
    return {"rows": rows}


class Waiter:
    """``method.done()`` in a thread: the time the save became durable."""

    def __init__(self, method: Method) -> None:
        self.at, self.error = 0.0, cast(BaseException | None, None)
        self.thread = threading.Thread(target=self._run, args=(method,), daemon=True)
        self.thread.start()

    def _run(self, method: Method) -> None:
        try:
            method.done()
        except BaseException as e:
            self.error = e
        self.at = time.perf_counter()

    def join(self) -> float:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.at


def run_stall(app: dict[str, Any], root: Path, saves: int, window: int) -> dict[str, Any]:
    for _ in range(3):
        train_step(app)
    base = [slowest(train_step(app)) for _ in range(saves * window)]
    if dist.get_rank() == 0:
        print(f"step without saves: {statistics.median(base):.3f} s", flush=True)
    rows = []
    for cls in STALL:
        method = cls(app, root)
        method.start()  # warm-up save, not measured
        method.done()
        after, committed = [], []
        for _ in range(saves):
            dist.barrier()
            t0 = time.perf_counter()
            method.start()
            blocked = time.perf_counter() - t0
            waiter = Waiter(method)  # learns when the save is durable, while training runs
            steps = [train_step(app) for _ in range(window)]
            steps[0] += blocked  # the save stalls the step it precedes
            committed.append(slowest(waiter.join() - t0))
            after.extend(slowest(s) for s in steps)
            method.cleanup()
        method.close()
        rows.append({
            "method": cls.name,
            "step_after_save_s": statistics.median(after),
            "step_without_saves_s": statistics.median(base),
            "ratio": statistics.median(after) / statistics.median(base),
            "committed_while_training_s": statistics.median(committed),
            "runs_step_after_save_s": after,
        })  # fmt: skip
        if dist.get_rank() == 0:
            print(f"{cls.name}: step after save {rows[-1]['ratio']:.3f} x", flush=True)
    return {"rows": rows, "window": window, "saves": saves}


# ----------------------------------------------------------------------------- report


def report(cmd: str, result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    total = result["state_bytes_total"]
    lines = [f"# save_async {cmd}: {result['state_bytes_per_rank'] / 2**20:.0f} MiB per rank, "
             f"{result['world_size']} ranks, median of {result['reps']} ({result['machine']}, "
             f"torch {result['torch']})", ""]  # fmt: skip
    if cmd == "throughput":
        rows = {r["method"]: r for r in result["rows"]}
        t_copy, raw = rows["copy"]["blocking_s"], rows["raw_write"]["committed_s"]
        lines += ["| method | blocking ms | first blocking ms | blocking / (1.25 T_copy + 5 ms) "
                  "| committed s | GB/s | vs raw write | extra PSS first / last MiB (saves) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["rows"]:
            gbps = total / r["committed_s"] / 1e9
            mem = (r["extra_pss_first_bytes"] / 2**20, r["extra_pss_last_bytes"] / 2**20)
            lines.append(
                f"| {r['method']} | {r['blocking_s'] * 1e3:.1f} "
                f"| {r['first_blocking_s'] * 1e3:.1f} "
                f"| {r['blocking_s'] / (1.25 * t_copy + 0.005):.2f} | {r['committed_s']:.3f} "
                f"| {gbps:.2f} | {raw / r['committed_s']:.0%} "
                f"| {mem[0]:.0f} / {mem[1]:.0f} ({r['saves']}) |"
            )
        lines += ["", "GB/s: the whole state's bytes over the time until committed (slowest rank). "
                  "`vs raw write`: the storage floor's time over the method's (100% = as fast as "
                  "writing the bytes with fsync)."]  # fmt: skip
    else:
        raw = {r["method"]: r for r in result["rows"]}["raw_write"]["committed_while_training_s"]
        lines += ["| method | step after save s | step without saves s | ratio | committed while "
                  "training s | vs raw write |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["rows"]:
            lines.append(f"| {r['method']} | {r['step_after_save_s']:.3f} | "
                         f"{r['step_without_saves_s']:.3f} | {r['ratio']:.3f} | "
                         f"{r['committed_while_training_s']:.3f} | "
                         f"{raw / r['committed_while_training_s']:.0%} |")  # fmt: skip
        lines += ["", f"Window: the {result['window']} steps after each of {result['saves']} "
                  "saves; the blocking part of a save is added to the step after it. "
                  "`raw_write` blocks (it is the storage floor: the same bytes written and "
                  "fsynced by the training thread)."]  # fmt: skip
    (out / f"save_async_{cmd}.json").write_text(json.dumps(result, indent=1))
    (out / f"save_async_{cmd}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(cmd, result, out)


def plot(cmd: str, result: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r["method"] for r in result["rows"]]
    key = "blocking_s" if cmd == "throughput" else "ratio"
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, [r[key] * (1e3 if cmd == "throughput" else 1) for r in result["rows"]])
    ax.set_xlabel("blocking ms" if cmd == "throughput" else "step after save / step")
    fig.tight_layout()
    fig.savefig(out / f"save_async_{cmd}.png")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["throughput", "stall"])
    p.add_argument("--mib-per-rank", type=float, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--growth-saves", type=int, default=20)
    p.add_argument("--dir", default="/tmp/dcp_engine_bench_async")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    root = Path(args.dir)
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    side_group()  # collective: created by every rank, before any method runs
    app = build(args.mib_per_rank)
    per_rank = sum(t.numel() * t.element_size() for t in local_tensors(app))
    sizes: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, per_rank)
    if args.cmd == "throughput":
        result = run_throughput(app, root, args.reps, args.growth_saves)
    else:
        result = run_stall(app, root, args.reps, args.window)
    result.update(
        benchmark=f"save_async {args.cmd}", world_size=dist.get_world_size(), reps=args.reps,
        state_bytes_per_rank=per_rank, state_bytes_total=sum(sizes), torch=torch.__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        model_state_bytes_per_rank=sum(
            t.to_local().numel() * 4 for t in get_model_state_dict(app["model"]).values()
        ),
    )  # fmt: skip
    if dist.get_rank() == 0:
        report(args.cmd, result, Path(args.out))
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
