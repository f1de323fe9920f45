"""What a save gives back: a ``SaveHandle`` (futures for staged and committed, skipped)
and its figures, ``SaveStats``."""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass

from .index import CheckpointInfo


@dataclass(frozen=True)
class SaveStats:
    """The figures of one save on this rank (``bytes`` is the whole checkpoint).

    ``save`` held the caller ``blocked_s = waited_s + staged_s``: first a wait for the
    previous save (``waited_s``), then the copy of the state and the agreement of the
    ranks (``staged_s``)."""

    step: int
    bytes: int
    write_s: float
    """DCP write of the shards on this rank, fsync included."""
    commit_s: float
    """Marker, rename, directory fsyncs, index and alias (rank 0's work, waited for)."""
    total_s: float
    """From the call until committed."""
    skipped: bool = False
    waited_s: float = 0.0
    """How long ``save`` waited for the previous save to finish writing: on this rank,
    or, at the ranks' agreement, on the rank that waited longest (the ranks stage in
    step, so its wait held every rank); at most the whole time ``save`` held the caller.
    Zero with ``async_mode="off"``."""
    staged_s: float = 0.0
    """The rest of the time ``save`` held the caller: building the state dict, copying it
    into the staging buffers, agreeing with the other ranks (and, with
    ``staging="overlap"``, optimizer steps waiting for the deferred copy). With
    ``async_mode="off"``: the whole save, write and commit included."""
    planned: bool = False
    """DCP's global planning ran (the first save, or a state whose structure changed): a
    gather and a broadcast more; otherwise every rank reused its cached plan."""

    @property
    def blocked_s(self) -> float:
        """How long ``save`` held the caller: ``waited_s + staged_s``."""
        return self.waited_s + self.staged_s

    @property
    def gbps(self) -> float:
        """Bytes per second from the call to the commit, in 10^9 (``fmt_bytes`` for 2^30)."""
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else math.inf


class Outcome(Future[CheckpointInfo]):
    """A save's ``committed`` future; it remembers whether the caller was given the
    save's error (``result()`` raised it, or ``exception()`` returned it)."""

    observed = False

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        try:
            return super().result(timeout)
        except BaseException:
            self._look()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        self._look()
        return error

    def _look(self) -> None:
        if self.done() and not self.cancelled() and super().exception(0) is not None:
            self.observed = True


class SaveHandle:
    """What ``CheckpointManager.save`` returns: ``staged`` resolves once the state is
    copied (the caller may then change it), ``committed`` to the ``CheckpointInfo`` once
    the checkpoint exists (or to the save's error). ``skipped``: not saved at all
    (``when_busy="skip"``); both futures are then cancelled."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.staged: Future[None] = Future()
        self.committed = Outcome()
        self.skipped = False
        self.stats: SaveStats | None = None
        """The save's figures, once committed (or skipped)."""
        self.metrics: dict[str, float] = {}
        """The metrics the marker records: every rank's, reduced as
        ``CheckpointConfig.metrics_reduce`` says (alike on every rank), once the ranks
        agreed on the save (when ``save`` returns)."""
        self.uploaded: Future[CheckpointInfo] | None = None
        """With a local tier (``local_dir``), on rank 0: resolves to the remote
        checkpoint once its upload to ``root_dir`` committed (or to the upload's error).
        None elsewhere."""

    @property
    def observed(self) -> bool:
        """The caller was given the save's error here: the next ``save``/``wait`` does not
        raise it again on this rank."""
        return self.committed.observed

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint (waits; raises the save's error)."""
        return self.committed.result(timeout)

    def _skip(self, stats: SaveStats) -> None:
        self.skipped, self.stats = True, stats
        self.staged.cancel()
        self.committed.cancel()

    def __repr__(self) -> str:
        what = "skipped" if self.skipped else "committed" if self.committed.done() else "pending"
        return f"SaveHandle(step={self.step}, {what})"


__all__ = ["SaveHandle", "SaveStats"]
