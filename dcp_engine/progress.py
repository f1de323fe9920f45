"""Progress of long reads and writes, on stderr: a ``tqdm`` bar when tqdm is installed,
else a plain line at every tenth.

Shown only on rank 0, and there as asked (``--progress``/``--no-progress``,
``progress=True``/``False``), else as the environment says for every command and library
call (``DCP_ENGINE_PROGRESS=1``: show, ``0``: never, even on a terminal), else when stderr
is a terminal: never into a pipe or a log file unless asked. Library loads
(``CheckpointManager.load``, ``open_checkpoint(...).load``, ``load_entries``) show it only
above ``LOAD_THRESHOLD`` bytes, counted by DCP's load planner as each tensor arrives
(``CountingLoadPlanner``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import DTensor

from .units import fmt_bytes

ENV = "DCP_ENGINE_PROGRESS"
LOAD_THRESHOLD = 1 << 30
"""Library loads of fewer bytes than this show no progress (they take about a second)."""
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def wanted(asked: bool | None = None) -> bool:
    """Whether to show progress: never off rank 0; else as ``asked``; else as
    ``DCP_ENGINE_PROGRESS`` says; else on a terminal."""
    if not _rank_zero():
        return False
    if asked is not None:
        return asked
    env = os.environ.get(ENV, "").strip().lower()
    if env in _ON or env in _OFF:
        return env in _ON
    return sys.stderr.isatty()


def _rank_zero() -> bool:
    dist: Any = sys.modules.get("torch.distributed")  # imported only if torch already is
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return bool(dist.get_rank() == 0)


class Progress:
    """``total`` bytes of ``what``; ``update(n)`` as they pass. Shows nothing unless
    ``show``; a context manager that closes the bar (or prints the last line)."""

    def __init__(self, what: str, total: int, *, show: bool) -> None:
        self.what, self.total, self.done = what, max(int(total), 0), 0
        self._bar: Any = None
        self._tenth = 0
        self._show = show
        if not show:
            return
        bar = _tqdm()
        if bar is None:
            return  # plain lines
        self._bar = bar(
            total=self.total,
            desc=what,
            file=sys.stderr,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {sizes} [{elapsed}<{remaining}]",
            leave=True,
            **_screen(),
        )

    def _sizes(self) -> str:
        return f"{fmt_bytes(self.done)}/{fmt_bytes(self.total)}"

    def update(self, n: int) -> None:
        self.done += n
        if not self._show:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth > self._tenth and tenth < 10:
            self._tenth = tenth
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done // self.total if self.total else 100
        print(f"{self.what}: {pct}% ({self._sizes()})", file=sys.stderr, flush=True)

    def close(self, finished: bool = True) -> None:
        """The bar stays where it got to; the plain lines end with a last one if
        ``finished`` (not after an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._show and finished and self._tenth < 10:
            self._tenth = 10
            self._line()
        self._show = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(finished=kind is None)


def _tqdm() -> Any:
    """tqdm's bar with a ``{sizes}`` field in binary units (``1.5 GiB/3.0 GiB``), or
    None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    class Bar(tqdm):  # type: ignore[misc,unused-ignore]
        @property
        def format_dict(self) -> dict[str, Any]:
            d = dict(super().format_dict)
            d["sizes"] = f"{fmt_bytes(d['n'])}/{fmt_bytes(d['total'] or 0)}"
            return d

    return Bar


def _screen() -> dict[str, int]:
    """The size of the terminal on stderr (80x24 where it says 0: tqdm would draw
    nothing); nothing if it is not one."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def progress(what: str, total: int, asked: bool | None = None) -> Progress:
    """A ``Progress`` of ``total`` bytes, shown if ``wanted(asked)``."""
    return Progress(what, total, show=wanted(asked))


def load_progress(what: str, total: int, asked: bool | None = None) -> Progress:
    """The progress of a library load of ``total`` bytes: shown if asked, or if wanted
    and at least ``LOAD_THRESHOLD``."""
    show = wanted(asked) and (asked is True or total >= LOAD_THRESHOLD)
    return Progress(what, total, show=show)


def tensor_bytes(flat: Mapping[str, Any]) -> int:
    """The bytes of this rank's tensors in a flat state dict (a DTensor's local shard)."""
    total = 0
    for value in flat.values():
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


class _Counting:
    """Counts the bytes of each tensor as DCP's reader hands it to the planner."""

    bar: Progress

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        super().commit_tensor(read_item, tensor)  # type: ignore[misc]
        self.bar.update(math.prod(read_item.lengths) * tensor.element_size())


class CountingLoadPlanner(_Counting, DefaultLoadPlanner):
    """DCP's default load planner, counting into ``bar``."""

    def __init__(self, bar: Progress) -> None:
        super().__init__()
        self.bar = bar


class CountingEmptyPlanner(_Counting, _EmptyStateDictLoadPlanner):
    """DCP's planner of a load into an empty dict (of ``keys``), counting into ``bar``."""

    def __init__(self, bar: Progress, keys: set[str] | None = None) -> None:
        super().__init__(keys=keys)
        self.bar = bar


__all__ = [
    "ENV",
    "LOAD_THRESHOLD",
    "CountingEmptyPlanner",
    "CountingLoadPlanner",
    "Progress",
    "load_progress",
    "progress",
    "tensor_bytes",
    "wanted",
]
