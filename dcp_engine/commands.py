"""The commands of ``dcp-engine`` (``cli.py`` parses their arguments): each takes the
parsed ``argparse.Namespace`` and returns the exit code."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from . import export, index, layout, progress, resolve
from .catalog import Catalog
from .cli import Fail
from .committer import Committer
from .config import CheckpointConfig
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .index import CheckpointInfo
from .lease import Lease
from .location import Location
from .reader import open_checkpoint
from .relayout import STOCK
from .storage import storage_of
from .units import fmt_bytes, tensor_bytes_of

# ----------------------------------------------------------------------------- ls


def _experiments(path: Location) -> list[Location]:
    storage = storage_of(path)
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"{path} is not a directory")
    if storage.is_dir(path / layout.CHECKPOINTS_DIR):
        return [path]
    found = [
        path / c.name
        for c in storage.children(path)
        if c.kind == "dir" and storage.is_dir(path / c.name / layout.CHECKPOINTS_DIR)
    ]
    if not found:
        raise Fail(f"{path} is neither an experiment nor a directory of experiments")
    return found


def _aliases(exp: layout.ExperimentLayout) -> dict[str, list[str]]:
    """Checkpoint directory name -> the aliases pointing at it."""
    out: dict[str, list[str]] = {}
    storage = storage_of(exp.root)
    recorded = None
    for alias in layout.ALIASES:
        target = storage.read_alias(exp.alias_path(alias))
        if target is None and storage.exists(exp.alias_path(alias)):
            recorded = index.recorded_aliases(exp) if recorded is None else recorded
            step = recorded.get(alias)
            target = None if step is None else layout.step_dirname(step)
        if target is not None:
            out.setdefault(target, []).append(alias)
    return out


def _rows(exp_dir: Location) -> list[dict[str, Any]]:
    exp = layout.ExperimentLayout(exp_dir)
    found = resolve.scan(exp)
    aliases = _aliases(exp)
    rows = [_row(exp_dir, c, aliases.get(c.path.name, [])) for c in found.committed]
    others = [(p, f"TORN: {why}") for p, why in found.torn]
    others += [(p, f"CORRUPT: {why}") for p, why in found.corrupt]
    others += [(p, "QUARANTINED: failed verification on resume") for p in found.quarantined]
    for path, why in others:
        step = next(
            (
                s
                for parse in (
                    layout.parse_step_dirname,
                    layout.parse_tmp_dirname,
                    layout.parse_corrupt_dirname,
                )
                if (s := parse(path.name)) is not None
            ),
            None,
        )
        rows.append(
            {
                "experiment": str(exp_dir),
                "step": step,
                "epoch": None,
                "metrics": {},
                "bytes": None,
                "created": None,
                "path": str(path),
                "aliases": [],
                "torn": why,
            }
        )
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0))


def _row(exp_dir: Location, c: CheckpointInfo, aliases: list[str]) -> dict[str, Any]:
    return {
        "experiment": str(exp_dir),
        "step": c.step,
        "epoch": c.epoch,
        "metrics": dict(c.metrics),
        "bytes": c.bytes,
        "created": c.created,
        "path": str(c.path),
        "aliases": aliases,
        "torn": None,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    rows = [r for e in _experiments(args.path) for r in _rows(e)]
    if args.json:
        print(json.dumps(rows, indent=1, allow_nan=True))
        return 0
    for exp in dict.fromkeys(r["experiment"] for r in rows) or [str(args.path)]:
        print(f"{exp}")
        table = [["step", "epoch", "metrics", "size", "created", "aliases"]]
        for r in rows:
            if r["experiment"] != exp:
                continue
            if r["torn"]:
                table.append([str(r["step"]), "-", r["torn"], "-", "-", ""])
                continue
            metrics = " ".join(f"{k}={_num(v)}" for k, v in sorted(r["metrics"].items()))
            created = dt.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S")
            epoch = "-" if r["epoch"] is None else str(r["epoch"])
            aliases = ",".join(r["aliases"])
            size = _size(r["bytes"])
            table.append([str(r["step"]), epoch, metrics or "-", size, created, aliases])
        _print_table(table)
    return 0


# ----------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    # Shapes and sizes only, no tensor bytes: the marker and DCP's metadata, not the shards.
    ckpt = open_checkpoint(args.checkpoint, verify=False)
    m, md = ckpt.marker, ckpt.metadata
    print(f"checkpoint  {ckpt.path}")
    print(f"step        {m.step}   epoch {m.epoch}")
    print(f"metrics     {json.dumps(dict(m.metrics), allow_nan=True)}")
    print(
        f"saved by    {m.world_size} rank(s), torch {m.torch_version}, marker {m.format}, "
        f"DCP metadata version {getattr(md, 'version', None) or '?'}"
    )
    print(f"files       {len(m.files)}, {_size(m.total_bytes)}")
    table = [["key", "kind", "tensors", "bytes", "dtypes"]]
    for key in sorted(m.entries):
        tensors = ckpt.tensors(key)
        nbytes = sum(tensor_bytes_of(t) for t in tensors.values())
        dtypes = sorted({str(t.properties.dtype).removeprefix("torch.") for t in tensors.values()})
        table.append(
            [
                key,
                str(m.entries[key]["kind"]),
                str(len(tensors)),
                _size(nbytes),
                ",".join(dtypes) or "-",
            ]
        )
    _print_table(table)
    if args.tensors:
        rows = [["tensor", "shape", "dtype"]]
        for fqn, t in sorted(ckpt.tensors().items()):
            rows.append(
                [
                    fqn,
                    "x".join(map(str, t.size)) or "scalar",
                    str(t.properties.dtype).removeprefix("torch."),
                ]
            )
        _print_table(rows)
    return 0


# ----------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    path = resolve.follow(args.path)
    bad: list[str] = []
    if storage_of(path).is_dir(path / layout.CHECKPOINTS_DIR):
        found = resolve.scan(layout.ExperimentLayout(path))
        targets = [c.path for c in found.committed]
        for torn, why in found.torn:
            print(f"SKIP {torn}: {why}")
        for q in found.quarantined:
            print(f"SKIP {q}: quarantined")
        for _, why in found.corrupt:
            bad.append(f"BAD  {why}")
        if not targets and not found.corrupt:
            raise Fail(f"experiment {path} has no committed checkpoint")
    else:
        targets = [resolve.inspect_checkpoint_dir(path)[0].path]
    for line in bad:
        print(line)
    asked = progress.wanted(args.progress)
    for target in targets:
        marker = resolve.read_marker(target)
        problems = []
        with progress.Progress(f"verify {target.name}", marker.total_bytes, show=asked) as bar:
            for name, entry in sorted(marker.files.items()):
                problems += resolve.file_problems(target, marker, digests=True, names=[name])
                bar.update(entry.size)
        if not problems:
            try:
                resolve.check_files(target, marker)
            except CheckpointError as e:
                problems = [str(e)]
        hashed = sum(f.crc32 is not None for f in marker.files.values())
        if problems:
            bad.extend(problems)
            for p in problems:
                print(f"BAD  {p}")
        else:
            rest = "" if hashed == len(marker.files) else ", the rest by size"
            print(f"OK   {target} ({len(marker.files)} files, {hashed} by digest{rest})")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    out = export.export(
        args.checkpoint,
        args.out,
        key=args.key,
        dtype=args.dtype,
        fmt=args.format,
        progress=progress.wanted(args.progress),
    )
    storage = storage_of(out)
    if storage.is_dir(out):
        size = sum(storage.file_sizes(out, exclude="").values())
    else:
        size = storage.size(out)
    print(f"wrote {out} ({_size(size)})")
    return 0


# ----------------------------------------------------------------------------- gc


def cmd_gc(args: argparse.Namespace) -> int:
    exp_dir: Location = args.experiment
    storage = storage_of(exp_dir)
    if not storage.is_dir(exp_dir / layout.CHECKPOINTS_DIR):
        raise CheckpointNotFoundError(f"{exp_dir} is not an experiment (no checkpoints/)")
    exp = layout.ExperimentLayout(storage.resolve(exp_dir))
    monitor, mode = args.monitor, args.mode
    if monitor is None:
        monitor, saved_mode = resolve.monitor_of(exp)
        mode = mode or saved_mode
    policy = _gc_config(args, exp, monitor, mode or "min").retention
    if policy.keeps_all:
        raise Fail("no retention policy given (--keep-top-k, --keep-last-n, ...)")
    found = resolve.scan(exp)
    if any(layout.parse_tmp_dirname(p.name) is not None for p, _ in found.torn):
        print("note: a .tmp directory exists: a save may be in flight; gc never touches it")
    aliased = {s for name in _aliases(exp) if (s := layout.parse_step_dirname(name)) is not None}
    if args.dry_run:  # read-only: no lease
        doomed = policy.to_delete(found.committed, aliased)
        for step in doomed:
            print(f"would delete {exp.step_dir(step)}")
        print(
            f"would keep {len(found.committed) - len(doomed)}: steps "
            f"{[c.step for c in found.committed if c.step not in doomed]}"
        )
        return 0
    # Deleting writes the experiment: only as its lease holder (refused while a job runs).
    lease = Lease.acquire(exp.owner_path, storage, stale_after_s=30.0)
    try:
        # retention.keeps_all is False here, so the catalog starts a collector thread:
        # this command collects in the foreground and closes it.
        catalog = Catalog(exp, policy, committer=Committer(exp, storage, lease), storage=storage)
        try:
            catalog.open()
            for step in aliased:
                catalog.protect(step)
            for step in catalog.collect():
                print(f"deleted {exp.step_dir(step)}")
            kept = [c.step for c in catalog.entries()]
        finally:
            catalog.close()
    finally:
        lease.release()
    print(f"kept {len(kept)}: steps {kept}")
    return 0


def _gc_config(
    args: argparse.Namespace, exp: layout.ExperimentLayout, monitor: str | None, mode: str
) -> CheckpointConfig:
    """The retention flags checked exactly as ``CheckpointConfig`` checks its fields."""
    flags = {
        "keep_top_k": args.keep_top_k,
        "keep_last_n": args.keep_last_n,
        "keep_every_n_steps": args.keep_every_n_steps,
        "keep_every_n_epochs": args.keep_every_n_epochs,
    }
    try:
        return CheckpointConfig(
            root_dir=str(exp.root.parent),
            experiment_name=exp.root.name,
            monitor=monitor,
            mode=mode,
            **flags,
        )
    except ConfigError as e:
        flag = "--" + e.field.replace("_", "-")
        value = flags.get(e.field, getattr(args, e.field, None))
        if e.field == "keep_top_k" and monitor is None:
            raise Fail(f"{flag} needs --monitor (or checkpoint.monitor in config.yaml)") from None
        raise Fail(f"{flag} {value}: expected {str(e).split('expected ', 1)[-1]}") from None


# ----------------------------------------------------------------------------- average


def cmd_average(args: argparse.Namespace) -> int:
    out, steps = export.average(
        args.experiment,
        args.out,
        top_k=args.top_k,
        key=args.key,
        monitor=args.monitor,
        mode=args.mode,
        progress=progress.wanted(args.progress),
    )
    print(f"wrote {out}: the mean of steps {steps}")
    return 0


# ----------------------------------------------------------------------------- adopt


def cmd_adopt(args: argparse.Namespace) -> int:
    from .adoption import adopt

    info = adopt(
        args.source,
        args.experiment,
        step=args.step,
        move=args.move,
        epoch=args.epoch,
        metrics=dict(args.metric),
        progress=progress.wanted(args.progress),
        layout=args.layout,
    )
    how = "moved" if args.move else "copied"
    if args.layout != STOCK:
        how += f", {args.layout} layout"
    files = f"{len(info.files)} files, {_size(info.bytes)}"
    print(f"adopted {args.source} as {info.path} ({files}, {how})")
    return 0


# ----------------------------------------------------------------------------- helpers


def _size(n: int | None) -> str:
    return "-" if n is None else fmt_bytes(n)


def _num(v: float) -> str:
    return f"{v:.6g}"


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
