"""The experiment a job writes: its name, its lease, its directories and its catalog.

Rank 0 opens it (``Experiment.open``): chooses the directory (``config.resume`` and
``experiment_name``), takes the lease (``OWNER``, refused by name while another job
holds it), creates the directories, writes ``config.yaml`` once, sweeps what crashed
saves left and reads the catalog. Only the lease holder does any of that; the other
ranks follow with the name rank 0 chose (``Experiment.follow``) and write nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import layout, resolve
from .catalog import Catalog
from .committer import Committer, PhaseHook
from .config import CheckpointConfig
from .errors import CheckpointError
from .lease import Lease
from .location import Location
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Rank 0's choice, sent to every rank."""

    name: str
    """The experiment directory's name under ``root_dir``."""
    source: str | None
    """The checkpoint a fresh branch starts from (``resume=<path>``); None otherwise."""


class Experiment:
    """One experiment directory as this rank uses it."""

    def __init__(
        self,
        config: CheckpointConfig,
        plan: Plan,
        storage: Storage,
        catalog: Catalog,
        lease: Lease | None = None,
    ) -> None:
        self.config, self.plan, self.storage, self.catalog = config, plan, storage, catalog
        self.layout = layout.ExperimentLayout(config.root_path / plan.name)
        self.lease = lease

    @property
    def root(self) -> Location:
        return self.layout.root

    @classmethod
    def open(
        cls,
        config: CheckpointConfig,
        storage: Storage,
        *,
        run_config: Mapping[str, Any] | None = None,
        hook: PhaseHook,
    ) -> Experiment:
        """Rank 0: choose, lease, create, sweep, read the catalog."""
        plan = choose(config, storage)
        exp = layout.ExperimentLayout(config.root_path / plan.name)
        storage.mkdir(exp.root)
        lease = Lease.acquire(
            exp.owner_path, storage, stale_after_s=config.lease_timeout_s, fsync=config.fsync
        )
        try:
            storage.mkdir(exp.checkpoints_dir)
            committer = Committer(exp, storage, lease, fsync=config.fsync, hook=hook)
            committer.sweep()
            _write_config(exp, storage, config, run_config)
            catalog = Catalog(
                exp,
                config.retention,
                committer=committer,
                storage=storage,
                fsync=config.fsync,
                aliases=(config.save_last, config.save_best),
            )
            catalog.open()
        except BaseException:
            lease.release()
            raise
        return cls(config, plan, storage, catalog, lease)

    @classmethod
    def follow(cls, config: CheckpointConfig, plan: Plan, storage: Storage) -> Experiment:
        """Ranks other than 0: the experiment rank 0 opened; a read-only catalog mirror."""
        exp = layout.ExperimentLayout(config.root_path / plan.name)
        catalog = Catalog(exp, config.retention, committer=None, storage=storage)
        return cls(config, plan, storage, catalog)

    def close(self, timeout: float) -> None:
        """Finish retention, then give the lease back."""
        try:
            self.catalog.close(timeout)
        finally:
            if self.lease is not None:
                self.lease.release()


def choose(config: CheckpointConfig, storage: Storage) -> Plan:
    """Rank 0: the experiment directory's name, and the checkpoint a branch starts from.

    - fresh (``resume=None``): ``experiment_name``, or a new default name that no other
      job has (the directory is created exclusively);
    - ``"latest"``/``"best"``: continue in place: ``experiment_name``, else the newest
      default-named run of this model and dataset that has a committed checkpoint;
    - a path: a branch into ``experiment_name`` (never the source's own experiment). A
      branch that already has checkpoints of its own was restarted: it resumes from its
      own newest, not from the source again.
    """
    resume, name = config.resume, config.experiment_name
    if resume is None:
        return Plan(name or _new_default(config, storage), None)
    if resume in ("latest", "best"):
        return Plan(name or _newest_run(config, storage) or _new_default(config, storage), None)
    source = resolve.checkpoint_dir_of(config.location(resume))
    source_exp = storage.resolve(layout.experiment_of(source))
    if name and storage.resolve(config.root_path / name) != source_exp:
        own = resolve.scan(layout.ExperimentLayout(config.root_path / name))
        if own.committed or own.corrupt or own.quarantined:
            log.info(
                "resume=%s: branch %s already has checkpoints of its own (a restart): "
                "resuming from its newest",
                resume,
                config.root_path / name,
            )
            return Plan(name, None)
    if not name:
        name = _new_default(config, storage)
    elif storage.resolve(config.root_path / name) == source_exp:
        name = f"{name}_branch_{time.strftime('%Y%m%d_%H%M%S')}"
    log.info("resume=%s: branching from %s into %s", resume, source, config.root_path / name)
    return Plan(name, str(source))


def _new_default(config: CheckpointConfig, storage: Storage) -> str:
    """A default name whose directory this call created (two jobs never get one name)."""
    when = time.time()
    storage.mkdir(config.root_path)
    for attempt in range(1, 1000):
        name = layout.default_experiment_name(config.model_name, config.dataset_name, when, attempt)
        try:
            storage.mkdir(config.root_path / name, exist_ok=False)
        except FileExistsError:
            continue
        claim = config.root_path / name / layout.CLAIM_FILE
        if not storage.renames and not storage.create_exclusive(claim, f"{when}\n".encode()):
            continue  # another job claimed this name in the same second
        return name
    raise CheckpointError(f"no free experiment name under {config.root_path} for {name}")


def _newest_run(config: CheckpointConfig, storage: Storage) -> str | None:
    names = [c.name for c in storage.children(config.root_path) if c.kind == "dir"]
    for name in sorted(names, key=_run_order, reverse=True):
        ours = layout.is_default_experiment_name(name, config.model_name, config.dataset_name)
        if ours and resolve.scan(layout.ExperimentLayout(config.root_path / name)).committed:
            return name
    return None


def _run_order(name: str) -> tuple[str, int]:
    """``..._HHMMSS-10`` after ``..._HHMMSS-9`` after ``..._HHMMSS``."""
    base, _, attempt = name.rpartition("-")
    return (base, int(attempt)) if attempt.isdigit() and base else (name, 1)


def _write_config(
    exp: layout.ExperimentLayout,
    storage: Storage,
    config: CheckpointConfig,
    run_config: Mapping[str, Any] | None,
) -> None:
    """``config.yaml``, once: the training config as given (default: this config)."""
    path = exp.config_path
    if storage.exists(path):
        return
    import yaml

    data = dict(run_config) if run_config is not None else {"checkpoint": config.to_dict()}
    try:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    except yaml.YAMLError as e:
        raise CheckpointError(f"run_config cannot be written to {path}: {e}") from e
    storage.write_atomic(path, text.encode(), fsync=config.fsync)


__all__ = ["Experiment", "Plan", "choose"]
