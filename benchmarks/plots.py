"""PNG figures of the benchmark results (matplotlib, the ``bench`` extra; Agg backend).

    python -m benchmarks.plots [benchmarks/results/*.json]

Each result JSON gets a PNG of the same name beside it; the benchmarks call
``plot_file`` themselves after writing their JSON. Without matplotlib nothing is drawn.
Ratio panels carry a dashed 1.0 reference line; a panel whose values span more than a
factor of 20 gets a log axis (not the memory panel, whose floor is 0).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLOURS = {"floor": "#7f7f7f", "peer": "#1f77b4", "engine": "#d62728", "none": "#2ca02c"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(
    ax: Any,
    names: Sequence[str],
    values: Sequence[float | None],
    kinds: Sequence[str],
    title: str,
    ylabel: str,
    ref: float | None = 1.0,
    digits: int = 2,
    xlabel: str = "method",
    log: bool | None = None,
) -> None:
    """Vertical bars (missing values left out), labelled, coloured by kind; ``log``:
    None for a log axis where the values span more than a factor of 20."""
    shown = [(n, v, k) for n, v, k in zip(names, values, kinds, strict=True) if v is not None]
    xs = list(range(len(shown)))
    ax.bar(xs, [v for _, v, _ in shown], color=[COLOURS.get(k, "#1f77b4") for *_, k in shown])
    ax.set_xticks(xs, [n for n, _, _ in shown], rotation=35, ha="right", fontsize=8)
    for x, (_, v, _) in zip(xs, shown, strict=True):
        ax.annotate(f"{v:.{digits}f}", (x, v), ha="center", va="bottom", fontsize=7)
    positive = [v for _, v, _ in shown if v > 0]
    if log is None:  # automatic: values spanning more than a factor of 20
        log = bool(positive) and max(positive) / min(positive) > 20
    if log:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_ylim(min(positive) / 1.5, max(positive) * 2.5)
    else:
        ax.set_ylim(0, max([*positive, ref or 0]) * 1.15)
    if ref is not None:
        ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=f"{ref:g} (reference)")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    ax.set_xlabel(xlabel)


def _save_throughput(plt: Any, r: dict[str, Any], png: Path) -> None:
    rows = r["rows"]
    names, kinds = [x["method"] for x in rows], [x["kind"] for x in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    bars(
        axes[0],
        names,
        [x["blocking_vs_copy"] for x in rows],
        kinds,
        "blocking time / T_copy (one copy into reused buffers)",
        "ratio",
    )
    bars(
        axes[1],
        names,
        [x["committed_vs_raw"] for x in rows],
        kinds,
        "time until committed / raw write + fsync",
        "ratio",
    )
    bars(
        axes[2],
        names,
        [x["cpu_vs_raw"] for x in rows],
        kinds,
        "CPU s of the whole job / raw write + fsync's",
        "ratio",
    )
    fig.suptitle(
        f"Saves, {r['shape']} state: {r['state_bytes_per_rank'] / 2**20:.0f} MiB per rank, "
        f"{r['world_size']} rank(s), median of {r['reps']} (grey: floors, blue: peers, red: "
        f"dcp-engine; torch {r['machine']['torch']}, {r['machine']['cores']} cores)"
    )
    _finish(plt, fig, png)


def _save_stall(plt: Any, r: dict[str, Any], png: Path) -> None:
    rows = r["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    bars(
        ax,
        [x["method"] for x in rows],
        [x["ratio"] for x in rows],
        [x["kind"] for x in rows],
        f"Training step after a save / step without saves "
        f"({r['state_bytes_per_rank'] / 2**20:.0f} MiB per rank)",
        "ratio",
        digits=3,
    )
    _finish(plt, fig, png)


def _load(plt: Any, r: dict[str, Any], png: Path) -> None:
    rows = r["rows"]
    names, kinds = [x["method"] for x in rows], [x["kind"] for x in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    bars(
        axes[0],
        names,
        [x["gb_per_s"] for x in rows],
        kinds,
        "load throughput (warm cache)",
        "GB/s (whole state, slowest rank)",
        ref=None,
    )
    bars(
        axes[1],
        names,
        [x["time_vs_raw"] for x in rows],
        kinds,
        "load time / raw read of the same files",
        "ratio",
    )
    bars(
        axes[2],
        names,
        [x["peak_extra_rss_vs_state"] for x in rows],
        kinds,
        "peak extra RSS / state bytes per rank (1.0: one copy)",
        "ratio",
        log=False,
    )
    fig.suptitle(
        f"Loads: {r['state_bytes_per_rank'] / 2**20:.0f} MiB per rank, {r['world_size']} "
        f"ranks, median of {r['reps']} (torch {r['machine']['torch']})"
    )
    _finish(plt, fig, png)


def _dino(plt: Any, r: dict[str, Any], png: Path) -> None:
    modes = r["modes"]
    names = list(modes)
    kinds = ["none" if m == "none" else "engine" for m in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    bars(
        axes[0],
        names,
        [modes[m]["mean_step_ratio"] for m in names],
        kinds,
        "mean step / mean step without saves",
        "ratio",
        digits=3,
        xlabel="mode",
    )
    bars(
        axes[1],
        names,
        [modes[m]["step_with_save_ratio"] for m in names],
        kinds,
        "median step containing a save / median step without saves",
        "ratio",
        digits=3,
        xlabel="mode",
    )
    a = r["args"]
    fig.suptitle(
        f"DINO ViT-tiny, 2 ranks FSDP2 (CPU), a save every {a['every']} steps, "
        f"{a['reps']} runs of {a['steps']} steps per mode"
    )
    _finish(plt, fig, png)


def _remote(plt: Any, r: dict[str, Any], png: Path) -> None:
    saves, loads, t = r["save"], r["load"], r["tier"]
    fig, axes = plt.subplots(1, 4, figsize=(21, 5.5))
    bars(
        axes[0],
        [x["method"] for x in saves],
        [x["mb_per_s"] for x in saves],
        [x["kind"] for x in saves],
        "save to S3: throughput until committed",
        "MB/s (whole state, slowest rank)",
        ref=None,
        digits=1,
    )
    bars(
        axes[1],
        [x["method"] for x in loads],
        [x["mb_per_s"] for x in loads],
        [x["kind"] for x in loads],
        "load from S3: throughput",
        "MB/s (whole state, slowest rank)",
        ref=None,
        digits=1,
    )
    rows = [("save " + x["method"], x["committed_vs_dcp"], x["kind"]) for x in saves]
    rows += [("load " + x["method"], x["time_vs_dcp"], x["kind"]) for x in loads]
    bars(
        axes[2],
        [n for n, _, _ in rows],
        [v for _, v, _ in rows],
        [k for _, _, k in rows],
        "time / DCP's fsspec writer or reader (same run)",
        "ratio",
    )
    d = t["direct_committed_s"]
    bars(
        axes[3],
        ["straight: blocking", "tier: blocking", "tier: local commit", "tier: S3 commit"],
        [
            t["direct_blocking_s"] / d,
            t["blocking_vs_direct_committed"],
            t["local_commit_vs_direct_committed"],
            t["remote_commit_vs_direct_committed"],
        ],
        ["peer", "engine", "engine", "engine"],
        "local tier: time / engine_thread's commit straight to S3",
        "ratio",
        digits=3,
        xlabel="blue: straight to S3, red: local tier",
    )
    fig.suptitle(
        f"S3 on a loopback moto server (not S3: compare ratios only): "
        f"{r['state_bytes_per_rank'] / 2**20:.0f} MiB per rank, {r['world_size']} rank(s), "
        f"median of {r['reps']} (grey: raw PUT/GET, blue: DCP fsspec, red: dcp-engine; "
        f"torch {r['machine']['torch']}, {r['machine']['cores']} cores)"
    )
    _finish(plt, fig, png)


def _finish(plt: Any, fig: Any, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}", flush=True)


def plot_file(path: Path) -> None:
    """The PNG of one result JSON, beside it."""
    plt = _pyplot()
    if plt is None:
        return
    r = json.loads(path.read_text())
    kind = r.get("benchmark", "")
    png = path.with_suffix(".png")
    if kind == "save throughput":
        _save_throughput(plt, r, png)
    elif kind == "save stall":
        _save_stall(plt, r, png)
    elif kind == "load":
        _load(plt, r, png)
    elif kind == "dino_overhead":
        _dino(plt, r, png)
    elif kind == "remote":
        _remote(plt, r, png)


def main() -> None:
    paths = [Path(a) for a in sys.argv[1:]] or sorted(Path("benchmarks/results").glob("*.json"))
    for p in paths:
        plot_file(p)


if __name__ == "__main__":
    main()
