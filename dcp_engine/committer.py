"""The commit protocol, whole: begin, finalize, amend, abort, retire, quarantine, sweep.

Only rank 0's ``Committer`` (the lease holder's) changes what exists in ``checkpoints/``.
A checkpoint exists only once committed (invariant 1). The order, after every rank has
written and made durable its shards and rank 0 has written ``.metadata``:

On a file system (``storage.renames``):

1. ``COMMITTED`` (every file with its size and digest, and a digest of its own) into
   ``step_X.tmp/`` by temp file + fsync + rename, then fsync of ``step_X.tmp/``;
2. rename ``step_X.tmp`` to ``step_X`` (never replacing) and fsync ``checkpoints/``.

A crash before 2 leaves a ``.tmp`` directory, never loaded and swept by the next holder;
a crash after 2 leaves a committed checkpoint that the catalog finds from its marker.
Deletion is the reverse: rename back to ``.tmp`` (it stops existing at once), then
remove.

On an object store (no rename): the shards are written under the final ``step_X/``
prefix, and step 1 alone, the ``COMMITTED`` object written in one PUT, is the commit. A
crash before it leaves a prefix without a marker: never loaded, swept by the next
holder. Deletion deletes the marker first, then the rest.

``hook(phase, step)`` runs between the steps: the seam the fault tests kill at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from . import layout
from .errors import CheckpointError, IntegrityError, TimelineError
from .lease import Lease
from .location import Location
from .marker import FileEntry, Marker
from .storage import Storage
from .units import fmt_bytes

log = logging.getLogger(__name__)

PhaseHook = Callable[[str, int], None]
"""``hook(phase, step)``. Phases: ``written`` (every rank: its shards are durable),
``marker`` (rank 0: marker written, not renamed; on an object store this is already
the commit), ``committed`` (renamed, the index not written yet), ``indexed`` (index
written, aliases not moved). With a local tier, the uploads to ``root_dir`` run the same
phases prefixed ``upload:``, after ``upload:files`` (every file uploaded, no marker)."""


def no_hook(phase: str, step: int) -> None:
    """The default phase hook: nothing."""


class Committer:
    """Rank 0's hands on ``checkpoints/``: every change to what exists goes through here."""

    def __init__(
        self,
        exp: layout.ExperimentLayout,
        storage: Storage,
        lease: Lease,
        *,
        fsync: bool = True,
        hook: PhaseHook = no_hook,
    ) -> None:
        self.exp, self.storage, self.lease = exp, storage, lease
        self.fsync, self.hook = fsync, hook

    def staging_dir(self, step: int) -> Location:
        return self.exp.staging_dir(step, renames=self.storage.renames)

    def begin(self, step: int, newest: int | None, *, last_bytes: int = 0) -> Location:
        """A new ``step_X.tmp/`` for a save of ``step``; refused unless ``step`` is above
        ``newest`` (the newest committed step: invariant 9), and, before anything is
        written, unless the disk has room for another ``last_bytes`` (the last save's)."""
        self.lease.check()
        free = self.storage.free_bytes(self.exp.checkpoints_dir) if last_bytes else 0
        if free < last_bytes:
            raise CheckpointError(
                f"save of step {step} refused: {self.exp.checkpoints_dir} has "
                f"{fmt_bytes(free)} free, and the last checkpoint took {fmt_bytes(last_bytes)}; "
                f"free at least {fmt_bytes(last_bytes - free)} (or keep fewer checkpoints)"
            )
        final = self.exp.step_dir(step)
        done = layout.marker_path(final) if not self.storage.renames else final
        if self.storage.exists(done):
            raise TimelineError(
                f"save of step {step} refused: step {step} is already committed at {final}; "
                "a committed checkpoint is never overwritten"
            )
        if newest is not None and step <= newest:
            raise TimelineError(
                f"save of step {step} refused: step {newest} is already committed in "
                f"{self.exp.checkpoints_dir}, and the timeline only goes forward; to go back, "
                f"branch: resume='{self.exp.step_dir(newest)}' (or an earlier checkpoint) "
                "with a new experiment_name"
            )
        tmp = self.staging_dir(step)
        if self.storage.exists(tmp):
            # Ours by name, and no save of ours is in flight (one at a time): torn.
            log.warning("removing torn %s from an earlier attempt at step %d", tmp, step)
            self.storage.remove_tree(tmp)
        self.storage.mkdir(tmp, exist_ok=False)
        return tmp

    def finalize(
        self,
        step: int,
        *,
        epoch: int | None,
        metrics: Mapping[str, float],
        extra: Mapping[str, Any],
        entries: Mapping[str, Mapping[str, Any]],
        digests: Mapping[str, Mapping[str, Any]],
        world_size: int,
        shards: str,
    ) -> tuple[Location, Marker]:
        """Steps 1 and 2: the checkpoint exists when this returns."""
        self.lease.check()
        tmp, final = self.staging_dir(step), self.exp.step_dir(step)
        if not self.storage.is_file(layout.dcp_metadata_path(tmp)):
            raise CheckpointError(
                f"save of step {step}: DCP wrote no {layout.DCP_METADATA_FILE} in {tmp}"
            )
        sizes = self.storage.file_sizes(tmp, exclude=layout.MARKER_FILE)
        unseen = sorted(set(digests) - set(sizes))
        if unseen:  # e.g. a root_dir local to each node: rank 0 cannot see the others' files
            raise IntegrityError(
                f"save of step {step}: {tmp} lacks {', '.join(unseen[:5])}, which other ranks "
                "wrote; root_dir must be one file system that every rank sees"
            )
        files = {}
        for name, size in sizes.items():
            d = digests.get(name)
            if d is not None and d["size"] != size:
                raise IntegrityError(
                    f"save of step {step}: {tmp / name} has {size} bytes on disk, but "
                    f"{d['size']} were written and hashed"
                )
            files[name] = FileEntry(size, None if d is None else d.get("crc32"))
        marker = Marker(
            step=step,
            epoch=epoch,
            metrics=dict(metrics),
            world_size=world_size,
            entries=entries,
            files=files,
            extra=dict(extra),
            shards=shards,
        )
        self._write_marker(tmp, marker)
        self.hook("marker", step)
        if self.storage.renames:
            self.storage.publish(tmp, final, fsync=self.fsync)
        self.hook("committed", step)
        return final, marker

    def amend(self, path: Location, marker: Marker) -> None:
        """Rewrite a committed checkpoint's marker (metrics that came after the save);
        atomic: readers see the old marker or the new one."""
        self.lease.check()
        self._write_marker(path, marker)

    def abort(self, step: int) -> None:
        """After a failed save that every rank agreed on: its ``.tmp`` goes (not if the
        lease went to another job meanwhile: that ``.tmp`` may be its)."""
        tmp = self.staging_dir(step)
        if self.lease.lost:
            log.error("[step=%d] not removing %s: %s", step, tmp, self.lease.lost)
            return
        if not self.storage.renames and self.storage.exists(layout.marker_path(tmp)):
            return  # committed before the failure (under its final name): it stays
        if self.storage.exists(tmp):
            self.storage.remove_tree(tmp)
            if not self.storage.renames and self.storage.exists(layout.marker_path(tmp)):
                # A delayed marker PUT landed after all: a marker without its files is
                # corrupt, never loaded; removed now rather than quarantined later.
                self.storage.remove_file(layout.marker_path(tmp))
            log.info("[step=%d] removed %s after the failed save", step, tmp)

    def retire(self, step: int) -> bool:
        """Delete committed checkpoint ``step``: rename back to ``.tmp`` (it stops existing
        at once; a crash mid-delete leaves a ``.tmp`` that is swept), then remove. Only our
        own canonical name is touched. False if it was already gone."""
        self.lease.check()
        final, tmp = self.exp.step_dir(step), self.exp.tmp_dir(step)
        if not self.storage.renames:  # the marker first: it stops existing at once
            if not self.storage.exists(layout.marker_path(final)):
                return False
            self.storage.remove_file(layout.marker_path(final))
            self.storage.remove_tree(final)
            return True
        kind = next(
            (c.kind for c in self.storage.children(final.parent) if c.name == final.name), None
        )
        if kind in ("link", "file"):
            log.warning("%s is not a checkpoint directory of ours; not deleting it", final)
            return False
        if self.storage.exists(tmp):  # a leftover of an earlier retire that crashed: ours
            self.storage.remove_tree(tmp)
        try:
            self.storage.publish(final, tmp, fsync=self.fsync)
        except FileNotFoundError:
            return False
        self.storage.remove_tree(tmp)
        return True

    def quarantine(self, path: Location, why: str) -> Location | None:
        """Move a committed-looking checkpoint that cannot be loaded out of the owned
        names (``step_X.corrupt``), so that ``latest``, retention and later saves never
        see it. Returns where it went (None: not ours by name, or gone)."""
        self.lease.check()
        step = layout.parse_step_dirname(path.name)
        if step is None or path.parent != self.exp.checkpoints_dir:
            return None
        dest = self.exp.quarantine_dir(step, self.storage.exists)
        try:
            self.storage.publish(path, dest, fsync=self.fsync)
        except FileNotFoundError:
            return None
        log.error("quarantined %s as %s: %s", path, dest.name, why)
        return dest

    def sweep(self) -> list[Location]:
        """Remove the ``step_X.tmp`` directories that crashed saves and retirements left
        (on an object store: the ``step_X/`` prefixes without a marker). Only the lease
        holder calls it, and only at start (none of its saves in flight)."""
        self.lease.check()
        swept = []
        checkpoints = self.exp.checkpoints_dir
        for child in self.storage.children(checkpoints):
            path = checkpoints / child.name
            torn = child.kind == "dir" and layout.parse_tmp_dirname(child.name) is not None
            if not self.storage.renames and layout.parse_step_dirname(child.name) is not None:
                torn = not self.storage.exists(layout.marker_path(path))
            if torn:
                log.warning("removing %s, left by a save or a deletion that did not finish", path)
                self.storage.remove_tree(path)
                swept.append(path)
        # Temporaries of the index, the config, the aliases: ours by name, and none of
        # their writers runs while a new holder starts.
        for directory in (self.exp.root, checkpoints):
            for child in self.storage.children(directory):
                if layout.is_atomic_tmp(child.name) and child.kind != "dir":
                    self.storage.remove_file(directory / child.name)
                    swept.append(directory / child.name)
        return swept

    def _write_marker(self, directory: Location, marker: Marker) -> None:
        self.storage.write_atomic(
            layout.marker_path(directory), marker.to_bytes(), fsync=self.fsync
        )


__all__ = ["Committer", "PhaseHook", "no_hook"]
