"""Remote storage: dcp-engine on S3 next to DCP's fsspec writer and reader and a raw
PUT/GET of the same bytes, against one S3 API server that the run starts itself.

    python -m benchmarks.remote [--mib 128] [--reps 3]
    torchrun --standalone --nproc_per_node=2 -m benchmarks.remote [--mib 128] [--reps 3]

Rank 0 starts ``python -m moto.server`` on 127.0.0.1 (``tests/servers.py``), every rank
points botocore (so s3fs) at it through the ``AWS_*`` environment, and the ``train``
state of ``benchmarks/states.py`` (FSDP2 MLP + AdamW, about ``--mib`` MiB per rank) is
written and read back. Plain ``python`` runs one rank (a gloo group of one); torchrun any
number. Each round runs every method once, in turn (the first round is a warm-up), and
each figure is the median over ``--reps`` rounds of the slowest rank's time:

1. saves, until committed: ``raw_put`` (this rank's bytes in one ``s3fs.pipe_file``: a
   multipart upload of 50 MiB parts, up to 10 at once; the floor), ``dcp_save``
   (``dcp.save`` with ``FsspecWriter("s3://...")``; the peer), ``engine_off`` and
   ``engine_thread`` (``CheckpointManager.save`` with ``root_dir="s3://..."``; for the
   thread mode also the blocking time of ``save()``);
2. loads of the last round's checkpoints: ``raw_get`` (``s3fs.cat_file``; the floor),
   ``dcp_load`` (``FsspecReader``; ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``),
   ``engine_load`` (``mgr.load(app, which=step)``: every file's digest checked, the
   default) and ``engine_load_noverify`` (``verify=False``);
3. the local tier (``local_dir`` on local disk, ``root_dir`` on S3, thread mode), in the
   same rounds as 1: the blocking time of ``save()``, the local commit
   (``handle.result()``) and the remote one (``mgr.wait_uploads()`` after it), against
   ``engine_thread`` straight to S3.

A loopback moto server is not S3 (one Python process on the same cores, no network, no
per-request latency): only the ratios between methods of one run mean anything.
Results: ``<out>/remote.json``, ``.md``, ``.png``. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# Not exported by torch.distributed.checkpoint in torch 2.13: the module is private.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import dcp_engine as de
from tests.servers import free_port, make_bucket, moto_s3, s3_env

from . import plots
from .measure import MiB, describe, fmt, machine, median, save_figures, slowest, summed
from .measure import write as write_result
from .states import State, build

BUCKET = "dcp-engine-bench"
NOTE = (
    "A loopback moto server is not S3: one Python process on the same cores as the job, "
    "no network, no per-request latency, no S3 throughput limits. Only the ratios between "
    "methods of this run mean anything; the MB/s say nothing about a real object store."
)

# ----------------------------------------------------------------------------- saves


class Save:
    """One way of writing the state to S3: ``start()`` returns when the caller may go on
    (blocking), ``done()`` when the save is committed; ``cleanup()`` (every rank, after
    each save, untimed) deletes the save before the last one."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "peer"

    def __init__(self, state: State, s3: str, fs: Any) -> None:
        self.state, self.s3, self.fs, self.n = state, s3, fs, 0

    def start(self) -> None: ...

    def done(self) -> None: ...

    def cleanup(self) -> None:
        self.n += 1

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None: ...

    def _delete(self, url: str) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            self.fs.rm(url, recursive=True)
        dist.barrier()


class RawPut(Save):
    """This rank's tensors as one object, ``fs.pipe_file``: the floor."""

    name, kind = "raw_put", "floor"

    def __init__(self, state: State, s3: str, fs: Any) -> None:
        super().__init__(state, s3, fs)
        flat = [t.detach().reshape(-1).view(torch.uint8) for t in state.tensors()]
        self.blob = torch.cat(flat).numpy().tobytes()

    def url(self, n: int) -> str:
        return f"{self.s3}/raw/put{n}/rank{dist.get_rank()}.bin"

    def start(self) -> None:
        self.fs.pipe_file(self.url(self.n), self.blob)

    def cleanup(self) -> None:
        if self.n > 0:
            self._delete(f"{self.s3}/raw/put{self.n - 1}")
        super().cleanup()


class DcpSave(Save):
    """``dcp.save`` with the stock ``FsspecWriter`` (one file per rank, DCP's defaults)."""

    name = "dcp_save"

    def url(self, n: int) -> str:
        return f"{self.s3}/dcp/save{n}"

    def start(self) -> None:
        dcp.save(self.state.dcp_state(), storage_writer=FsspecWriter(self.url(self.n)))

    def cleanup(self) -> None:
        if self.n > 0:
            self._delete(self.url(self.n - 1))
        super().cleanup()


class Engine(Save):
    """``CheckpointManager.save`` with ``root_dir`` on S3 (``keep_last_n=1``: retention
    deletes the previous step; ``cleanup`` waits for it, untimed). Started as a run is:
    ``load()`` finds nothing and prepares the staging buffers."""

    kind = "engine"
    mode: ClassVar[str] = "off"

    def __init__(self, state: State, s3: str, fs: Any) -> None:
        super().__init__(state, s3, fs)
        self.mgr = de.CheckpointManager(self.config())
        self.handle: de.SaveHandle | None = None
        assert self.mgr.load(state.app) is None

    def config(self) -> de.CheckpointConfig:
        return de.CheckpointConfig(
            root_dir=f"{self.s3}/engine",
            experiment_name=self.name,
            async_mode=self.mode,
            capture_rng=False,
            keep_last_n=1,
        )

    def start(self) -> None:
        self.handle = self.mgr.save(self.n, self.state.app)

    def done(self) -> None:
        assert self.handle is not None
        self.handle.result()

    def cleanup(self) -> None:
        self.mgr.wait()  # retention's deletes, outside the timed part
        super().cleanup()

    def info(self) -> dict[str, Any]:
        return save_figures(self.handle)

    def close(self) -> None:
        self.mgr.close()


class EngineOff(Engine):
    name, mode = "engine_off", "off"


class EngineThread(Engine):
    name, mode = "engine_thread", "thread"


class EngineTier(Engine):
    """Thread mode with a local tier: ``done()`` is the local commit, ``uploaded()``
    the remote one (``wait_uploads``). The remote experiment keeps every step (no
    retention deletes in the background while the next method runs)."""

    name, mode = "engine_tier", "thread"
    local_dir: ClassVar[Path] = Path("/tmp")
    upload_timeout_s: ClassVar[float] = 600.0

    def config(self) -> de.CheckpointConfig:
        return de.CheckpointConfig(
            root_dir=f"{self.s3}/tier",
            local_dir=str(self.local_dir),
            local_keep_last_n=2,
            experiment_name=self.name,
            async_mode="thread",
            capture_rng=False,
        )

    def uploaded(self) -> None:
        if not self.mgr.wait_uploads(self.upload_timeout_s):
            raise RuntimeError(
                f"step {self.n}: wait_uploads({self.upload_timeout_s}) ran out on rank "
                f"{dist.get_rank()}"
            )

    def tiers(self) -> dict[int, list[str]]:
        return {e.step: list(e.tiers) for e in self.mgr.checkpoints()}


SAVES: list[type[Save]] = [RawPut, DcpSave, EngineOff, EngineThread, EngineTier]


def run_saves(
    state: State, s3: str, fs: Any, reps: int, local_dir: Path, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Save]]:
    """Rounds of every method in turn; round 0 is the warm-up. Returns the save rows, the
    local tier's figures and the methods (still open: the loads use their last saves)."""
    EngineTier.local_dir, EngineTier.upload_timeout_s = local_dir, timeout_s
    methods = {cls.name: cls(state, s3, fs) for cls in SAVES}
    keys = ("blocking", "committed", "uploaded")
    runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in methods}
    info: dict[str, dict[str, Any]] = {n: {} for n in methods}
    tier_tiers: dict[int, list[str]] = {}
    for i in range(reps + 1):
        for name, m in methods.items():
            gc.collect()
            dist.barrier()
            t0 = time.perf_counter()
            m.start()
            t1 = time.perf_counter()
            m.done()
            t2 = time.perf_counter()
            if isinstance(m, EngineTier):
                m.uploaded()
            t3 = time.perf_counter()
            times = {"blocking": t1 - t0, "committed": t2 - t0, "uploaded": t3 - t0}
            for k, v in times.items():
                runs[name][k].append(slowest(v))
            info[name] = m.info() or info[name]
            if isinstance(m, EngineTier):
                tier_tiers = m.tiers() if dist.get_rank() == 0 else tier_tiers
            m.cleanup()
            if dist.get_rank() == 0:
                r = runs[name]
                extra = f", uploaded {r['uploaded'][-1]:.3f} s" if name == "engine_tier" else ""
                print(
                    f"{'warm-up' if i == 0 else f'round {i}'} {name}: blocking "
                    f"{r['blocking'][-1] * 1e3:.1f} ms, committed {r['committed'][-1]:.3f} s"
                    + extra,
                    flush=True,
                )
    rows: list[dict[str, Any]] = []
    for name, m in methods.items():
        measured = {k: v[1:] for k, v in runs[name].items()}
        if name != "engine_tier":
            del measured["uploaded"]
        rows.append(
            {
                "method": name,
                "kind": m.kind,
                "blocking_s": median(measured["blocking"]),
                "committed_s": median(measured["committed"]),
                "runs": measured,
                "engine_stats_last": info[name],
            }
        )
    tier_row = next(r for r in rows if r["method"] == "engine_tier")
    rows.remove(tier_row)
    return rows, tier(tier_row, rows, tier_tiers), methods


def tier(
    t: dict[str, Any], rows: list[dict[str, Any]], tiers: dict[int, list[str]]
) -> dict[str, Any]:
    """The local tier against ``engine_thread`` straight to S3 (same rounds)."""
    direct = next(r for r in rows if r["method"] == "engine_thread")
    uploaded = median(t["runs"]["uploaded"])
    return {
        "blocking_s": t["blocking_s"],
        "local_commit_s": t["committed_s"],
        "remote_commit_s": uploaded,
        "direct_blocking_s": direct["blocking_s"],
        "direct_committed_s": direct["committed_s"],
        "blocking_vs_direct_blocking": t["blocking_s"] / direct["blocking_s"],
        "blocking_vs_direct_committed": t["blocking_s"] / direct["committed_s"],
        "local_commit_vs_direct_committed": t["committed_s"] / direct["committed_s"],
        "remote_commit_vs_direct_committed": uploaded / direct["committed_s"],
        "tiers_after_upload": {str(k): v for k, v in sorted(tiers.items())},
        "runs": t["runs"],
        "engine_stats_last": t["engine_stats_last"],
    }


def save_ratios(rows: list[dict[str, Any]], total: int) -> None:
    ref = {r["method"]: r for r in rows}
    for r in rows:
        r["mb_per_s"] = total / r["committed_s"] / 1e6
        r["committed_vs_dcp"] = r["committed_s"] / ref["dcp_save"]["committed_s"]
        r["committed_vs_raw"] = r["committed_s"] / ref["raw_put"]["committed_s"]


# ----------------------------------------------------------------------------- loads


def load_methods(state: State, methods: dict[str, Save]) -> dict[str, Callable[[], None]]:
    """What the last round saved, read back (each method its own checkpoint)."""
    raw, dcp_save, off = methods["raw_put"], methods["dcp_save"], methods["engine_off"]
    assert isinstance(raw, RawPut) and isinstance(dcp_save, DcpSave)
    assert isinstance(off, Engine)
    raw_url, dcp_url, step = raw.url(raw.n - 1), dcp_save.url(dcp_save.n - 1), off.n - 1

    def raw_get() -> None:
        got = raw.fs.cat_file(raw_url)
        assert len(got) == len(raw.blob)

    def dcp_load() -> None:
        sd = state.dcp_state()
        dcp.load(sd, storage_reader=FsspecReader(dcp_url))
        state.set_dcp_state(sd)

    def engine_load() -> None:
        assert off.mgr.load(state.app, which=step) is not None

    def engine_load_noverify() -> None:
        assert off.mgr.load(state.app, which=step, verify=False) is not None

    return {
        "raw_get": raw_get,
        "dcp_load": dcp_load,
        "engine_load": engine_load,
        "engine_load_noverify": engine_load_noverify,
    }


LOAD_KINDS = {"raw_get": "floor", "dcp_load": "peer", "engine_load": "engine",
              "engine_load_noverify": "engine"}  # fmt: skip


def run_loads(fns: dict[str, Callable[[], None]], reps: int, total: int) -> list[dict[str, Any]]:
    runs: dict[str, list[float]] = {n: [] for n in fns}
    for i in range(reps + 1):
        for name, fn in fns.items():
            gc.collect()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            runs[name].append(slowest(time.perf_counter() - t0))
            if dist.get_rank() == 0:
                print(f"{'warm-up' if i == 0 else f'round {i}'} {name}: "
                      f"{runs[name][-1]:.3f} s", flush=True)  # fmt: skip
    rows = [
        {"method": n, "kind": LOAD_KINDS[n], "load_s": median(v[1:]), "runs": v[1:]}
        for n, v in runs.items()
    ]
    ref = {r["method"]: r for r in rows}
    for r in rows:
        r["mb_per_s"] = total / r["load_s"] / 1e6
        r["time_vs_dcp"] = r["load_s"] / ref["dcp_load"]["load_s"]
        r["time_vs_raw"] = r["load_s"] / ref["raw_get"]["load_s"]
    return rows


# ----------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> list[str]:
    per_rank = result["state_bytes_per_rank"] / MiB
    t = result["tier"]
    lines = [
        f"# Remote storage: {per_rank:.0f} MiB per rank ({result['tensors_per_rank']} "
        f"tensors, FSDP2 MLP + AdamW), {result['world_size']} rank(s), S3 API on a loopback "
        f"moto server, median of {result['reps']} rounds after a warm-up",
        "",
        f"{describe(result)}; {result['server']}, s3fs {result['s3fs']}; dcp-engine at "
        f"commit {result.get('commit') or '?'}.",
        "",
        f"**{NOTE}**",
        "",
        "## Saves to S3 (until committed)",
        "",
        "| method | committed s | MB/s | time / dcp_save | time / raw_put | blocking ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["save"]:
        lines.append(
            f"| {r['method']} | {fmt(r['committed_s'], 3)} | {fmt(r['mb_per_s'], 1)} "
            f"| {fmt(r['committed_vs_dcp'])} | {fmt(r['committed_vs_raw'])} "
            f"| {fmt(r['blocking_s'] * 1e3, 1)} |"
        )
    lines += [
        "",
        "## Loads from S3",
        "",
        "| method | load s | MB/s | time / dcp_load | time / raw_get |",
        "|---|---|---|---|---|",
    ]
    for r in result["load"]:
        lines.append(
            f"| {r['method']} | {fmt(r['load_s'], 3)} | {fmt(r['mb_per_s'], 1)} "
            f"| {fmt(r['time_vs_dcp'])} | {fmt(r['time_vs_raw'])} |"
        )
    d_block, d_commit = t["direct_blocking_s"], t["direct_committed_s"]
    lines += [
        "",
        "## Local tier (`local_dir` on local disk, `root_dir` on S3, thread mode) against "
        "`engine_thread` straight to S3",
        "",
        "| from the save() call until | straight to S3 s | with the local tier s "
        "| tier / straight committed |",
        "|---|---|---|---|",
        f"| save() returns (blocking) | {fmt(d_block, 3)} | {fmt(t['blocking_s'], 3)} "
        f"| {fmt(t['blocking_vs_direct_committed'], 3)} |",
        f"| committed locally (`handle.result()`) | - | {fmt(t['local_commit_s'], 3)} "
        f"| {fmt(t['local_commit_vs_direct_committed'])} |",
        f"| committed on S3 (then `wait_uploads()`) | {fmt(d_commit, 3)} "
        f"| {fmt(t['remote_commit_s'], 3)} | {fmt(t['remote_commit_vs_direct_committed'])} |",
        "",
        f"Tiers of the tier's checkpoints after the last upload: {t['tiers_after_upload']}.",
        "",
        "- Rounds: every method once per round, in the order of the tables (saves, the local "
        "tier among them, then loads), so that a slow spell of the shared machine hits all; "
        "each time is the slowest rank's, the median over the rounds after the first.",
        "- MB/s: the state's bytes (all ranks, 10^6 bytes per MB) over the time. `raw_put`: "
        "each rank's tensors as one object, `s3fs.pipe_file` (multipart, 50 MiB parts, up "
        "to 10 at once); `raw_get`: `s3fs.cat_file` of that object.",
        "- `dcp_save`/`dcp_load`: DCP's `FsspecWriter`/`FsspecReader` (torch's "
        "`torch.distributed.checkpoint._fsspec_filesystem`) on the same server. The engine "
        "rows use its defaults (`digests=True`, `fsync=True`); `engine_load` checks every "
        "file's digest (while reading it: the engine's own shard format), "
        "`engine_load_noverify` does not.",
        "- engine committed: `handle.result()`; retention (`keep_last_n=1`) deletes the "
        "previous step afterwards, waited for outside the timing (`mgr.wait()`). The tier's "
        "remote experiment keeps every step.",
        "- blocking: until `save()` returns (for `engine_off`, `raw_put` and `dcp_save`: "
        "the whole save).",
    ]
    return lines


# ----------------------------------------------------------------------------- main


def commit() -> str | None:
    """The checkout's git commit (the engine changes fast), if there is one."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip() or None
    return None


def init_group() -> None:
    """torchrun's environment, or a group of one for plain ``python``."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    dist.init_process_group("gloo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=128, help="train state per rank, about")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/tmp/dcp_engine_bench_remote", help="the local tier")
    p.add_argument("--timeout-s", type=float, default=600.0, help="wait_uploads' bound")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    init_group()
    torch.set_num_threads(1)
    rank, root = dist.get_rank(), Path(args.dir)
    with contextlib.ExitStack() as stack:
        endpoint = [stack.enter_context(moto_s3()) if rank == 0 else None]
        dist.broadcast_object_list(endpoint, src=0)
        os.environ.update(s3_env(str(endpoint[0])))  # every rank, before any S3 client
        if rank == 0:
            make_bucket(str(endpoint[0]), BUCKET)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        dist.barrier()
        import fsspec

        fs = fsspec.filesystem("s3", use_listings_cache=False)
        state = build("train", args.mib)
        per_rank = state.nbytes()
        total = int(summed(per_rank))
        started = time.perf_counter()
        s3 = f"s3://{BUCKET}"
        saves, tier_figures, methods = run_saves(
            state, s3, fs, args.reps, root / "local", args.timeout_s
        )
        save_ratios(saves, total)
        loads = run_loads(load_methods(state, methods), args.reps, total)
        for m in methods.values():
            m.close()
        wall = time.perf_counter() - started
        dist.barrier()
    result = {
        "benchmark": "remote",
        "world_size": dist.get_world_size(),
        "reps": args.reps,
        "state_bytes_per_rank": per_rank,
        "state_bytes_total": total,
        "tensors_per_rank": state.count(),
        "server": f"moto {version('moto')} (python -m moto.server, 127.0.0.1)",
        "s3fs": version("s3fs"),
        "commit": commit(),
        "note": NOTE,
        "machine": machine(),
        "args": vars(args),
        "wall_s": wall,
        "save": saves,
        "load": loads,
        "tier": tier_figures,
    }
    if rank == 0:
        out = Path(args.out)
        write_result(out, "remote", result, report(result))
        plots.plot_file(out / "remote.json")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
