"""The local tier: checkpoints commit to fast local disk first (``local_dir``), and rank 0
uploads each one to ``root_dir`` (an object store, usually) in the background.

Two experiments of one name: the local one, where saves commit (the usual protocol:
``.tmp``, marker, rename) and from which a job on the same node resumes at disk speed;
and the remote one, which the ``RemoteTier`` writes with the remote storage's protocol
(on an object store: the files under ``step_X/``, the marker object last). Each has its
lease, its index and its retention: the local one keeps the newest
``local_keep_last_n``, the remote one applies the config's policies.

Invariants:

- a local checkpoint is never deleted by local retention before its upload committed
  (it is protected from being queued until then);
- an upload copies every file the local marker lists, checking each against the
  marker's digest as it streams, and writes the remote marker last: a remote checkpoint
  is never half-visible, and a job killed mid-upload leaves a prefix without a marker,
  which the next holder sweeps and uploads again from the local copy;
- resume takes the newest checkpoint that verifies in either tier (the local copy of a
  step first).

``local_dir`` must be seen by every rank of the job (one node, or a node-shared scratch):
rank 0 commits and uploads what every rank wrote there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import zlib
from concurrent.futures import Future

from . import layout, resolve
from .committer import PhaseHook
from .config import CheckpointConfig
from .digests import hexdigest
from .errors import CheckpointError, IntegrityError
from .experiment import Experiment
from .index import CheckpointInfo, Which
from .resolve import Candidate
from .storage import Storage, storage_of

log = logging.getLogger(__name__)

_CHUNK = 16 << 20
_KEEP_DONE = 64  # finished uploads whose futures a late ``upload_of`` still finds
LOCAL, REMOTE = "local", "remote"


def local_config(config: CheckpointConfig) -> CheckpointConfig:
    """The config of the local experiment: ``local_dir``, and ``local_keep_last_n`` as its
    only retention (the remote tier keeps the config's policies)."""
    assert config.local_dir is not None
    return dataclasses.replace(
        config,
        root_dir=config.local_dir,
        storage_options=None,
        local_dir=None,
        keep_top_k=None,
        keep_last_n=config.local_keep_last_n,
        keep_every_n_steps=None,
        keep_every_n_epochs=None,
    )


class RemoteTier:
    """Rank 0's uploader: the remote experiment, and a thread that copies each local
    commit there."""

    def __init__(self, remote: Experiment, local: Experiment, hook: PhaseHook) -> None:
        self.remote, self.local, self.hook = remote, local, hook
        self._queue: queue.Queue[CheckpointInfo | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.errors: list[str] = []
        self._futures: dict[int, Future[CheckpointInfo]] = {}  # under self._idle
        self._done: dict[int, Future[CheckpointInfo]] = {}  # the last _KEEP_DONE
        self._thread = threading.Thread(target=self._run, name="dcp_engine_upload", daemon=True)
        self._thread.start()
        local.catalog.on_add.append(self.enqueue)
        remote_steps = {e.step for e in remote.catalog.entries()}
        newest = remote.catalog.newest()
        for info in local.catalog.entries():  # what a killed job committed but never uploaded
            if info.step not in remote_steps and (newest is None or info.step > newest.step):
                log.info("[step=%d] not in %s yet: uploading it", info.step, remote.root)
                self.enqueue(info)
        self._mark_tiers()

    @classmethod
    def open(cls, config: CheckpointConfig, local: Experiment, hook: PhaseHook) -> RemoteTier:
        """Rank 0: the remote experiment of the same name (its lease, sweep and catalog)."""
        remote_config = dataclasses.replace(
            config, local_dir=None, experiment_name=local.plan.name, resume=None
        )
        storage = storage_of(remote_config.root_path)

        def upload_hook(phase: str, step: int) -> None:  # the remote commit's phases
            hook(f"upload:{phase}", step)

        remote = Experiment.open(remote_config, storage, hook=upload_hook)
        try:
            return cls(remote, local, upload_hook)
        except BaseException:
            remote.close(config.timeout_s)
            raise

    # ------------------------------------------------------------------ uploads

    def enqueue(self, info: CheckpointInfo) -> None:
        """A local commit: protect it from local retention, upload it in the background."""
        self.local.catalog.hold(info.step)
        with self._idle:
            self._pending += 1
        self._queue.put(info)

    def upload_of(self, step: int) -> Future[CheckpointInfo]:
        """The future of the upload of ``step`` (queued, running, or recently done)."""
        with self._idle:
            found = self._done.get(step) or self._futures.get(step)
            if found is None:
                found = self._futures[step] = Future()
            return found

    def wait(self, timeout: float | None = None) -> bool:
        """True once every queued upload finished (committed or failed)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float) -> None:
        """Finish the queued uploads (up to ``timeout``), then release the remote lease."""
        if not self.wait(timeout):
            log.error("uploads to %s did not finish in %.0f s; the local copies stay",
                      self.remote.root, timeout)  # fmt: skip
        self._queue.put(None)
        self._thread.join(timeout)
        self.remote.close(timeout)

    def _run(self) -> None:
        while (info := self._queue.get()) is not None:
            with self._idle:
                future = self._futures.pop(info.step, None) or Future()
            try:
                future.set_result(self._upload(info))
            except Exception as e:  # the local copy stays; training goes on
                msg = f"[step={info.step}] upload to {self.remote.root} failed: {e}"
                log.error("%s", msg)
                self.errors.append(msg)
                future.set_exception(CheckpointError(msg))
            finally:
                self.local.catalog.release(info.step)
                self._mark_tiers()
                with self._idle:
                    self._done[info.step] = future
                    while len(self._done) > _KEEP_DONE:
                        self._done.pop(next(iter(self._done)))
                    self._pending -= 1
                    self._idle.notify_all()

    def _upload(self, info: CheckpointInfo) -> CheckpointInfo:
        catalog = self.remote.catalog
        committer = catalog.committer
        assert committer is not None
        marker = resolve.read_marker(info.path)
        newest = catalog.newest()
        target = committer.begin(info.step, None if newest is None else newest.step)
        source, dest = storage_of(info.path), self.remote.storage
        try:
            for name in sorted(marker.files):
                meta = marker.files[name]
                _copy(source, info.path / name, dest, target / name, meta.size, meta.crc32)
            self.hook("files", info.step)  # -> "upload:files": every file up, no marker
            digests = {
                name: {"size": f.size, **({"crc32": f.crc32} if f.crc32 else {})}
                for name, f in marker.files.items()
            }
            path, remote_marker = committer.finalize(
                info.step, epoch=marker.epoch, metrics=marker.metrics, extra=marker.extra,
                entries=marker.entries, digests=digests, world_size=marker.world_size,
                shards=marker.shards,
            )  # fmt: skip
        except BaseException:
            committer.abort(info.step)
            raise
        uploaded = CheckpointInfo.from_marker(path, remote_marker)
        catalog.add(uploaded)
        log.info("[step=%d] uploaded to %s", info.step, path)
        return uploaded

    # ------------------------------------------------------------------ views

    def _mark_tiers(self) -> None:
        remote = {e.step for e in self.remote.catalog.entries()}
        self.local.catalog.set_tiers(lambda step: (LOCAL, REMOTE) if step in remote else (LOCAL,))

    def entries(self) -> list[CheckpointInfo]:
        """Both tiers, oldest first; each entry's ``tiers`` says where it is (a step in
        both is listed once, with its local path)."""
        local = {e.step: e for e in self.local.catalog.entries()}
        remote = [
            dataclasses.replace(e, tiers=(REMOTE,))
            for e in self.remote.catalog.entries()
            if e.step not in local
        ]
        return sorted([*local.values(), *remote], key=lambda e: e.step)


def candidates(
    local: layout.ExperimentLayout,
    remote: layout.ExperimentLayout,
    which: Which,
    *,
    monitor: str | None,
    mode: str,
) -> list[Candidate]:
    """What ``which`` may resolve to in either tier, in order of preference: the newest
    (or best) first, a step's local copy before its remote one."""
    if which not in ("latest", "best"):
        try:
            return resolve.candidates(local, which, monitor=monitor, mode=mode)
        except CheckpointError:
            if not isinstance(which, int):
                raise
            return resolve.candidates(remote, which, monitor=monitor, mode=mode)
    both = [
        *resolve.candidates(local, "latest", monitor=monitor, mode=mode),
        *resolve.candidates(remote, "latest", monitor=monitor, mode=mode),
    ]
    if which == "latest":
        return sorted(both, key=lambda c: -c.step)  # stable: local first at a step
    monitor, mode = resolve.ranking(local, monitor, mode if monitor is not None else None)
    good = [c for c in both if c.marker is not None]

    def key(c: Candidate) -> float:
        assert c.marker is not None
        v = float(c.marker.metrics.get(monitor, math.nan))
        return math.inf if not math.isfinite(v) else (v if mode == "min" else -v)

    ranked = sorted((c for c in good if math.isfinite(key(c))), key=key)
    if good and not ranked:
        raise CheckpointError(
            f"no committed checkpoint in {local.root} or {remote.root} has a finite "
            f"{monitor!r} metric; cannot pick the best"
        )
    return ranked + [c for c in both if c.marker is None]


def _copy(
    source: Storage, src: object, dest: Storage, dst: object, size: int, crc32: str | None
) -> None:
    """Stream one file to the remote tier, checking it against the local marker."""
    crc, done = 0, 0
    with source.open_read(src) as f, dest.open_write(dst) as out:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
            out.write(chunk)
        if done != size or (crc32 is not None and hexdigest(crc) != crc32):
            raise IntegrityError(
                f"{src} does not match its marker ({done} bytes, {hexdigest(crc)}; the "
                f"marker says {size}, {crc32}): not uploaded"
            )


__all__ = ["RemoteTier", "candidates", "local_config"]
