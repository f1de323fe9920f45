"""The lease: one job writes an experiment (invariant 7).

Rank 0 of the job that saves into an experiment holds ``<experiment>/OWNER``, created
exclusively (``O_EXCL``, atomic on local disks and on NFSv3+; on an object store a
conditional write, ``If-None-Match: *``), holding who it is: host, pid, the pid's start
time, job id, when it started, and a random token. A heartbeat thread touches it every
``stale_after_s / 4`` seconds (an object store: rewrites it with a beat counter) and
checks that it still holds the token. Only the holder sweeps, writes the index, moves
aliases or deletes; a second writer gets ``ExperimentLockedError`` naming the holder.

A lease whose holder is gone is taken over with a warning: on the same host, a holder
whose pid is dead (or is another process now) is gone at once; on another host (or a
torn ``OWNER``), one whose file did not change while watched for the longer of both
jobs' ``lease_timeout_s`` (no clocks are compared, so a skew between nodes cannot make a
live holder look dead). A shared file system must show a change of mtime within that
time (NFS attribute caching: keep ``lease_timeout_s`` above ``acregmax``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

import psutil

from .errors import ExperimentLockedError
from .location import Location
from .storage import Storage

log = logging.getLogger(__name__)

_JOB_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    host: str
    pid: int
    pid_started: float
    job_id: str
    started: float
    token: str
    stale_after_s: float = 30.0
    """The holder's ``lease_timeout_s``: a contender waits at least this long."""

    @classmethod
    def me(cls, stale_after_s: float) -> Holder:
        job = next((os.environ[k] for k in _JOB_ENV if os.environ.get(k)), "")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=psutil.Process().create_time(),
            job_id=job or f"pid-{os.getpid()}",
            started=time.time(),
            token=secrets.token_hex(8),
            stale_after_s=stale_after_s,
        )

    def to_bytes(self, beat: int = 0) -> bytes:
        """``beat``: the heartbeat's count, so that each beat changes the content (an
        object store's ``version`` of the lease)."""
        return json.dumps({**asdict(self), "beat": beat}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Holder | None:
        """None for a torn or foreign ``OWNER`` (its holder died while creating it)."""
        try:
            d = json.loads(raw)
            return cls(
                host=str(d["host"]),
                pid=int(d["pid"]),
                pid_started=float(d["pid_started"]),
                job_id=str(d["job_id"]),
                started=float(d["started"]),
                token=str(d["token"]),
                stale_after_s=float(d.get("stale_after_s", 30.0)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"job {self.job_id} (host {self.host}, pid {self.pid}, since {when})"

    def alive_here(self) -> bool | None:
        """On this host: whether the holder's process still runs (None: another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False


class Lease:
    """Rank 0's hold on an experiment; ``check()`` before every write of the catalog."""

    def __init__(
        self, path: Location, holder: Holder, storage: Storage, stale_after_s: float
    ) -> None:
        self.path, self.holder = path, holder
        self._storage, self._stale_after_s = storage, stale_after_s
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._heartbeat, name="dcp_engine_lease", daemon=True
        )
        self._thread.start()

    @classmethod
    def acquire(
        cls, path: Location, storage: Storage, *, stale_after_s: float, fsync: bool = True
    ) -> Lease:
        """Take the lease of ``path`` (the experiment's ``OWNER``), taking over a stale one;
        ``ExperimentLockedError`` if a live job holds it."""
        me = Holder.me(stale_after_s)
        for _ in range(16):  # each round either wins, fails, or removed a stale holder
            if storage.create_exclusive(path, me.to_bytes(), fsync=fsync):
                return cls(path, me, storage, stale_after_s)
            try:
                raw, tag = storage.read_tagged(path)
                seen = storage.version(path)
            except FileNotFoundError:
                continue  # released meanwhile
            holder = Holder.from_bytes(raw)
            why = _why_stale(path, storage, holder, seen, stale_after_s)
            if why is None:
                assert holder is not None
                mine = holder.pid == os.getpid() and holder.host == me.host
                hint = (
                    "another CheckpointManager of this process writes it; close that one first"
                    if mine
                    else "wait for it to end, or save into another experiment_name"
                )
                raise ExperimentLockedError(
                    f"experiment {path.parent} is held by {holder.describe()}; {hint} "
                    f"(lease file {path})"
                )
            swapped = storage.replace_if(path, me.to_bytes(), tag)  # one atomic step
            if swapped:
                log.warning("took over the lease of %s: %s", path.parent, why)
                return cls(path, me, storage, stale_after_s)
            if swapped is None:  # no conditional replace here: move aside, then create
                storage.take_over(path, raw)
                log.warning("took over the lease of %s: %s", path.parent, why)
        raise ExperimentLockedError(f"could not take the lease {path}: it keeps changing hands")

    @property
    def lost(self) -> str | None:
        """Why this job no longer holds the lease, or None while it does."""
        return self._lost

    def check(self) -> None:
        """Raise ``ExperimentLockedError`` if another job took the lease over."""
        if self._lost is not None:
            raise ExperimentLockedError(
                f"this job no longer holds {self.path.parent}: {self._lost}; it writes "
                "nothing more there"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove ``OWNER`` if it is still ours. From here on
        ``check()`` fails: nothing of this job (a straggling upload) writes any more."""
        self._stop.set()
        self._lost = self._lost or "released"
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        if self._holds() is not None:
            self._storage.remove_file(self.path)

    def _holds(self) -> object | None:
        """The tag of ``OWNER`` while it is ours (for a conditional heartbeat); None if
        another job holds it or it is gone."""
        try:
            raw, tag = self._storage.read_tagged(self.path)
        except FileNotFoundError:
            return None
        holder = Holder.from_bytes(raw)
        return tag if holder is not None and holder.token == self.holder.token else None

    def _heartbeat(self) -> None:
        beat, last_ok = 0, time.monotonic()
        while not self._stop.wait(self._stale_after_s / 4):
            try:
                tag = self._holds()
                beat += 1
                # Conditional: a new holder's OWNER, written since the read, is never
                # overwritten by this beat.
                if tag is None or not self._storage.touch_if(
                    self.path, self.holder.to_bytes(beat), tag
                ):
                    self._lost = f"{self.path} was removed or taken over by another job"
                    log.error("lost the lease of %s: %s", self.path.parent, self._lost)
                    return
                last_ok = time.monotonic()
            except Exception as e:  # a hiccup of the storage: try again, for a while
                log.warning("lease heartbeat on %s failed: %s", self.path, e)
                if time.monotonic() - last_ok > self._stale_after_s / 2:
                    # Others may take the lease over soon: stop writing before they do.
                    self._lost = (
                        f"no heartbeat of {self.path} for {self._stale_after_s / 2:.0f} s ({e})"
                    )
                    log.error("gave up the lease of %s: %s", self.path.parent, self._lost)
                    return


def _why_stale(
    path: Location, storage: Storage, holder: Holder | None, seen: object, stale_after_s: float
) -> str | None:
    """Why the lease in ``path`` is stale, or None while its holder lives."""
    if holder is not None:
        alive = holder.alive_here()
        if alive is False:
            return f"{holder.describe()} is gone (no such process)"
        if alive:
            return None
        stale_after_s = max(stale_after_s, holder.stale_after_s)
    # Another host, or a torn file: stale once its heartbeat stops for stale_after_s, seen
    # by watching the file change; no clock is compared, so a skew between nodes cannot
    # make a live holder look dead.
    who = holder.describe() if holder is not None else f"a torn {path.name}"
    deadline = time.monotonic() + stale_after_s
    log.info("waiting up to %.0f s for the heartbeat of %s", stale_after_s, who)
    while time.monotonic() < deadline:
        time.sleep(min(1.0, stale_after_s / 8))
        try:
            if storage.version(path) != seen:
                return None  # it beat: alive
        except FileNotFoundError:
            return "released while watched"
    return f"{who}: no heartbeat for {stale_after_s:.0f} s"


__all__ = ["Holder", "Lease"]
