"""DINO's schedules: one value per iteration, precomputed (``utils.cosine_scheduler``).

They are functions of the global iteration, so their position in a checkpoint is the
iteration (the checkpoint's step): a resumed run indexes them where the killed one was.
"""

from __future__ import annotations

import numpy as np


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` over ``warmup_epochs``, then a cosine from
    ``base_value`` to ``final_value``; ``epochs * niter_per_ep`` values."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else []
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1))
    )
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != epochs * niter_per_ep:
        raise AssertionError(f"schedule of {len(schedule)} values for {epochs}x{niter_per_ep}")
    return schedule
