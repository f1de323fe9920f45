"""Loading into a training job: resolve -> verify -> plan -> read -> apply, all or nothing.

- *resolve*: rank 0 lists what ``which`` may be (newest or best first) and every rank
  hears the same list;
- *verify*: every file against its digest, while the read below reads it (``raw/1``:
  ``native.NativeReader``), or before it (DCP's stock format: every rank reads its share
  of the files); a candidate that fails (or whose marker does not read) is skipped for
  ``latest``/``best`` and quarantined by the lease holder, so that ``latest``, retention
  and later saves never see it again (invariant 5); a named step or path raises;
- *plan*: fresh targets for every key, checked key by key and shape by shape; the
  staging memory is prepared here too, so that a failure to get it (a small
  ``/dev/shm``) comes before anything of the caller's changed;
- *read*: DCP fills the fresh targets (nothing of the caller's: a file that fails its
  digest here fails the candidate alone);
- *apply*: every rank writes into the caller's objects; if any rank fails, every rank
  rolls back (invariant 10).

A committed-looking checkpoint that cannot be loaded is never mistaken for a fresh run:
when nothing loads and something looked committed (or was quarantined before), the load
raises, naming them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import resolve, state, tiers
from .catalog import Catalog
from .comm import Comm
from .config import CheckpointConfig
from .errors import CheckpointError, IntegrityError
from .experiment import Experiment
from .index import CheckpointInfo, Which
from .location import Location
from .marker import SHARDS_RAW, Marker
from .native import METADATA_FILE
from .native_reader import DigestMismatch, NativeReader
from .progress import CountingLoadPlanner, load_progress, tensor_bytes
from .resolve import Candidate
from .storage import storage_of
from .units import fmt_bytes
from .writers import summary

log = logging.getLogger(__name__)


class Loader:
    """One manager's loads."""

    def __init__(
        self,
        config: CheckpointConfig,
        comm: Comm,
        experiment: Experiment,
        prepare: Callable[[Mapping[str, Any]], None],
        *,
        remote: Catalog | None = None,
    ) -> None:
        self.config, self._comm, self._exp, self._prepare = config, comm, experiment, prepare
        self._remote = remote
        """Rank 0 with a local tier: the remote experiment's catalog (resume looks in both
        tiers; a checkpoint is protected and quarantined in its own)."""
        self.rank, self.world_size = comm.rank, comm.world_size

    def load(
        self, app_state: dict[str, Any], which: Which, *, optional: Collection[str], verify: bool
    ) -> CheckpointInfo | None:
        # A candidate found corrupt while reading is quarantined and skipped (by name too,
        # should the quarantine fail): then the next one. Each candidate fails once at most.
        skipped: dict[Location, str] = {}
        while True:
            try:
                return self._load(app_state, which, optional=optional, verify=verify,
                                  skipped=skipped)  # fmt: skip
            except _CorruptInRead as e:
                if which not in ("latest", "best"):
                    raise IntegrityError(f"{e.candidate.path} is corrupt: {e.problem}") from e
                if self.rank == 0:
                    log.warning("skipping %s for which=%r: %s", e.candidate.path.name, which,
                                e.problem)  # fmt: skip
                skipped[e.candidate.path] = e.problem
                self._quarantine([(e.candidate, e.problem)], which)

    def _load(
        self,
        app_state: dict[str, Any],
        which: Which,
        *,
        optional: Collection[str],
        verify: bool,
        skipped: Mapping[Location, str],
    ) -> CheckpointInfo | None:
        found = self.resolve(which, verify, skipped)
        if found is None:
            log.info(
                "[rank=%d] no committed checkpoint in %s: starting fresh",
                self.rank,
                self._exp.layout.checkpoints_dir,
            )
            self._comm.everywhere(lambda: self._prepare(app_state), "preparing the staging")
            return None
        path, marker = found
        info = CheckpointInfo.from_marker(path, marker)
        in_read = verify and marker.shards == SHARDS_RAW  # digests checked while reading
        digests = _digests(marker) if in_read else None
        start = time.perf_counter()
        what = f"load of {path}"

        def plan_and_prepare() -> state.LoadPlan:
            plan = self._plan(app_state, path, marker, optional)
            try:
                self._prepare(app_state)  # before anything of the caller's changes
            except BaseException:
                plan.rollback()
                raise
            return plan

        plan: state.LoadPlan | None = None
        error: Exception | None = None
        try:
            plan = plan_and_prepare()
        except Exception as e:
            error = e
        try:
            self._comm.agree(error, what)
        except BaseException:
            if plan is not None:  # another rank failed: undo this rank's side effects
                plan.rollback()
            raise
        assert plan is not None
        try:
            total = tensor_bytes(plan.read)  # a bar above LOAD_THRESHOLD on a terminal
            with self._comm.dcp_call(), load_progress(f"load {path.name}", total) as bar:
                dcp.load(
                    plan.read,
                    storage_reader=NativeReader(path, digests=digests),
                    planner=CountingLoadPlanner(bar),
                    process_group=self._comm.group,
                    no_dist=not self._comm.distributed,
                )
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            plan.rollback()  # what was read went into the plan's targets only
            corrupt = _corruption(e) if in_read else None
            if corrupt is not None:  # every rank has DCP's failures of every rank
                raise _CorruptInRead(Candidate(path, info.step, marker), corrupt) from e
            raise CheckpointError(f"reading checkpoint {path} failed: {summary(e)}") from e
        try:
            self._comm.everywhere(plan.apply, f"restoring {path}")
        except BaseException:
            plan.rollback()
            raise
        owner = self._catalog_of(path)
        if owner is not None:
            owner.protect(info.step)  # the run resumed from it: retention keeps it
        if self.rank == 0:
            log.info(
                "[rank=0][step=%d] loaded %s (%s) in %.2f s",
                info.step,
                path,
                fmt_bytes(info.bytes),
                time.perf_counter() - start,
            )
        return info

    def resolve(
        self, which: Which, verify: bool, skipped: Mapping[Location, str] | None = None
    ) -> tuple[Location, Marker] | None:
        """The checkpoint ``which`` names, verified on every rank as far as it can be
        before the read (DCP's stock format: every file, each rank its share; ``raw/1``:
        ``.metadata``, its shard files being checked while read); None in an experiment
        that never had a committed checkpoint. ``skipped``: candidates that failed in a
        read, with why."""
        what = f"load of {which!r}"
        cfg = self.config
        exp = self._exp.layout
        if isinstance(which, (str, os.PathLike)) and which not in ("latest", "best"):
            which = cfg.location(which)  # a URL gets the config's storage options
        remote = self._remote

        def find() -> tuple[list[Candidate], list[str]]:
            if remote is None:
                found = resolve.candidates(exp, which, monitor=cfg.monitor, mode=cfg.mode)
            else:  # the local tier: either experiment
                found = tiers.candidates(exp, remote.exp, which, monitor=cfg.monitor, mode=cfg.mode)
            return found, [p.name for p in resolve.scan(exp).quarantined]

        listed = self._comm.decide(find, what)
        candidates, quarantined = listed
        bad: list[tuple[Candidate, str]] = []
        for c in candidates:
            problem = c.problem or (skipped or {}).get(c.path)
            if problem is None and c.marker is not None and verify:
                # raw/1: the shard files are checked while they are read, .metadata (which
                # says where each item is) before
                in_read = c.marker.shards == SHARDS_RAW
                only = [METADATA_FILE] if in_read and METADATA_FILE in c.marker.files else None
                if not in_read or only:
                    problems = self.file_problems(c.path, c.marker, what, only=only)
                    problem = "; ".join(problems) if problems else None
            if problem is None and c.marker is not None:
                self._quarantine(bad, which)
                return c.path, c.marker
            if which not in ("latest", "best"):
                raise IntegrityError(f"{c.path} is corrupt: {problem}")
            if self.rank == 0:
                log.warning("skipping %s for which=%r: %s", c.path.name, which, problem)
            bad.append((c, problem or "unreadable"))
        self._quarantine(bad, which)
        if bad or quarantined:
            names = [c.path.name for c, _ in bad] + quarantined
            raise IntegrityError(
                f"no checkpoint of {exp.root} can be loaded, and it is not a fresh run: "
                f"{', '.join(names)} failed verification (quarantined as step_*.corrupt; "
                f"see the log). Fix or remove them, load one by path with verify=False, or "
                f"start a new experiment"
            )
        return None

    def _quarantine(self, bad: list[tuple[Candidate, str]], which: Which) -> None:
        """Rank 0 (the lease holder): move the candidates that failed out of the owned
        names; the catalog forgets them and re-points ``latest``/``best``."""
        if self.rank != 0 or not bad or which not in ("latest", "best"):
            return
        for c, why in bad:
            owner = self._catalog_of(c.path)
            if owner is None:
                continue
            try:
                owner.quarantine(c.path, why)
            except (OSError, CheckpointError) as e:  # rank 0 alone: never fail the load here
                log.error("could not quarantine %s (%s); it stays skipped by name", c.path, e)

    def _catalog_of(self, path: Location) -> Catalog | None:
        """The catalog (local, or the remote tier's) whose checkpoint ``path`` is."""
        storage = storage_of(path)
        parent = storage.resolve(path.parent)
        for catalog in (self._exp.catalog, self._remote):
            if catalog is not None and parent == storage.resolve(catalog.exp.checkpoints_dir):
                return catalog
        return None

    def file_problems(
        self, path: Location, marker: Marker, what: str, *, only: list[str] | None = None
    ) -> list[str]:
        """Every rank checks every world_size-th file (of ``only``: all of them); all ranks
        get all the problems."""
        names = sorted(marker.files if only is None else only)[self.rank :: self.world_size]
        mine = resolve.file_problems(path, marker, digests=True, names=names)
        return [p for ps in self._comm.all_gather(mine, what) for p in ps]

    def _plan(
        self, app_state: dict[str, Any], path: Location, marker: Marker, optional: Collection[str]
    ) -> state.LoadPlan:
        metadata = NativeReader(path).read_metadata()
        return state.build_load_plan(
            app_state,
            marker.entries,
            metadata,
            rank=self.rank,
            restore_rng=self.config.capture_rng,
            where=str(path),
            optional=optional,
            world_size=self._comm.world_size,
        )


class _CorruptInRead(Exception):
    """A file failed its digest while the load read it."""

    def __init__(self, candidate: Candidate, problem: str) -> None:
        super().__init__(problem)
        self.candidate, self.problem = candidate, problem


def _digests(marker: Marker) -> dict[str, tuple[int, str | None]]:
    return {name: (f.size, f.crc32) for name, f in marker.files.items()}


def _corruption(e: BaseException) -> str | None:
    """The digest mismatches among a failed read's errors (of every rank), if any."""
    failures = e.failures.values() if isinstance(e, CheckpointException) else [e]
    found = []
    for failure in failures:
        f = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(f, DigestMismatch):
            found.append(str(f))
    return "; ".join(sorted(set(found))) or None


__all__ = ["Loader"]
