"""Optimizer hooks of the async modes.

- Overlapped staging (``staging="overlap"``): ``save`` returns before the copy of
  parameters and optimizer state is done; a step pre-hook on every optimizer of
  ``app_state`` waits for that copy, so no step changes a tensor before it is copied.
- An optimizer without state at ``prepare`` (before its first step) gets its staging
  buffers right after its first step (DCP would create the state by stepping it with
  zero gradients, which moves e.g. Adam's step count: a run's trajectory must not
  depend on the checkpointer).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import CheckpointError
from .staging import StagingPool


class OptimizerHooks:
    """The hooks one manager put on optimizers; ``remove()`` takes them all off."""

    def __init__(self, pool: StagingPool | None, timeout_s: float) -> None:
        self._pool, self._timeout_s = pool, timeout_s
        self._copied = threading.Event()  # set while no staging copy is pending
        self._copied.set()
        self._pre: dict[int, Any] = {}  # id(optimizer) -> step pre-hook handle
        self._first: dict[int, Any] = {}  # id(optimizer) -> prepare-after-first-step handle
        self.wait_s = 0.0
        """How long optimizer steps waited for the copy of the save in flight."""

    def hook(self, app_state: Mapping[str, Any]) -> None:
        """Overlapped staging: every optimizer step waits for the pending copy."""
        for value in app_state.values():
            if isinstance(value, torch.optim.Optimizer) and id(value) not in self._pre:
                self._pre[id(value)] = value.register_step_pre_hook(self._before_step)

    def pending(self) -> None:
        """A copy is pending from now until ``done()``."""
        self.wait_s = 0.0
        self._copied.clear()

    def done(self) -> None:
        self._copied.set()

    def _before_step(self, *_: Any) -> None:
        if self._copied.is_set():
            return
        start = time.perf_counter()
        if not self._copied.wait(self._timeout_s):
            raise CheckpointError(f"the staging copy did not finish within {self._timeout_s:.0f} s")
        self.wait_s += time.perf_counter() - start

    def after_first_step(
        self, optimizer: torch.optim.Optimizer, prepare: Callable[[], None]
    ) -> None:
        """Once: run ``prepare`` right after ``optimizer``'s first step."""
        if id(optimizer) in self._first:
            return
        this = weakref.ref(self)  # the hook must not keep the manager alive

        def after_step(*_: Any) -> None:
            handle.remove()
            hooks = this()
            if hooks is not None and hooks._first.pop(id(optimizer), None) is not None:
                prepare()

        handle = optimizer.register_step_post_hook(after_step)
        self._first[id(optimizer)] = handle

    def remove(self) -> None:
        for handle in [*self._pre.values(), *self._first.values()]:
            handle.remove()
        self._pre.clear()
        self._first.clear()
        self._copied.set()


__all__ = ["OptimizerHooks"]
