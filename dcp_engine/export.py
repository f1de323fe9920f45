"""Whole-checkpoint products outside training: ``export`` (one consolidated file of a
checkpoint, or of one key such as the teacher) and ``average`` (the mean weights of the
top-k). Both read through ``open_checkpoint``: verified, and nothing written into the
experiment.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from . import layout, resolve, retention
from .errors import CheckpointError
from .index import Which
from .location import Location, as_location
from .native import METADATA_FILE, ShardSlice, to_dtype
from .progress import Progress, wanted
from .progress import progress as bar_of
from .reader import CheckpointReader, open_checkpoint
from .storage import Storage, storage_of
from .units import DTYPE_NAMES, tensor_bytes_of

DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}


def cast_floats(tree: Any, dtype: torch.dtype | None) -> Any:
    """``tree`` with its floating-point tensors cast to ``dtype`` (others untouched)."""
    if dtype is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, Mapping):
        return {k: cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cast_floats(v, dtype) for v in tree)
    return tree


def flat_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from flat_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flat_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def export(
    source: str | os.PathLike[str] | Location,
    out: str | os.PathLike[str] | Location,
    *,
    key: str | None = None,
    dtype: str | None = None,
    fmt: str = "torch",
    which: Which = "latest",
    progress: bool | None = None,
) -> Location:
    """One consolidated file of a checkpoint (or of one key, e.g. the teacher) that
    ``torch.load`` opens (``fmt="torch"``) or ``safetensors`` reads (tensors only), or a
    directory in DCP's stock format (``fmt="dcp"``, ``export_dcp``).
    ``which`` picks the checkpoint when ``source`` is an experiment; ``progress``: a bar
    on stderr (default: on a terminal). An optimizer comes as ``Optimizer.load_state_dict``
    takes it (``CheckpointReader.load_entries``)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    ckpt = open_checkpoint(source, which)
    if fmt == "dcp":
        if dtype is not None:
            raise ValueError("--dtype applies to the torch and safetensors formats only")
        return export_dcp(ckpt, as_location(out), key=key, progress=progress)
    if fmt not in ("torch", "safetensors"):
        raise ValueError(f"format {fmt!r} is not 'torch', 'safetensors' or 'dcp'")
    asked = wanted(progress)
    values = ckpt.load_entries([key] if key is not None else None, progress=asked)
    payload = values[key] if key is not None else values
    payload = cast_floats(payload, DTYPES[dtype] if dtype else None)
    out = as_location(out)
    if fmt == "torch":
        write_file(out, lambda f: torch.save(payload, f))
        return out
    try:
        from safetensors.torch import save  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CheckpointError("--format safetensors needs the safetensors package") from None
    tensors = {name: t.contiguous() for name, t in flat_tensors(payload)}
    if not tensors:
        raise CheckpointError(f"{ckpt.path}: {key or 'the checkpoint'} holds no tensors")
    write_file(out, lambda f: f.write(save(tensors)))
    return out


def write_file(out: Location, write: Callable[[IO[bytes]], object]) -> None:
    """A product file, written atomically: readers never see a half-written ``out``."""
    storage = storage_of(out)
    storage.mkdir(out.parent)
    with storage.open_atomic(out) as f:
        write(f)


def export_dcp(
    ckpt: CheckpointReader,
    out: Location,
    *,
    key: str | None = None,
    progress: bool | None = None,
) -> Location:
    """The checkpoint (or one key) as a directory in DCP's stock format (``torch.save``
    per item, ``__<rank>_<k>.distcp``), shards and all, for readers without dcp_engine:
    ``dcp.load(state, checkpoint_id=out)``. Streamed one item at a time; ``.metadata``
    last (on an object store the directory is not a checkpoint before it)."""
    storage = storage_of(out)
    if storage.exists(out):
        raise CheckpointError(f"{out} exists: export --format dcp writes a new directory")
    metadata = ckpt.metadata
    keep = {
        fqn for fqn in metadata.state_dict_metadata
        if key is None or fqn == key or fqn.startswith(f"{key}.")
    }  # fmt: skip
    if not keep:
        raise CheckpointError(f"{ckpt.path} has no key {key!r}: {ckpt.keys}")
    per_file: dict[str, list[tuple[Any, Any]]] = {}
    for index, where in metadata.storage_data.items():
        if index.fqn in keep:
            per_file.setdefault(where.relative_path, []).append((index, where))
    tmp = out.with_name(f".{out.name}.tmp") if storage.renames else out
    storage.remove_tree(tmp)
    storage.mkdir(tmp)
    total = sum(w.length for items in per_file.values() for _, w in items)
    try:
        with bar_of(f"export {ckpt.path.name}", total, progress) as bar:
            storage_data = _write_stock(ckpt.path, per_file, tmp, storage, bar)
        stock_metadata = dataclasses.replace(
            metadata,
            state_dict_metadata={
                k: v for k, v in metadata.state_dict_metadata.items() if k in keep
            },
            planner_data={k: v for k, v in (metadata.planner_data or {}).items() if k in keep},
            storage_data=storage_data,
            storage_meta=None,
        )
        with storage.open_write(tmp / METADATA_FILE) as f:
            pickle.dump(stock_metadata, f)
        if storage.renames:
            storage.publish(tmp, out)
    except BaseException:
        storage.remove_tree(tmp)  # no half-written export left behind
        raise
    return out


def _write_stock(
    source: Location,
    per_file: Mapping[str, list[tuple[Any, Any]]],
    tmp: Location,
    storage: Storage,
    bar: Progress,
) -> dict[Any, _StorageInfo]:
    """Every item in DCP's stock format (``torch.save`` per tensor), file by file."""
    storage_data: dict[Any, _StorageInfo] = {}
    reading = storage_of(source)
    for name, items in sorted(per_file.items()):
        stock = name.rsplit(".", 1)[0] + ".distcp"
        with reading.open_read(source / name) as src, storage.open_write(tmp / stock) as dst:
            for index, where in sorted(items, key=lambda p: p[1].offset):
                src.seek(where.offset)
                data = src.read(where.length)
                offset = dst.tell()
                if isinstance(where, ShardSlice) and where.dtype:
                    dtype = to_dtype(where.dtype, f"{source / name}: {index.fqn}")
                    chunk = torch.empty(where.shape, dtype=dtype)
                    if data:
                        chunk.view(-1).view(torch.uint8).copy_(
                            torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        )
                    torch.save(chunk, dst)
                else:  # serialised values (and items already in DCP's format) as they are
                    dst.write(data)
                storage_data[index] = _StorageInfo(stock, offset, dst.tell() - offset)
                bar.update(where.length)
    return storage_data


def average(
    experiment: str | os.PathLike[str] | Location,
    out: str | os.PathLike[str] | Location,
    *,
    top_k: int = 10,
    key: str | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    progress: bool | None = None,
) -> tuple[Location, list[int]]:
    """The mean of the weights of the ``top_k`` best checkpoints by ``monitor`` (default:
    the experiment's ``config.yaml``), streamed tensor by tensor: memory stays near one
    copy of the result. Non-floating tensors (counters) are taken from the best one.
    Returns the file and the steps averaged. ``progress``: a bar on stderr (default: on
    a terminal)."""
    result, steps = average_tensors(
        experiment, top_k=top_k, key=key, monitor=monitor, mode=mode, progress=progress
    )
    out = as_location(out)
    write_file(out, lambda f: torch.save(result, f))
    return out, steps


def average_modules(
    experiment: Location, out: Location, *, monitor: str, mode: str, top_k: int = 10
) -> list[int]:
    """SuperGradients' ``average_model``: ``{key: mean state dict}`` for every module entry
    of the best checkpoint, over the ``top_k`` best, written to ``out``. The steps averaged."""
    ranked = resolve.find_checkpoints(experiment, "best", monitor=monitor, metric_mode=mode)
    if not ranked:
        raise CheckpointError(f"{experiment} has no committed checkpoint to average")
    with open_checkpoint(ranked[0].path) as best:
        modules = [k for k in best.keys if best.kind(k) == "module"]
    if not modules:
        raise CheckpointError(f"{ranked[0].path} holds no module to average")
    averaged: dict[str, dict[str, torch.Tensor]] = {}
    steps: list[int] = []
    for key in modules:
        averaged[key], steps = average_tensors(
            experiment, top_k=top_k, key=key, monitor=monitor, mode=mode
        )
    write_file(out, lambda f: torch.save(averaged, f))
    return steps


def average_tensors(
    experiment: str | os.PathLike[str] | Location,
    *,
    top_k: int = 10,
    key: str | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    progress: bool | None = False,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``average``'s tensors (flat names, under ``key`` relative to it) and steps."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    experiment = as_location(experiment)
    monitor, mode = resolve.ranking(layout.ExperimentLayout(experiment), monitor, mode)
    ranked = resolve.find_checkpoints(experiment, "best", monitor=monitor, metric_mode=mode)
    chosen = [c for c in ranked if math.isfinite(retention.metric_of(c, monitor))][:top_k]
    if not chosen:
        raise CheckpointError(f"no checkpoint in {experiment} has a finite {monitor!r}")
    ckpts = [open_checkpoint(c.path) for c in chosen]
    for c in ckpts:
        if key is not None:
            c.kind(key)  # raises naming the checkpoint and its keys
    names = ckpts[0].tensors(key)
    for c in ckpts[1:]:
        other = c.tensors(key)
        if set(other) != set(names):
            diff = sorted(set(other) ^ set(names))[:5]
            raise CheckpointError(f"{c.path} and {ckpts[0].path} differ in tensors: {diff}")
        for name, meta in other.items():
            if meta.size != names[name].size:
                raise CheckpointError(
                    f"{name}: {list(meta.size)} in {c.path}, {list(names[name].size)} in "
                    f"{ckpts[0].path}"
                )
    result: dict[str, torch.Tensor] = {}
    sizes = {n: tensor_bytes_of(m) for n, m in names.items()}
    with bar_of(f"average {len(ckpts)}", sum(sizes.values()) * len(ckpts), progress) as bar:
        for name, meta in names.items():
            fqn = ".".join(p for p in (key, name) if p)
            best = ckpts[0].load_tensor(fqn)
            bar.update(sizes[name])
            if not best.is_floating_point():
                result[name] = best
                bar.update(sizes[name] * (len(ckpts) - 1))
                continue
            acc = best.to(torch.float64)
            for c in ckpts[1:]:
                acc += c.load_tensor(fqn).to(torch.float64)
                bar.update(sizes[name])
            result[name] = (acc / len(ckpts)).to(meta.properties.dtype)
    return result, [c.step for c in chosen]
