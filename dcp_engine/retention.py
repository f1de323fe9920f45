"""Which committed checkpoints to keep: pure functions over entries, composed by union.

Each policy maps the committed entries to the steps it keeps; ``RetentionPolicy`` keeps
the union of the policies that are set, plus the protected steps (the newest, the best,
the one the run resumed from). Nothing here touches the disk: the manager deletes what
``to_delete`` returns, on rank 0, after a commit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Entry(Protocol):
    """What the policies read of a committed checkpoint (``CheckpointInfo`` has it)."""

    @property
    def step(self) -> int: ...

    @property
    def epoch(self) -> int | None: ...

    @property
    def metrics(self) -> object: ...


E = TypeVar("E", bound=Entry)


def metric_of(entry: Entry, monitor: str) -> float:
    """The entry's ``monitor`` value; NaN when missing or not a number (ranks worst)."""
    metrics = entry.metrics
    value = metrics.get(monitor) if isinstance(metrics, Mapping) else None
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def rank_by_metric(entries: Iterable[E], monitor: str, mode: str) -> list[E]:
    """Best first: by ``monitor`` (``mode="min"`` or ``"max"``); a value that is missing
    or not finite (NaN, a diverged -inf or +inf) ranks last, whatever the mode, and is
    never the best; ties broken by the newer step."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(e: E) -> tuple[bool, float, int]:
        v = metric_of(e, monitor)
        bad = not math.isfinite(v)
        return (bad, 0.0 if bad else sign * v, -e.step)

    return sorted(entries, key=key)


def best(entries: Iterable[E], monitor: str | None, mode: str) -> E | None:
    """The best entry by a finite ``monitor`` value (newest among equals); None if none has one."""
    if monitor is None:
        return None
    for e in rank_by_metric(entries, monitor, mode):
        if math.isfinite(metric_of(e, monitor)):
            return e
    return None


def keep_top_k(entries: Sequence[Entry], k: int, monitor: str, mode: str) -> set[int]:
    """The steps of the ``k`` best by a finite ``monitor`` value (``-1``: all, ``0``:
    none); a checkpoint without one never takes a slot."""
    if k < 0:
        return {e.step for e in entries}
    ranked = [e for e in rank_by_metric(entries, monitor, mode)
              if math.isfinite(metric_of(e, monitor))]  # fmt: skip
    return {e.step for e in ranked[:k]}


def keep_last_n(entries: Sequence[Entry], n: int) -> set[int]:
    """The steps of the ``n`` newest (highest step)."""
    if n <= 0:
        return set()
    return set(sorted(e.step for e in entries)[-n:])


def keep_every_n_steps(entries: Sequence[Entry], n: int) -> set[int]:
    """Permanent periodic checkpoints: every step that is a multiple of ``n``."""
    return {e.step for e in entries if e.step % n == 0}


def keep_every_n_epochs(entries: Sequence[Entry], n: int) -> set[int]:
    """Permanent periodic checkpoints: the end of every n-th epoch, i.e. the newest
    checkpoint of each 0-based epoch ``n - 1``, ``2n - 1``, ... (``epoch_0010`` is the
    end of the 10th): the epochs ``save_every_n_epochs=n`` saves."""
    newest: dict[int, int] = {}
    for e in entries:
        if e.epoch is not None and (e.epoch + 1) % n == 0:
            newest[e.epoch] = max(newest.get(e.epoch, -1), e.step)
    return set(newest.values())


def keep_epochs(entries: Sequence[Entry], epochs: Iterable[int]) -> set[int]:
    """Permanent checkpoints of named epochs (0-based): the newest of each, its end."""
    wanted, newest = set(epochs), dict[int, int]()
    for e in entries:
        if e.epoch is not None and e.epoch in wanted:
            newest[e.epoch] = max(newest.get(e.epoch, -1), e.step)
    return set(newest.values())


@dataclass(frozen=True)
class RetentionPolicy:
    """The union of the policies that are set. None of them set (or ``keep_top_k=-1``):
    keep everything."""

    keep_top_k: int | None = None
    monitor: str | None = None
    mode: str = "min"
    keep_last_n: int | None = None
    keep_every_n_steps: int | None = None
    keep_every_n_epochs: int | None = None
    keep_epochs: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.keep_top_k not in (None, -1, 0) and self.monitor is None:
            raise ValueError("keep_top_k needs a monitor to rank by")

    @property
    def keeps_all(self) -> bool:
        return self.keep_top_k == -1 or (
            self.keep_top_k is None
            and self.keep_last_n is None
            and self.keep_every_n_steps is None
            and self.keep_every_n_epochs is None
        )  # keep_epochs alone keeps everything too: it only adds to the policies above

    def protected(self, entries: Sequence[Entry], also: Iterable[int] = ()) -> set[int]:
        """Kept whatever the policy: the newest, the best, and the steps in ``also`` (the
        one the run resumed from)."""
        keep = set(also)
        if entries:
            keep.add(max(e.step for e in entries))
        top = best(entries, self.monitor, self.mode)
        if top is not None:
            keep.add(top.step)
        return keep

    def kept(self, entries: Sequence[Entry], also: Iterable[int] = ()) -> set[int]:
        """The steps to keep: the union of the policies set, plus the protected ones."""
        if self.keeps_all:
            return {e.step for e in entries}
        keep = self.protected(entries, also)
        if self.keep_top_k is not None and self.monitor is not None:
            keep |= keep_top_k(entries, self.keep_top_k, self.monitor, self.mode)
        if self.keep_last_n is not None:
            keep |= keep_last_n(entries, self.keep_last_n)
        if self.keep_every_n_steps is not None:
            keep |= keep_every_n_steps(entries, self.keep_every_n_steps)
        if self.keep_every_n_epochs is not None:
            keep |= keep_every_n_epochs(entries, self.keep_every_n_epochs)
        keep |= keep_epochs(entries, self.keep_epochs)
        return keep

    def to_delete(self, entries: Sequence[Entry], also: Iterable[int] = ()) -> list[int]:
        """The steps of ``entries`` that no policy keeps, oldest first."""
        keep = self.kept(entries, also)
        return sorted(e.step for e in entries if e.step not in keep)


__all__ = [
    "RetentionPolicy",
    "best",
    "keep_epochs",
    "keep_every_n_epochs",
    "keep_every_n_steps",
    "keep_last_n",
    "keep_top_k",
    "metric_of",
    "rank_by_metric",
]
