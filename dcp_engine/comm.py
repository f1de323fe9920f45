"""The manager's own gloo group, so checkpoint collectives never share a communicator
with the training's (NCCL or gloo) and every wait on another rank is bounded."""

from __future__ import annotations

import contextlib
import datetime as _dt
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist

from . import errors
from .errors import CheckpointError

T = TypeVar("T")


class Comm:
    """Rank, world size and the few collectives the engine needs, on a side group.

    Without an initialised default process group this is a 1-rank world whose
    collectives are identities, so the engine runs unchanged in a plain script.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        timeout_s: float,
        ranks: tuple[int, ...] = (),
        purpose: str = "control",
    ) -> None:
        self.group = group
        self.timeout = _dt.timedelta(seconds=timeout_s)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self._ranks, self._purpose = ranks, purpose
        self.broken = False
        """A collective on the group failed (a rank died or timed out): ``renew`` it."""

    @classmethod
    def create(
        cls, process_group: dist.ProcessGroup | None, timeout_s: float, purpose: str = "control"
    ) -> Comm:
        """A side group of its own over the ranks of ``process_group``: the foreground's
        decisions (``control``) and the background writes (``io``) never share one, nor do
        two managers, so no two callers ever interleave collectives on one group.
        Collective over the whole job (``new_group``): every rank creates them in the
        same order, as it constructs its managers."""
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialised")
            return cls(None, timeout_s)
        base = process_group if process_group is not None else dist.group.WORLD
        ranks = tuple(sorted(dist.get_process_group_ranks(base)))
        return cls(_side_group(ranks, timeout_s, purpose), timeout_s, ranks, purpose)

    def renew(self) -> None:
        """A fresh side group after a failure broke this one (a gloo group whose peer
        timed out or died stays dead). Collective: every rank renews at the same call,
        i.e. at the first save after a failed one (every rank's save failed)."""
        if self.group is None or not self.broken:
            return
        try:
            self.group = _side_group(self._ranks, self.timeout.total_seconds(), self._purpose)
        except RuntimeError as e:  # a rank is gone, or still stuck in the failed save
            raise CheckpointError(
                f"renewing the checkpoint group after a failed save: not every rank arrived "
                f"within {self.timeout.total_seconds():.0f} s ({e})"
            ) from e
        self.broken = False

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def _global(self, group_rank: int) -> int:
        assert self.group is not None
        return dist.get_global_rank(self.group, group_rank)

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        with self._bounded(what):
            dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def all_gather(self, obj: Any, what: str) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._bounded(what):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """A collective that failed (a rank died, or did not arrive within the group's
        timeout) raises a ``CheckpointError`` that says what was being done."""
        try:
            yield
        except RuntimeError as e:
            self.broken = True
            raise CheckpointError(
                f"{what}: the checkpoint group failed (a rank died or did not arrive within "
                f"{self.timeout.total_seconds():.0f} s): {e}"
            ) from e

    def decide(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        result: Any = None
        error: Exception | None = None
        if self.is_coordinator:
            try:
                result = fn()
            except Exception as e:
                error = e
        if self.distributed:
            payload = ("err", wire_error(error)) if error else ("ok", result)
            kind, value = self.broadcast(payload if self.is_coordinator else None, what)
            if kind == "err" and error is None:
                raise unwire_error(value, f"{what} failed on rank 0")
            result = value
        if error is not None:
            raise error
        return result

    def everywhere(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if it fails on any, raise on all (before a collective)."""
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, e
        self.agree(error, what)
        return result  # type: ignore[return-value]

    def agree(self, error: Exception | None, what: str) -> None:
        """Raise on every rank if any rank has an error: its own, or the first other
        rank's as the same exception type, so that every rank takes the same branch."""
        if self.distributed:
            gathered = self.all_gather(None if error is None else wire_error(error), what)
            bad = [(r, e) for r, e in enumerate(gathered) if e is not None]
            if bad and error is None:
                raise unwire_error(bad[0][1], f"{what} failed on rank {bad[0][0]}")
        if error is not None:
            raise error

    def dcp_call(self) -> contextlib.AbstractContextManager[None]:
        """Around a DCP save/load on this group (``quiet_dcp`` in a 1-rank world)."""
        return quiet_dcp(self.group is None)

    def release(self) -> None:
        """Stop using the group (it is not destroyed: a peer may still be in a
        collective on it, and destroying a gloo group under one can hang)."""
        self.group = None


@contextlib.contextmanager
def quiet_dcp(no_dist: bool) -> Iterator[None]:
    """Around a DCP call: without a process group DCP warns that it assumes one process;
    that is exactly the intent, so the warning is silenced there (only there)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


_WIRE_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        ValueError, TypeError, errors.CheckpointError, errors.CheckpointNotFoundError,
        errors.NotACheckpointError, errors.IntegrityError, errors.StateMismatchError,
        errors.ExperimentLockedError, errors.TimelineError,
    )
}  # fmt: skip


def wire_error(error: Exception) -> tuple[str, str]:
    """An error as it crosses to the other ranks."""
    return type(error).__name__, str(error)


def unwire_error(wired: tuple[str, str], context: str) -> Exception:
    """Another rank's error as the same type (CheckpointError for types not ours)."""
    name, message = wired
    cls = _WIRE_TYPES.get(name)
    if cls is None:
        return CheckpointError(f"{context}: {name}: {message}")
    return cls(f"{context}: {message}")


# Subsets of the world get hashed group names from ``new_group`` (local synchronisation),
# so a group over the same ranks cannot be created twice: those are cached and shared.
# Whole-world groups get a new name each time (every rank calls ``new_group``).
_SUBSET_GROUPS: dict[tuple[tuple[int, ...], float, str], dist.ProcessGroup] = {}


def _side_group(ranks: tuple[int, ...], timeout_s: float, purpose: str) -> dist.ProcessGroup:
    subset = len(ranks) < dist.get_world_size()
    key = (ranks, timeout_s, purpose)
    group = _SUBSET_GROUPS.get(key) if subset else None
    if group is not None and group in dist.distributed_c10d._world.pg_map:
        return group
    group = dist.new_group(
        ranks=list(ranks),
        backend="gloo",
        timeout=_dt.timedelta(seconds=timeout_s),
        # For a subset only its members take part; for the whole world every rank does.
        use_local_synchronization=subset,
    )
    if subset:
        _SUBSET_GROUPS[key] = group
    return group
