"""The line a committed save prints on rank 0, and where it goes.

    [rank=0][step=1200] saved 1.2 GiB: blocked 14.0 ms (waited 10.2 ms + staged 3.8 ms),
    committed 0.81 s after the call (1.5 GiB/s)

It is an INFO record of the ``dcp_engine.savelog`` logger. A program whose logging lets
it through (its handlers, the levels of ``dcp_engine`` and of the root) gets it there. A
program that configured no logging at all (the root logger has no handler, and neither
the root nor the ``dcp_engine`` loggers were given a level) gets it on stderr all the
same: that is the default. ``CheckpointConfig(log_saves=False)`` or
``logging.getLogger("dcp_engine").setLevel(logging.WARNING)`` silences it.
"""

from __future__ import annotations

import logging
import sys

from .handles import SaveStats
from .units import fmt_bytes

log = logging.getLogger(__name__)

LINE = (
    "[rank=0][step=%d] saved %s: blocked %.1f ms (waited %.1f ms + staged %.1f ms), "
    "committed %.2f s after the call (%s/s)"
)
_FORMAT = logging.BASIC_FORMAT  # what logging.basicConfig() would print
_fallback: logging.Handler | None = None


def report(stats: SaveStats) -> None:
    """Rank 0's line for a committed save (a worker thread calls it; never raises)."""
    rate = stats.bytes / stats.total_s if stats.total_s > 0 else 0.0
    args = (stats.step, fmt_bytes(stats.bytes), stats.blocked_s * 1e3, stats.waited_s * 1e3,
            stats.staged_s * 1e3, stats.total_s, fmt_bytes(rate))  # fmt: skip
    if log.isEnabledFor(logging.INFO):
        log.info(LINE, *args)
    elif _unconfigured():
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, LINE, args, None)
        _handler().handle(record)


def _unconfigured() -> bool:
    """Nothing was said about logging: no handler on the root or ours, no level set."""
    root, ours = logging.getLogger(), logging.getLogger("dcp_engine")
    return (
        not root.handlers
        and root.level == logging.WARNING
        and not ours.handlers
        and not log.handlers
        and ours.level == log.level == logging.NOTSET
    )


def _handler() -> logging.Handler:
    global _fallback
    if _fallback is None:
        _fallback = logging.StreamHandler(sys.stderr)
        _fallback.setFormatter(logging.Formatter(_FORMAT))
    return _fallback


__all__ = ["LINE", "report"]
