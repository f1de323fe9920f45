"""``open_checkpoint``: a committed checkpoint, read-only and verified (invariant 8).

    with dcp_engine.open_checkpoint("experiments/dino", which="best") as ck:
        ck.load({"teacher": model})           # in place, all or nothing
        values = ck.load_entries(["teacher"])  # or as plain state dicts

A ``CheckpointReader`` never writes, sweeps, moves an alias or takes the lease: it is
what the command line, ``export``, ``average``, ``load_weights`` and evaluation scripts
stand on, and it may run while a job writes the same experiment. It checks every file
against its digest when opened (``verify=False`` is an explicit opt-out), so no byte of
a corrupt checkpoint is handed out. One process, no process group.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import layout, optim_layout, resolve, state, trees
from .comm import quiet_dcp
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .index import CheckpointInfo, Which
from .location import Location, as_location, is_url
from .marker import Marker
from .native_reader import NativeReader
from .progress import CountingEmptyPlanner, CountingLoadPlanner, load_progress, tensor_bytes
from .ranked import PICKLE_PER_RANK
from .storage import storage_of
from .units import tensor_bytes_of

log = logging.getLogger(__name__)


class CheckpointReader:
    """One committed checkpoint, opened for reading (``open_checkpoint``)."""

    def __init__(self, path: Location, marker: Marker, metadata: Metadata) -> None:
        self.path, self.marker, self.metadata = path, marker, metadata

    @property
    def info(self) -> CheckpointInfo:
        return CheckpointInfo.from_marker(self.path, self.marker)

    @property
    def keys(self) -> list[str]:
        """The top-level keys of the saved ``app_state`` (the engine's RNG aside)."""
        return sorted(k for k in self.marker.entries if k != state.RNG_KEY)

    def run_config(self) -> dict[str, Any] | None:
        """The training config of the experiment that holds this checkpoint (its
        ``config.yaml``, as the job gave it), or None if there is none."""
        import yaml

        path = layout.ExperimentLayout(layout.experiment_of(self.path)).config_path
        try:
            data = yaml.safe_load(storage_of(path).read_bytes(path).decode())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CheckpointError(f"{path} is unreadable: {e}") from e
        return data if isinstance(data, dict) else None

    def kind(self, key: str) -> str:
        self._check_key(key)
        return str(self.marker.entries[key]["kind"])

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

    def load(
        self,
        app_state: dict[str, Any],
        *,
        optional: Collection[str] = (),
        process_group: dist.ProcessGroup | None = None,
        progress: bool | None = None,
    ) -> CheckpointInfo:
        """Restore the keys of ``app_state`` from this checkpoint as
        ``CheckpointManager.load`` does (modules resharded, objects in place, plain values
        replaced); the RNG is not restored. All or nothing: on any error ``app_state`` is
        as it was. With ``torch.distributed`` initialised the load is collective over
        ``process_group`` (default: the whole job; FSDP2 modules read their own shards),
        and every rank raises if any rank fails. ``progress``: a bar on stderr (default:
        on a terminal, rank 0, above ``progress.LOAD_THRESHOLD`` bytes)."""
        distributed = dist.is_available() and dist.is_initialized()
        group = process_group if distributed else None
        rank = dist.get_rank(group) if distributed else 0
        plan, error = None, None
        try:
            if distributed:  # every rank must read the same checkpoint
                paths: list[Any] = [None] * dist.get_world_size(group)
                dist.all_gather_object(paths, str(self.path), group=group)
                if len(set(paths)) > 1:
                    raise CheckpointError(
                        f"the ranks opened different checkpoints ({sorted(set(paths))}), e.g. "
                        "a latest that moved while they opened it; open one by its path"
                    )
            plan = state.build_load_plan(
                app_state,
                self.marker.entries,
                self.metadata,
                rank=rank,
                restore_rng=False,
                where=str(self.path),
                optional=optional,
                world_size=dist.get_world_size(group) if distributed else 1,
            )
        except Exception as e:
            error = e
        _agree(error, distributed, group, f"load of {self.path}", plan)
        assert plan is not None
        what = f"load {self.path.name}"
        try:
            with quiet_dcp(True), load_progress(what, tensor_bytes(plan.read), progress) as bar:
                dcp.load(
                    plan.read,
                    storage_reader=NativeReader(self.path),
                    planner=CountingLoadPlanner(bar),
                    process_group=group,
                    no_dist=not distributed,
                )
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            plan.rollback()
            raise CheckpointError(f"reading checkpoint {self.path} failed: {e}") from e
        try:
            plan.apply()
        except Exception as e:
            error = e
        _agree(error, distributed, group, f"restoring {self.path}", plan)
        return self.info

    def load_entries(
        self, keys: Sequence[str] | None = None, *, progress: bool | None = None
    ) -> dict[str, Any]:
        """The saved values of ``keys`` (default: all but the RNG) as plain Python:
        modules as state dicts, pickled objects unpickled, dicts keyed by int where they
        were saved so (a raw ``optimizer.state_dict()``). An optimizer comes as
        ``Optimizer.load_state_dict`` takes it (``{"state": {0: ...}, "param_groups":
        [{..., "params": [0, ...]}]}``, ids in the order of its groups); one saved before
        the engine recorded that order comes keyed by parameter name, as
        ``set_optimizer_state_dict`` takes it (``optim_layout.py``). A per-rank value comes
        as ``{"rank<r>": its state}``. ``progress``: as ``load``'s."""
        wanted = list(keys) if keys is not None else self.keys
        for key in wanted:
            self._check_key(key)
        loaded: dict[str, Any] = {}
        total = sum(tensor_bytes_of(m) for k in wanted for m in self.tensors(k).values())
        what = f"read {self.path.name}"
        with quiet_dcp(True), load_progress(what, total, progress) as bar:
            # DCP's own converter (format_utils.dcp_to_torch_save) does this: the public
            # dcp.load only fills keys the caller's dict already has.
            _load_state_dict(
                loaded,
                storage_reader=NativeReader(self.path),
                planner=CountingEmptyPlanner(bar, keys=set(wanted)),
                no_dist=True,
            )
        return {key: _plain(loaded.get(key), self.marker.entries[key]) for key in wanted}

    def load_tensor(self, fqn: str) -> torch.Tensor:
        """One tensor (its full value, whatever the sharding at save) by flat name."""
        meta = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{self.path} has no tensor {fqn!r}")
        out = torch.empty(meta.size, dtype=meta.properties.dtype)
        with quiet_dcp(True):
            dcp.load({fqn: out}, storage_reader=NativeReader(self.path), no_dist=True)
        return out

    def _check_key(self, key: str) -> None:
        if key not in self.marker.entries:
            raise CheckpointError(f"{self.path} has no key {key!r}; it has: {', '.join(self.keys)}")

    def close(self) -> None:
        """Nothing to release (no file stays open); for ``with`` blocks."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_checkpoint(
    path: str | os.PathLike[str] | Location,
    which: Which = "latest",
    *,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointReader:
    """A committed checkpoint, read-only: ``path`` names a checkpoint directory, an
    alias (``.../checkpoints/best``), or an experiment, in which ``which`` picks one
    (``"latest"``, ``"best"`` by the experiment's monitor, or a step). With ``verify``
    every file is checked against its digest first: an experiment's ``latest``/``best``
    go past a corrupt checkpoint (logged), a named one raises ``IntegrityError``.
    ``path`` may be a URL (``s3://...``, ``http(s)://...``); ``storage_options``: its file
    system's options (default: its environment, e.g. ``AWS_*``)."""
    p = resolve.follow(as_location(path, storage_options) if is_url(path) else path)
    exp = layout.ExperimentLayout(p)
    if storage_of(p).is_dir(exp.checkpoints_dir):
        found = resolve.candidates(exp, which, monitor=None, mode="min")
        named = which not in ("latest", "best")
    elif which != "latest":
        raise ValueError(f"which={which!r} picks among an experiment's checkpoints; {p} is one")
    else:
        info, marker = resolve.inspect_checkpoint_dir(p)
        found, named = [resolve.Candidate(info.path, info.step, marker)], True
    bad = []
    for c in found:
        problem = c.problem
        if c.marker is not None and problem is None:
            problems = resolve.file_problems(c.path, c.marker, digests=verify)
            problem = "; ".join(problems) if problems else None
        if c.marker is not None and problem is None:
            return CheckpointReader(c.path, c.marker, _metadata(c.path))
        if named:
            raise IntegrityError(f"{c.path} is corrupt: {problem}")
        log.warning("skipping %s for which=%r: %s", c.path, which, problem)
        bad.append(c.path.name)
    if bad:
        raise IntegrityError(f"no checkpoint of {p} verifies ({', '.join(bad)} are corrupt)")
    raise CheckpointNotFoundError(f"experiment {p} has no committed checkpoint")


def _plain(value: Any, entry: Mapping[str, Any]) -> Any:
    """One entry's value, as ``_load_state_dict`` read it, as plain Python."""
    if value is None:
        return None
    if entry.get("encoding") == state.PICKLE:
        return pickle.loads(value)
    if entry.get("encoding") == PICKLE_PER_RANK and isinstance(value, dict):
        return {rank: pickle.loads(blob) for rank, blob in value.items()}
    if entry["kind"] == state.OPTIMIZER:
        groups = entry.get("params")
        if groups is None:
            return optim_layout.flat_to_fqn(value)
        return optim_layout.flat_to_nested(value, groups, "ids")
    return trees.restore_int_keys(value, entry.get("int_keys") or [])


def _agree(
    error: Exception | None,
    distributed: bool,
    group: dist.ProcessGroup | None,
    what: str,
    plan: state.LoadPlan | None,
) -> None:
    """Raise on every rank if any rank failed (rolling this rank's ``plan`` back)."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [mine]
    if distributed:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if not failed:
        return
    if plan is not None:
        plan.rollback()
    if error is not None:
        raise error
    r, message = failed[0]
    raise CheckpointError(f"{what} failed on rank {r}: {message}")


def _metadata(path: Location) -> Metadata:
    try:
        return NativeReader(path).read_metadata()
    except Exception as e:
        raise IntegrityError(f"{layout.dcp_metadata_path(path)} is unreadable: {e}") from e


__all__ = ["CheckpointReader", "open_checkpoint"]
