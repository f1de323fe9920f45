"""The one agreement before a save: every rank's answer to "can this save go ahead?",
gathered on every rank, and the verdict every rank draws from the same answers (so every
rank raises the same error, skips alike or goes on together)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .comm import unwire_error
from .errors import CheckpointError


@dataclass(frozen=True)
class Answer:
    """One rank's answer to "can this save go ahead?", gathered on every rank."""

    step: object
    shape: dict[str, Any]
    busy: bool = False
    error: tuple[str, str] | None = None
    renew: bool = False
    plan_cached: bool = False
    """This rank's plan has the structure of its cached global plan (``shards.py``)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """This rank's metrics for the marker (reduced across ranks: ``metrics.py``)."""
    waited: float = 0.0
    """Seconds this rank waited for its previous save before staging."""


def verdict(gathered: list[Answer], what: str) -> Exception | None:
    """The same decision on every rank, from the same gathered answers."""
    failed = [(r, g.error) for r, g in enumerate(gathered) if g.error is not None]
    if failed:
        r, wired = failed[0]
        return unwire_error(wired, f"{what} failed on rank {r}")
    if any(g.busy for g in gathered):
        return None
    steps = sorted({g.step for g in gathered}, key=str)
    if len(steps) > 1:
        return CheckpointError(f"ranks disagree on the step to save: {steps}")
    for r, g in enumerate(gathered):
        if g.shape != gathered[0].shape:
            return CheckpointError(
                f"{what}: rank {r} has app_state {describe(g.shape)}, "
                f"rank 0 has {describe(gathered[0].shape)}"
            )
    return None


def describe(entries: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v['kind']}" for k, v in sorted(entries.items())) + "}"


__all__ = ["Answer", "verdict"]
