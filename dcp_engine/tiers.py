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
  (it is held from being queued until then); one whose upload failed stays held until
  a newer step is on the remote (whose timeline then forbids uploading it);
- uploads run in commit order, one thread; metrics given after a save follow its
  upload into the remote marker;
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
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import layout, resolve
from .committer import PhaseHook
from .config import CheckpointConfig
from .digests import hexdigest
from .errors import CheckpointError, IntegrityError
from .experiment import Experiment
from .index import CheckpointInfo, Which
from .marker import Marker
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


@dataclass(frozen=True)
class _Amend:
    """Metrics that came after a save, for the remote copy of ``step``."""

    step: int
    metrics: Mapping[str, float]
    extra: Mapping[str, Any]


class RemoteTier:
    """Rank 0's uploader: the remote experiment, and one thread that copies each local
    commit there, in commit order (then the metrics that came after it)."""

    def __init__(self, remote: Experiment, local: Experiment, hook: PhaseHook) -> None:
        self.remote, self.local, self.hook = remote, local, hook
        self._queue: queue.Queue[CheckpointInfo | _Amend | None] = queue.Queue()
        self._idle = threading.Condition()  # guards everything below
        self._pending = 0
        self._errors: list[str] = []  # not yet raised by wait_uploads
        self._failed: set[int] = set()  # held locally until a newer step is uploaded
        self._futures: dict[int, Future[CheckpointInfo]] = {}
        self._done: dict[int, Future[CheckpointInfo]] = {}  # the last _KEEP_DONE
        self._closing = threading.Event()
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
    def open(
        cls,
        config: CheckpointConfig,
        local: Experiment,
        hook: PhaseHook,
        run_config: Mapping[str, Any] | None = None,
    ) -> RemoteTier:
        """Rank 0: the remote experiment of the same name (its lease, sweep, catalog and
        ``config.yaml``: the training config, as in the local one)."""
        remote_config = dataclasses.replace(
            config, local_dir=None, experiment_name=local.plan.name, resume=None
        )
        storage = storage_of(remote_config.root_path)

        def upload_hook(phase: str, step: int) -> None:  # the remote commit's phases
            hook(f"upload:{phase}", step)

        remote = Experiment.open(remote_config, storage, run_config=run_config, hook=upload_hook)
        try:
            return cls(remote, local, upload_hook)
        except BaseException:
            remote.close(config.timeout_s)
            raise

    # ------------------------------------------------------------------ requests

    def enqueue(self, info: CheckpointInfo) -> None:
        """A local commit: held from local retention until uploaded (or superseded)."""
        self.local.catalog.hold(info.step)
        with self._idle:
            self._pending += 1
        self._queue.put(info)

    def amend(self, step: int, metrics: Mapping[str, float], extra: Mapping[str, Any]) -> None:
        """Metrics given after the save of ``step``: into its remote marker, after its
        upload (the remote ``best`` and retention follow)."""
        with self._idle:
            self._pending += 1
        self._queue.put(_Amend(step, dict(metrics), dict(extra)))

    def upload_of(self, step: int) -> Future[CheckpointInfo]:
        """The future of the upload of ``step`` (queued, running, or recently done)."""
        with self._idle:
            found = self._done.get(step) or self._futures.get(step)
            if found is None:
                found = self._futures[step] = Future()
            return found

    def forget(self, step: int, error: BaseException) -> None:
        """The save of ``step`` failed: its upload future fails with it."""
        with self._idle:
            future = self._futures.pop(step, None)
        if future is not None and not future.done():
            future.set_exception(CheckpointError(f"[step={step}] not uploaded: {error}"))

    def wait(self, timeout: float | None = None) -> bool:
        """True once every queued upload finished; raises ``CheckpointError`` naming the
        uploads that failed since the last call (each is also its handle's error)."""
        with self._idle:
            done = self._idle.wait_for(lambda: self._pending == 0, timeout)
            errors, self._errors = self._errors, []
        if errors:
            raise CheckpointError("; ".join(errors) + " (the local copies are kept)")
        return done

    def close(self, timeout: float) -> None:
        """Finish the queued uploads (up to ``timeout``; an upload still running then is
        abandoned before its marker), then release the remote lease."""
        try:
            finished = self.wait(timeout)
        except CheckpointError as e:
            log.error("%s", e)
            finished = True
        if not finished:
            log.error("uploads to %s did not finish in %.0f s; the local copies stay",
                      self.remote.root, timeout)  # fmt: skip
            self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self.remote.close(timeout)  # the lease, released, fails any later commit

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if isinstance(job, _Amend):
                    self._amend(job)
                else:
                    self._upload_one(job)
            except Exception as e:  # never let bookkeeping kill the uploader
                log.error("upload bookkeeping in %s failed: %s", self.remote.root, e)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _upload_one(self, info: CheckpointInfo) -> None:
        with self._idle:
            future = self._futures.setdefault(info.step, Future())
        ok = False
        try:
            future.set_result(self._upload(info))
            ok = True
        except Exception as e:  # the local copy stays; training goes on
            msg = f"[step={info.step}] upload to {self.remote.root} failed: {e}"
            log.error("%s", msg)
            with self._idle:
                self._errors.append(msg)
            future.set_exception(CheckpointError(msg))
        with self._idle:
            self._futures.pop(info.step, None)
            self._done[info.step] = future
            while len(self._done) > _KEEP_DONE:
                self._done.pop(next(iter(self._done)))
            # A failed step stays held until a newer one is on the remote (the remote
            # timeline then forbids uploading it): it is never lost to local retention.
            superseded = {s for s in self._failed if s < info.step} if ok else set()
            self._failed = (self._failed - superseded) | (set() if ok else {info.step})
        for step in [info.step, *superseded] if ok else []:
            self.local.catalog.release(step)
        self._mark_tiers()

    def _upload(self, info: CheckpointInfo) -> CheckpointInfo:
        catalog = self.remote.catalog
        committer = catalog.committer
        assert committer is not None
        marker = resolve.read_marker(info.path)  # with metrics amended since the save
        newest = catalog.newest()
        target = committer.begin(info.step, None if newest is None else newest.step)
        source, dest = storage_of(info.path), self.remote.storage
        try:
            for name in sorted(marker.files):
                meta = marker.files[name]
                _copy(source, info.path / name, dest, target / name, meta.size, meta.crc32)
            self.hook("files", info.step)  # -> "upload:files": every file up, no marker
            if self._closing.is_set():
                raise CheckpointError("the manager closed: upload abandoned before its marker")
            path, remote_marker = committer.finalize(
                info.step, epoch=marker.epoch, metrics=marker.metrics, extra=marker.extra,
                entries=marker.entries, digests=_digests(marker), world_size=marker.world_size,
                shards=marker.shards,
            )  # fmt: skip
        except BaseException:
            committer.abort(info.step)
            raise
        uploaded = CheckpointInfo.from_marker(path, remote_marker)
        catalog.add(uploaded)
        log.info("[step=%d] uploaded to %s", info.step, path)
        return uploaded

    def _amend(self, job: _Amend) -> None:
        catalog = self.remote.catalog
        info = next((e for e in catalog.entries() if e.step == job.step), None)
        if info is None:
            log.warning("[step=%d] not in %s: metrics %s not recorded there", job.step,
                        self.remote.root, dict(job.metrics))  # fmt: skip
            return
        catalog.amend(info, resolve.read_marker(info.path).amended(job.metrics, job.extra))

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


def _digests(marker: Marker) -> dict[str, dict[str, Any]]:
    """The marker's files as the committer takes them (what the writers report)."""
    return {name: f.to_json() for name, f in marker.files.items()}


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
