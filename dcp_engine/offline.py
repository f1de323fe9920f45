"""Reading checkpoints outside training: one process, no process group, nothing written
into the experiment. What the command line and ``load_weights`` stand on.

A checkpoint is named by its directory (``.../checkpoints/step_00001200``), an alias
(``.../checkpoints/best``) or an experiment directory (its latest). Only committed
checkpoints are read: a torn one is refused with the reason.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import commit, index, layout, retention, state
from .errors import CheckpointError, NotACheckpointError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint opened for reading."""

    path: Path
    marker: dict[str, Any]
    metadata: Metadata

    @property
    def info(self) -> index.CheckpointInfo:
        return index.CheckpointInfo.from_marker(self.path, self.marker)

    @property
    def keys(self) -> list[str]:
        """The top-level keys of the saved ``app_state`` (the engine's RNG aside)."""
        return sorted(k for k in self.marker["entries"] if k != state.RNG_KEY)

    def tensors(self, key: str | None = None) -> dict[str, TensorStorageMetadata]:
        """Flat name -> metadata of every tensor (under ``key``: names relative to it)."""
        out = {}
        for fqn, meta in self.metadata.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                continue
            path = (self.metadata.planner_data or {}).get(fqn, (fqn,))
            if key is None:
                out[fqn] = meta
            elif path[0] == key and len(path) > 1:
                out[".".join(str(p) for p in path[1:])] = meta
            elif path == (key,):
                out[""] = meta
        return out


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A committed checkpoint by directory, alias or experiment (its latest)."""
    where = index.checkpoint_dir_of(path)
    marker = commit.read_marker(where)
    try:
        metadata = FileSystemReader(where).read_metadata()
    except Exception as e:
        raise NotACheckpointError(f"{where}: DCP metadata unreadable: {e}") from e
    return Checkpoint(where, marker, metadata)


def _check_key(ckpt: Checkpoint, key: str | None) -> None:
    if key is not None and key not in ckpt.marker["entries"]:
        raise CheckpointError(f"{ckpt.path} has no key {key!r}; it has: {', '.join(ckpt.keys)}")


def _dcp_load(ckpt: Checkpoint, keys: Sequence[str] | None) -> dict[str, Any]:
    loaded: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # DCP's own converter (format_utils.dcp_to_torch_save) does this: the public
        # dcp.load only fills keys the caller's dict already has.
        _load_state_dict(
            loaded,
            storage_reader=FileSystemReader(ckpt.path),
            planner=_EmptyStateDictLoadPlanner(keys=set(keys) if keys is not None else None),
            no_dist=True,
        )
    return loaded


def load_entries(ckpt: Checkpoint, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The saved values of ``keys`` (default: all but the RNG), as plain Python: modules
    and optimizers as state dicts, pickled objects unpickled."""
    for key in keys or ():
        _check_key(ckpt, key)
    wanted = list(keys) if keys is not None else ckpt.keys
    loaded = _dcp_load(ckpt, wanted)
    out = {}
    for key in wanted:
        value = loaded.get(key)
        if ckpt.marker["entries"][key].get("encoding") == state.PICKLE and value is not None:
            value = pickle.loads(value)
        out[key] = value
    return out


def load_tensor(ckpt: Checkpoint, fqn: str) -> torch.Tensor:
    """One tensor (its full value, whatever the sharding at save) by flat name."""
    meta = ckpt.metadata.state_dict_metadata.get(fqn)
    if not isinstance(meta, TensorStorageMetadata):
        raise CheckpointError(f"{ckpt.path} has no tensor {fqn!r}")
    out = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({fqn: out}, storage_reader=FileSystemReader(ckpt.path), no_dist=True)
    return out


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
    source: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    dtype: str | None = None,
    fmt: str = "torch",
) -> Path:
    """One consolidated file of a checkpoint (or of one key, e.g. the teacher) that
    ``torch.load`` opens (``fmt="torch"``) or ``safetensors`` reads (tensors only)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    ckpt = open_checkpoint(source)
    values = load_entries(ckpt, [key] if key is not None else None)
    payload = values[key] if key is not None else values
    payload = cast_floats(payload, DTYPES[dtype] if dtype else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "torch":
        torch.save(payload, tmp)
    elif fmt == "safetensors":
        try:
            from safetensors.torch import save_file  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise CheckpointError("--format safetensors needs the safetensors package") from None
        tensors = {name: t.contiguous() for name, t in flat_tensors(payload)}
        if not tensors:
            raise CheckpointError(f"{ckpt.path}: {key or 'the checkpoint'} holds no tensors")
        save_file(tensors, str(tmp))
    else:
        raise ValueError(f"format {fmt!r} is not 'torch' or 'safetensors'")
    tmp.replace(out)
    return out


def average(
    experiment: str | Path,
    out: str | Path,
    *,
    top_k: int = 10,
    key: str | None = None,
    monitor: str | None = None,
    mode: str | None = None,
) -> tuple[Path, list[int]]:
    """The mean of the weights of the ``top_k`` best checkpoints by ``monitor`` (default:
    the experiment's ``config.yaml``), streamed tensor by tensor: memory stays near one
    copy of the result. Non-floating tensors (counters) are taken from the best one.
    Returns the file and the steps averaged."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if monitor is None:
        monitor, saved_mode = index.monitor_of(layout.ExperimentLayout(Path(experiment)))
        mode = mode or saved_mode
    ranked = index.find_checkpoints(experiment, "best", monitor=monitor, metric_mode=mode)
    assert monitor is not None  # find_checkpoints raised otherwise
    chosen = [c for c in ranked if math.isfinite(retention.metric_of(c, monitor))][:top_k]
    if not chosen:
        raise CheckpointError(f"no checkpoint in {experiment} has a finite {monitor!r}")
    ckpts = [open_checkpoint(c.path) for c in chosen]
    for c in ckpts:
        _check_key(c, key)
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
    for name, meta in names.items():
        fqn = ".".join(p for p in (key, name) if p)
        best = load_tensor(ckpts[0], fqn)
        if not best.is_floating_point():
            result[name] = best
            continue
        acc = best.to(torch.float64)
        for c in ckpts[1:]:
            acc += load_tensor(c, fqn).to(torch.float64)
        result[name] = (acc / len(ckpts)).to(meta.properties.dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(result, tmp)
    tmp.replace(out)
    return out, [c.step for c in chosen]
