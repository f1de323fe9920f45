"""Named fault points for the fault-injection suite, off unless an environment variable
says otherwise. Never set in production: with the variable unset every call here is a
dictionary lookup that returns.

``DCP_ENGINE_FAULT`` holds ``;``-separated faults:

- ``kill:<point>:<rank>[:<step>]``: the process SIGKILLs itself at ``point`` on ``rank``
  (at the save of ``step`` if given). Points: ``write`` (mid-shard, after the first
  bytes), ``barrier`` (shards durable, before the commit gather), and on rank 0
  ``marker`` (marker written, before the rename), ``rename`` (renamed, before the
  index), ``index`` (index written, before ``latest`` moves).
- ``enospc:<rank>:<bytes>[:<step>]``: on ``rank``, the first shard write past ``bytes``
  bytes of a save (of ``step``) raises ``OSError(ENOSPC)``, once; ``eio`` and ``eacces``
  alike raise ``EIO`` and ``EACCES`` (an I/O error, a permission denied).
- ``free:<bytes>``: the free-space check before a save sees at most ``bytes`` free.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

FAULT_ENV = "DCP_ENGINE_FAULT"
KILL_POINTS = ("write", "barrier", "marker", "rename", "index")

_written = 0
_lock = threading.Lock()
_context = {"rank": 0, "step": -1}
_enospc_fired = False
WRITE_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "eacces": errno.EACCES}


def set_context(*, rank: int | None = None, step: int | None = None) -> None:
    """Where this process is: its rank (set once) and the step being written."""
    if rank is not None:
        _context["rank"] = rank
    global _written
    if step is not None and step != _context["step"]:
        _context["step"] = step
        _written = 0  # bytes are counted per save


def _faults() -> list[list[str]]:
    spec = os.environ.get(FAULT_ENV, "")
    return [f.split(":") for f in spec.split(";") if f.strip()]


def active() -> bool:
    return bool(os.environ.get(FAULT_ENV))


def kill_point(point: str, rank: int | None = None, step: int | None = None) -> None:
    """SIGKILL this process if a ``kill`` fault names ``point`` here."""
    if not active():
        return
    rank = _context["rank"] if rank is None else rank
    step = _context["step"] if step is None else step
    for f in _faults():
        if f[0] != "kill" or len(f) < 3 or f[1] != point or int(f[2]) != rank:
            continue
        if len(f) > 3 and int(f[3]) != step:
            continue
        os.kill(os.getpid(), signal.SIGKILL)


def count_write(n: int) -> None:
    """Account ``n`` bytes about to be written to a shard; raise ENOSPC past the budget."""
    global _written, _enospc_fired
    if not active():
        return
    rank = _context["rank"]
    with _lock:
        _written += n
        written = _written
    for f in _faults():
        if f[0] not in WRITE_ERRORS or int(f[1]) != rank or _enospc_fired:
            continue
        if len(f) > 3 and int(f[3]) != _context["step"]:
            continue
        if written > int(f[2]):
            _enospc_fired = True  # once: the disk is freed, the next save may succeed
            code = WRITE_ERRORS[f[0]]
            raise OSError(code, f"{os.strerror(code)} (injected)")
    kill_point("write")


def free_bytes(real: int) -> int:
    """The free space the pre-save check sees (``free:<bytes>`` caps it)."""
    if not active():
        return real
    for f in _faults():
        if f[0] == "free":
            return min(real, int(f[1]))
    return real
