"""The headline figures of the last ``make bench``, side by side, from the result JSONs.

    python -m benchmarks.summary [--out benchmarks/results]

Writes ``<out>/summary.md`` (and prints it): per figure, the engine's modes next to their
peers and the floor each ratio is taken against, all from the same run. Missing result
files are named and skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .measure import MiB, describe, fmt

ISSUE_MIB_PER_RANK = 504


def _load(out: Path, name: str, missing: list[str]) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    if not path.exists():
        missing.append(path.name)
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _saves(r: dict[str, Any]) -> list[str]:
    mib = r["state_bytes_per_rank"] / MiB
    lines = [
        f"## Saves: {r['shape']} state, {mib:.0f} MiB per rank x {r['world_size']} ranks "
        f"(figures 1-3)",
        "",
        f"`save_{r['shape']}.md`, median of {r['reps']} after a warm-up; {describe(r)}; "
        f"{r['wall_s']:.0f} s.",
    ]
    if abs(mib - ISSUE_MIB_PER_RANK) > 1:
        lines.append(
            f"The issue's figure is {ISSUE_MIB_PER_RANK} MiB per rank: "
            "`make bench BENCH_MIB=512` (see the Makefile); this run is smaller to keep "
            "`make bench` near 10 minutes on 2 cores."
        )
    lines += [
        "",
        "| method | blocking ms | blocking / T_copy | CPU s per GiB (whole job) "
        "| CPU / raw write | committed s | committed / raw write |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['method']} | {fmt(x['blocking_s'] * 1e3, 1)} | {fmt(x['blocking_vs_copy'])} "
            f"| {fmt(x['cpu_s_per_gib'])} | {fmt(x['cpu_vs_raw'])} | {fmt(x['committed_s'], 3)} "
            f"| {fmt(x['committed_vs_raw'])} |"
        )
    return [*lines, ""]


def _small(r: dict[str, Any]) -> list[str]:
    lines = [
        f"## Many small tensors: {r['tensors_per_rank']} tensors, "
        f"{r['state_bytes_per_rank'] / MiB:.0f} MiB, {r['world_size']} process (figure 4)",
        "",
        f"`save_small.md`, median of {r['reps']}; {describe(r)}; {r['wall_s']:.0f} s.",
        "",
        "| method | CPU ms per save (whole job) | CPU / raw write | blocking ms "
        "| blocking / T_copy | committed / raw write |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['method']} | {fmt(x['cpu_s'] * 1e3, 0)} | {fmt(x['cpu_vs_raw'])} "
            f"| {fmt(x['blocking_s'] * 1e3, 1)} | {fmt(x['blocking_vs_copy'])} "
            f"| {fmt(x['committed_vs_raw'])} |"
        )
    return [*lines, ""]


def _loads(r: dict[str, Any]) -> list[str]:
    lines = [
        f"## Loads: {r['state_bytes_per_rank'] / MiB:.0f} MiB per rank x {r['world_size']} "
        "ranks, warm cache (figure 5)",
        "",
        f"`load.md`, median of {r['reps']}; {describe(r)}; {r['wall_s']:.0f} s.",
        "",
        "| method | GB/s | time / raw read | peak extra RSS / state per rank |",
        "|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['method']} | {fmt(x['gb_per_s'])} | {fmt(x['time_vs_raw'])} "
            f"| {fmt(x['peak_extra_rss_vs_state'])} |"
        )
    return [*lines, ""]


def _dino(r: dict[str, Any]) -> list[str]:
    a = r["args"]
    lines = [
        f"## DINO ViT-tiny, 2 ranks FSDP2: a save every {a['every']} steps (figure 6)",
        "",
        f"`dino_overhead.md`, {a['reps']} run(s) of {a['steps']} steps per mode; "
        f"{describe(r)}; {r['wall_s']:.0f} s.",
        "",
        "| mode | mean step / no saves | step with a save / no saves |",
        "|---|---|---|",
    ]
    for m, x in r["modes"].items():
        lines.append(
            f"| {m} | {fmt(x['mean_step_ratio'], 3)} | {fmt(x['step_with_save_ratio'], 3)} |"
        )
    return [*lines, ""]


def _remote(r: dict[str, Any]) -> list[str]:
    t = r["tier"]
    lines = [
        f"## S3 on a loopback moto server: {r['state_bytes_per_rank'] / MiB:.0f} MiB per rank x "
        f"{r['world_size']} rank(s) (figure 7)",
        "",
        f"`remote.md`, median of {r['reps']} rounds; {describe(r)}; {r['wall_s']:.0f} s. "
        "Not S3 (one Python server on the same cores, no network): the ratios only.",
        "",
        "| save | MB/s | time / dcp_save (FsspecWriter) | time / raw PUT | blocking ms |",
        "|---|---|---|---|---|",
    ]
    for x in r["save"]:
        lines.append(
            f"| {x['method']} | {fmt(x['mb_per_s'], 1)} | {fmt(x['committed_vs_dcp'])} "
            f"| {fmt(x['committed_vs_raw'])} | {fmt(x['blocking_s'] * 1e3, 1)} |"
        )
    lines += [
        "",
        "| load | MB/s | time / dcp_load (FsspecReader) | time / raw GET |",
        "|---|---|---|---|",
    ]
    for x in r["load"]:
        lines.append(
            f"| {x['method']} | {fmt(x['mb_per_s'], 1)} | {fmt(x['time_vs_dcp'])} "
            f"| {fmt(x['time_vs_raw'])} |"
        )
    lines += [
        "",
        f"Local tier (`local_dir` + `root_dir` on S3, thread mode), over `engine_thread`'s "
        f"commit straight to S3: blocking {fmt(t['blocking_vs_direct_committed'], 3)}, "
        f"local commit {fmt(t['local_commit_vs_direct_committed'])}, commit on S3 "
        f"(`wait_uploads`) {fmt(t['remote_commit_vs_direct_committed'])}.",
    ]
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out)
    missing: list[str] = []
    lines = [
        "# dcp-engine next to its peers: the headline figures",
        "",
        "Written by `make bench` (`python -m benchmarks.summary`) from the JSON files beside "
        "it; each section's ratios come from one run, where every method saved (or loaded) "
        "the same state on the same machine. Medians; measured, never asserted: the machine "
        "is shared and noisy, compare within a section. Engine modes: `engine_off` "
        "(`async_mode=off`), `engine_thread`, `engine_process`, `engine_overlap` "
        "(`async_mode=thread, staging=overlap`).",
        "",
    ]
    for name, section in (
        ("save_train", _saves),
        ("save_small", _small),
        ("load", _loads),
        ("dino_overhead", _dino),
        ("remote", _remote),
    ):
        r = _load(out, name, missing)
        if r is not None:
            lines += section(r)
    if missing:
        lines += [f"Not found (not run): {', '.join(missing)}.", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
