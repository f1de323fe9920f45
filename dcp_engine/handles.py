"""What a save gives back: a ``SaveHandle`` (futures for staged and committed, skipped)
and its figures, ``SaveStats``."""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass

from .index import CheckpointInfo


@dataclass(frozen=True)
class SaveStats:
    """The figures of one save, the same on every rank (``bytes`` is the whole checkpoint)."""

    step: int
    bytes: int
    blocked_s: float
    """How long ``save`` held the caller (staging; a wait for the previous save aside)."""
    write_s: float
    """DCP write of the shards on this rank, fsync included."""
    commit_s: float
    """Marker, rename, directory fsyncs, index and alias (rank 0's work, waited for)."""
    total_s: float
    """From the call until committed."""
    skipped: bool = False
    waited_s: float = 0.0
    """How long ``save`` waited for the previous save before staging (``when_busy``)."""

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else math.inf


class SaveHandle:
    """What ``CheckpointManager.save`` returns: ``staged`` resolves once the state is
    copied (the caller may then change it), ``committed`` to the ``CheckpointInfo`` once
    the checkpoint exists (or to the save's error). ``skipped``: not saved at all
    (``when_busy="skip"``); both futures are then cancelled."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.staged: Future[None] = Future()
        self.committed: Future[CheckpointInfo] = Future()
        self.skipped = False
        self.stats: SaveStats | None = None
        """The save's figures, once committed (or skipped)."""
        self.observed = False
        """The caller has seen the save's error here: the next ``save``/``wait`` does
        not raise it again."""

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint (waits; raises the save's error)."""
        try:
            return self.committed.result(timeout)
        except BaseException as e:
            self.observed = self.committed.done() and e is self.committed.exception()
            raise

    def _skip(self, stats: SaveStats) -> None:
        self.skipped, self.stats = True, stats
        self.staged.cancel()
        self.committed.cancel()

    def __repr__(self) -> str:
        what = "skipped" if self.skipped else "committed" if self.committed.done() else "pending"
        return f"SaveHandle(step={self.step}, {what})"


__all__ = ["SaveHandle", "SaveStats"]
