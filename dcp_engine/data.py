"""``ResumableDistributedSampler``: a ``DistributedSampler`` that knows where it is inside
an epoch, so that a run resumed from a checkpoint holding it (a value of ``app_state``)
sees exactly the samples it has not seen, on the same or on another world size."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data.distributed import DistributedSampler

_CHECKED = ("seed", "shuffle", "dataset_size")
"""State fields a resume must share: otherwise it would silently see other samples."""


class ResumableDistributedSampler(DistributedSampler[int], Stateful):
    """``DistributedSampler``'s order (a ``randperm`` seeded by ``seed + epoch``, or
    ``arange`` without ``shuffle``; rank ``r`` of ``W`` takes every ``W``-th sample from
    the ``r``-th; the last step padded, or cut with ``drop_last``), plus its position.

    Position: ``epoch`` and ``consumed``, the samples of the epoch's order that all ranks
    together have drawn (global, so independent of the world size). Each index this
    rank's iterator yields advances ``consumed`` by the world size: the ranks draw in
    step, so the position, and the state, are alike on every rank (saved once).
    ``state_dict()``/``load_state_dict()`` (a DCP ``Stateful``) carry it: put the sampler
    in ``app_state`` and a resumed loop that calls ``set_epoch(start.epoch)`` goes on at
    the first sample no rank has drawn.

    - Another world size: the samples not drawn yet are dealt out among the new ranks,
      each rank the same count (padded, or cut by fewer than the world size with
      ``drop_last``); none drawn already is drawn again (but as padding).
    - ``set_epoch(e)`` of another epoch starts ``e`` at its first sample; of the current
      one it keeps the position (a resumed epoch). A pass that ran to its end starts again
      when iterated anew (as ``DistributedSampler`` does without ``set_epoch``), except
      right after ``load_state_dict``: a resumed pass that had ended yields nothing more.
    - ``len(self)`` is what the next iteration yields on this rank: the rest of a resumed
      epoch; ``num_samples`` keeps ``DistributedSampler``'s meaning (a whole epoch).
    - The position counts what the iterator handed out, which is what training consumed
      when the indices are drawn as the batches are used: a ``DataLoader`` with
      ``num_workers=0``, or torchdata's ``StatefulDataLoader`` with any number of workers
      (it saves this sampler's state with its own, taken as each batch is drawn: put the
      loader in ``app_state`` instead of the sampler). A plain ``DataLoader`` with workers
      draws up to ``prefetch_factor * num_workers`` batches ahead: a resume would skip
      them.

    ``num_replicas``/``rank`` default to the default process group's, or 1 and 0 when
    ``torch.distributed`` is not initialised.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)  # type: ignore[arg-type]
        self.dataset_size = len(dataset)
        self.consumed = 0
        """Samples of the current epoch's order drawn by all ranks together."""
        self._resumed = False  # the position came from load_state_dict: keep it even at the end

    # ---------------------------------------------------------------- order

    def order(self) -> list[int]:
        """The current epoch's order of the whole data set (every rank's samples)."""
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def _per_rank(self, start: int) -> int:
        """How many samples each rank draws in a pass from ``start``."""
        left = max(0, self.dataset_size - start)
        if self.drop_last:
            return left // self.num_replicas
        return math.ceil(left / self.num_replicas)

    def _start(self) -> int:
        """Where the next pass starts: the position, or 0 after a finished pass."""
        if self._resumed or self._per_rank(self.consumed) > 0:
            return self.consumed
        return 0

    def __iter__(self) -> Iterator[int]:
        start = self._start()
        self._resumed = False
        self.consumed = start
        order = self.order()
        count = self._per_rank(start) * self.num_replicas
        rest = order[start:]
        while len(rest) < count:  # padded from the head of the order, as DistributedSampler
            rest += order[: count - len(rest)]
        return self._walk(rest[self.rank : count : self.num_replicas], start)

    def _walk(self, mine: list[int], start: int) -> Iterator[int]:
        for k, index in enumerate(mine, 1):
            # Before the yield: once this rank handed out its k-th index, every rank has
            # (they draw in step), and the batch that holds it is the loop's.
            self.consumed = min(start + k * self.num_replicas, self.dataset_size)
            yield index

    def __len__(self) -> int:
        return self._per_rank(self._start())

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch`` at its first sample; a no-op in the current epoch (a resumed run
        keeps its position)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.consumed, self._resumed = epoch, 0, False

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": int(self.epoch),
            "consumed": int(self.consumed),
            "seed": int(self.seed),
            "shuffle": bool(self.shuffle),
            "dataset_size": int(self.dataset_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The saved position; the world size may differ from the saver's. A state of
        another seed, order or data set size is refused (``ValueError`` naming it)."""
        missing = [k for k in ("epoch", "consumed", *_CHECKED) if k not in state_dict]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)}: {state_dict!r}")
        mine = self.state_dict()
        for key in _CHECKED:
            if state_dict[key] != mine[key]:
                raise ValueError(
                    f"sampler state was saved with {key}={state_dict[key]!r}, this sampler "
                    f"has {key}={mine[key]!r}: the resumed run would see other samples"
                )
        consumed = int(state_dict["consumed"])
        if not 0 <= consumed <= self.dataset_size:
            raise ValueError(f"sampler state has consumed={consumed} of {self.dataset_size}")
        self.epoch, self.consumed, self._resumed = int(state_dict["epoch"]), consumed, True


__all__ = ["ResumableDistributedSampler"]
