"""Metrics across ranks: every rank's numbers for a checkpoint, reduced to the one set its
marker records (``CheckpointConfig.metrics_reduce``). A pure function of the gathered
values, so every rank computes the same result, or raises the same error."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .errors import CheckpointError

REDUCTIONS = ("mean", "max", "min", "rank0", "same")
"""``mean`` (default), ``max``, ``min``: of the ranks that passed the metric; ``rank0``:
rank 0's values alone; ``same``: every rank must pass the same values (an error names the
metric and each rank's value otherwise)."""


def reduce_metrics(
    per_rank: Sequence[Mapping[str, float]], how: str, what: str = "metrics"
) -> dict[str, float]:
    """One value per metric name from every rank's ``{name: float}``, in rank 0's order
    of names, then the others'. Values alike on every rank that has them are kept as they
    are (bit for bit, whatever ``how``); a NaN on any rank makes the reduction NaN."""
    if how not in REDUCTIONS:
        raise ValueError(f"metrics_reduce must be one of {REDUCTIONS}, got {how!r}")
    if how == "rank0" or len(per_rank) == 1:
        return dict(per_rank[0])
    names = list(dict.fromkeys(name for metrics in per_rank for name in metrics))
    out: dict[str, float] = {}
    for name in names:
        values = [m[name] for m in per_rank if name in m]
        if how == "same" and (len(values) < len(per_rank) or not _alike(values)):
            each = ", ".join(f"rank {r}: {m.get(name, '(none)')}" for r, m in enumerate(per_rank))
            raise CheckpointError(
                f"{what}: metric {name!r} differs between ranks ({each}) and "
                "metrics_reduce='same' wants it alike on every rank; reduce it before "
                "passing it (all_reduce), or set metrics_reduce to 'mean', 'max', 'min' "
                "or 'rank0'"
            )
        if _alike(values):
            out[name] = values[0]
        elif any(math.isnan(v) for v in values):
            out[name] = math.nan
        elif how == "mean":
            out[name] = math.fsum(values) / len(values)
        else:
            out[name] = max(values) if how == "max" else min(values)
    return out


def _alike(values: Sequence[float]) -> bool:
    first = values[0]
    return all(v == first or (math.isnan(v) and math.isnan(first)) for v in values)


__all__ = ["REDUCTIONS", "reduce_metrics"]
