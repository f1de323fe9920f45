"""The catalog: what an experiment holds, as the lease holder (rank 0) sees it.

Entries, ``index.json``, the ``latest``/``best`` aliases and retention, under one lock,
and a collector thread that applies retention after each commit so that deleting never
holds training or a save. Only committed checkpoints ever enter it (invariant 2); every
change to the disk goes through the ``Committer``. Ranks other than 0 keep a mirror of
rank 0's entries (``mirror``), and write nothing.

Order of a collection: the policy picks from committed entries only, never the newest,
the best or a protected one (the run resumed from it); the doomed leave the index first,
then each directory is retired (rename to ``.tmp``, fsync, delete).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from . import index, layout, resolve, retention
from .committer import Committer
from .errors import ExperimentLockedError
from .index import CheckpointInfo
from .location import Location
from .marker import Marker
from .retention import RetentionPolicy
from .storage import Storage

log = logging.getLogger(__name__)


class Catalog:
    """Entries of one experiment; with a ``committer`` (rank 0) it also writes."""

    def __init__(
        self,
        exp: layout.ExperimentLayout,
        policy: RetentionPolicy,
        *,
        committer: Committer | None,
        storage: Storage,
        fsync: bool = True,
        aliases: tuple[bool, bool] = (True, True),
    ) -> None:
        self.exp, self.policy, self.committer = exp, policy, committer
        self._storage, self._fsync = storage, fsync
        self._latest_alias, self._best_alias = aliases
        self._lock = threading.RLock()
        self._entries: list[CheckpointInfo] = []
        self._protected: set[int] = set()
        self._held: set[int] = set()
        self._discarded: set[int] = set()
        self.deleted: list[int] = []  # steps retention deleted, in order
        self.on_add: list[Callable[[CheckpointInfo], None]] = []
        """Called after each commit enters the catalog (the local tier's uploader)."""
        self._tiers: Callable[[int], tuple[str, ...]] | None = None
        self._cond = threading.Condition()
        self._dirty = self._running = self._stopped = False
        self._thread: threading.Thread | None = None
        if not policy.keeps_all:
            self._start_collector()

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[CheckpointInfo]:
        with self._lock:
            return list(self._entries)

    def newest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (the timeline's floor, the size estimate)."""
        with self._lock:
            return self._entries[-1] if self._entries else None

    def best(self) -> CheckpointInfo | None:
        return retention.best(self.entries(), self.policy.monitor, self.policy.mode)

    # ------------------------------------------------------------------ rank 0

    def open(self) -> resolve.Scan:
        """At start: the entries from the markers, ``index.json`` rewritten if it does not
        say the same, the aliases checked. Returns the scan (corrupt and torn included)."""
        found = resolve.scan(self.exp)
        with self._lock:
            self._entries = list(found.committed)
            cached = index.read_index(self.exp)
            if cached is None or not index.same_entries(cached, found.committed):
                if cached is not None or found.committed:  # not news in a new experiment
                    how = "missing or unreadable" if cached is None else "stale"
                    log.info(
                        "%s %s: rebuilt from %d markers",
                        self.exp.index_path,
                        how,
                        len(found.committed),
                    )
                self._publish()
            else:
                self._move_aliases()
        for path, why in found.torn:
            log.warning("not a committed checkpoint, ignored: %s (%s)", path, why)
        return found

    def add(self, info: CheckpointInfo) -> None:
        """A checkpoint was committed: into the entries, the index and the aliases, then
        retention runs in the background. Never raises: the checkpoint exists already."""
        with self._lock:
            if self._tiers is not None:
                info = dataclasses.replace(info, tiers=self._tiers(info.step))
            self._entries = sorted([*self._entries, info], key=lambda c: c.step)
            try:
                self._publish(info.step)
            except ExperimentLockedError as e:  # the next save is refused for it
                log.error("[step=%d] committed, but the index is not updated: %s", info.step, e)
                return
        for listener in self.on_add:
            listener(info)
        self._poke()

    def amend(self, info: CheckpointInfo, marker: Marker) -> CheckpointInfo | None:
        """New metrics for a committed checkpoint: its marker, the index, ``best``. None
        if retention took it meanwhile."""
        assert self.committer is not None
        with self._lock:
            if all(e.step != info.step for e in self._entries):
                return None
            self.committer.amend(info.path, marker)
            new = CheckpointInfo.from_marker(info.path, marker)
            self._entries = [new if e.step == info.step else e for e in self._entries]
            self._publish()
        self._poke()
        return new

    def quarantine(self, path: Location, why: str) -> Location | None:
        """A committed-looking checkpoint that does not verify leaves the owned names; the
        entries, the index and the aliases stop seeing it."""
        assert self.committer is not None
        with self._lock:
            dest = self.committer.quarantine(path, why)
            self._entries = [e for e in self._entries if e.path.name != path.name]
            self._publish()
        return dest

    def protect(self, step: int) -> None:
        """Retention never deletes ``step`` (the run resumed from it)."""
        with self._lock:
            self._protected.add(step)

    def hold(self, step: int) -> None:
        """Retention does not delete ``step`` until ``release`` (an upload of it)."""
        with self._lock:
            self._held.add(step)

    def release(self, step: int) -> None:
        """``step`` is retention's again (its upload finished); a collection follows."""
        with self._lock:
            self._held.discard(step)
        self._poke()

    def discard(self, step: int) -> None:
        """The caller no longer wants ``step``: retention deletes it once it is committed
        and no longer kept whatever the policy (the newest, the best, a protected or held
        step), at a collection after a commit."""
        with self._lock:
            self._discarded.add(step)
            self._start_collector()
        self._poke()

    def set_tiers(self, tiers: Callable[[int], tuple[str, ...]]) -> None:
        """Where each entry is (the local tier): kept in the entries and the index."""
        with self._lock:
            self._tiers = tiers
            self._entries = [dataclasses.replace(e, tiers=tiers(e.step)) for e in self._entries]
            if self.committer is not None:
                self._publish()

    def mirror(self, entries: list[CheckpointInfo]) -> None:
        """Ranks other than 0: rank 0's entries."""
        with self._lock:
            self._entries = sorted(entries, key=lambda c: c.step)

    def _publish(self, newest: int | None = None) -> None:
        """``index.json`` from the entries now, then the aliases. Under the lock."""
        if self.committer is None:
            return
        self.committer.lease.check()
        top = self.best()
        try:
            index.write_index(
                self.exp,
                self._entries,
                self._storage,
                best=None if top is None else top.step,
                monitor=self.policy.monitor,
                mode=self.policy.mode,
                fsync=self._fsync,
            )
        except OSError as e:  # the index is a cache: never fail a commit over it
            log.warning(
                "%s could not be written (%s); it is rebuilt from the markers",
                self.exp.index_path,
                e,
            )
        if newest is not None:
            self.committer.hook("indexed", newest)
        self._move_aliases()

    def _move_aliases(self) -> None:
        if self.committer is None:
            return
        top = self.best()
        targets = {
            "latest": self._entries[-1].path.name if self._entries and self._latest_alias else None,
            "best": top.path.name if top is not None and self._best_alias else None,
        }
        storage = self._storage
        for alias, target in targets.items():
            link = self.exp.alias_path(alias)
            try:
                current = storage.read_alias(link)
                if target == current:
                    continue
                if current is None and storage.exists(link):
                    log.warning(
                        "%s exists and is not an alias; not moving the %r alias", link, alias
                    )
                    continue
                if target is None:
                    if current is not None and not storage.is_dir(
                        self.exp.checkpoints_dir / current
                    ):
                        storage.remove_file(link)  # it pointed at a removed checkpoint
                    continue
                storage.write_alias(link, target, fsync=self._fsync)
            except OSError as e:  # after the commit: never a failed save
                log.warning("cannot point %r at %s (%s); the index is the truth", alias, target, e)

    # ------------------------------------------------------------------ retention

    def collect(self) -> list[int]:
        """One collection now, in the caller's thread; the steps it deleted."""
        assert self.committer is not None
        with self._lock:
            keep = self._protected | self._held
            doomed = self.policy.to_delete(self._entries, keep)
            if self._discarded:
                kept = self.policy.protected(self._entries, keep)
                released = {e.step for e in self._entries if e.step in self._discarded} - kept
                doomed = sorted(set(doomed) | released)
                self._discarded -= released
            if not doomed:
                return []
            self._entries = [e for e in self._entries if e.step not in doomed]
            self._publish()
        deleted = [s for s in doomed if self.committer.retire(s)]
        if deleted:
            log.info("retention: deleted %s", ", ".join(layout.step_dirname(s) for s in deleted))
            self.deleted.extend(deleted)
        return deleted

    def _start_collector(self) -> None:
        """The collector thread, on the lease holder, once something may be deleted."""
        if self.committer is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dcp_engine_gc", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """True once no collection is pending or running (False if ``timeout`` ran out)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._running, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the pending collection, then end the thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopped)
                if self._stopped and not self._dirty:
                    return
                self._dirty, self._running = False, True
            try:
                self.collect()
            except Exception as e:  # never let a deletion problem fail training
                log.error("garbage collection in %s failed: %s", self.exp.checkpoints_dir, e)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()


__all__ = ["Catalog"]
