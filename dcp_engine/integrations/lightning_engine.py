"""The engine side of the Lightning classes: saves, names, removals and loads.

``LightningEngine`` owns one ``CheckpointManager`` from the first save of a ``fit`` until
``close`` (Lightning's ``teardown``) and maps Lightning's calls onto it:

- ``save(path)``, on every rank: a new global step is an asynchronous engine save; the
  step saved last, saved again under another path, is the same checkpoint with one more
  name (what differs besides model and optimizer state goes with the name);
- each name file is written once its checkpoint has committed (rank 0's ``Namer``);
- ``remove(path)``, on rank 0: the name goes once the save in flight has committed; a
  checkpoint left without names is handed to retention (``discard``);
- ``load(path)``: reads without a manager (reads never write); the next save continues
  that experiment in place if the checkpoint loaded is its newest, else branches into a
  new experiment (the timeline only goes forward).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..committer import PhaseHook, no_hook
from ..config import CheckpointConfig
from ..errors import CheckpointError, ConfigError, TimelineError
from ..layout import experiment_of
from ..location import Location, same_location
from ..manager import CheckpointManager
from ..reader import open_checkpoint
from ..resolve import find_checkpoints
from ..saving import SaveHandle
from . import lightning_names as names
from . import lightning_payload as payload
from .lightning_namer import Namer

log = logging.getLogger(__name__)

_RETENTION_FIELDS = ("keep_top_k", "keep_last_n", "keep_every_n_steps", "keep_every_n_epochs")


def check_config(config: CheckpointConfig) -> CheckpointConfig:
    """The fields that Lightning decides are refused here, naming Lightning's knob."""
    if not isinstance(config, CheckpointConfig):
        raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
    for field in _RETENTION_FIELDS:
        if getattr(config, field) is not None:
            raise ConfigError(
                field, getattr(config, field), "None: with Lightning, ModelCheckpoint("
                "save_top_k=...) decides what is kept, and its removals reach retention",
            )  # fmt: skip
    if config.resume is not None:
        raise ConfigError(
            "resume", config.resume, "None: with Lightning, trainer.fit(ckpt_path=...) resumes"
        )
    if config.when_busy != "wait":
        raise ConfigError(
            "when_busy", config.when_busy, "'wait': ModelCheckpoint records every path it saves"
        )
    return config


@dataclass(frozen=True)
class _Loaded:
    """The checkpoint the last ``load`` read: where the next save continues from."""

    experiment: Location
    checkpoint: Location
    step: int
    snapshot: payload.Snapshot


class LightningEngine:
    """Saves, names, removes and loads Lightning checkpoints through one manager."""

    def __init__(self, config: CheckpointConfig, *, hook: PhaseHook = no_hook) -> None:
        self.config = check_config(config)
        self._hook = hook  # the manager's seam for tests (``hook(phase, step)``)
        self.manager: CheckpointManager | None = None
        """Open from the first save of a run until ``close``."""
        self._experiment: Location | None = None  # the experiment the last manager wrote
        self._loaded: _Loaded | None = None
        self._saved: payload.Snapshot | None = None  # the newest step saved or loaded
        self._last: SaveHandle | None = None  # the newest save of this manager
        self._namer: Namer | None = None  # rank 0, while the manager is open
        self._at_exit: Callable[[], None] | None = None  # the exit hook registered last

    # ------------------------------------------------------------------ save

    def save(
        self,
        checkpoint: Mapping[str, Any],
        path: str | os.PathLike[str],
        build: Callable[[], Mapping[str, Any]],
    ) -> SaveHandle | None:
        """Save ``checkpoint`` (``build()``: its ``app_state``) as ``path``. Collective.
        Returns the engine's handle of a new save; None when ``path`` named the step
        saved last (no second engine save)."""
        name = names.normalize(path)
        step = _int(checkpoint, "global_step", name)
        mgr = self._open()
        if self._namer is not None:
            names.make_parent(name)
        saved = self._saved
        if saved is not None and step == saved.step:
            self._name_again(mgr, saved, checkpoint, name)
            return None
        try:
            handle = mgr.save(
                step, build(), epoch=_epoch(checkpoint), extra={names.NAMES_KEY: [name]}
            )
        except TimelineError as e:
            raise TimelineError(
                f"{name}: {e}. With Lightning, trainer.fit(ckpt_path=<a saved path>) resumes: "
                "from the newest checkpoint in place, from an older one into a branch"
            ) from e
        self._saved, self._last = payload.Snapshot.of(step, checkpoint), handle
        if self._namer is not None:
            self._namer.named(name, step, handle.committed, payload.NO_OVERRIDES, new=True)
        return handle

    def _name_again(
        self,
        mgr: CheckpointManager,
        saved: payload.Snapshot,
        checkpoint: Mapping[str, Any],
        name: str,
    ) -> None:
        """One more name for the step saved last (in flight or committed)."""
        changes = payload.overrides(saved, checkpoint, name)  # every rank: the same verdict
        if self._namer is None:
            return
        pending = self._last if self._last is not None and self._last.step == saved.step else None
        gate = None if pending is None else pending.committed
        self._namer.named(name, saved.step, gate, changes, new=False)

    # ------------------------------------------------------------------ remove

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Lightning no longer wants ``path`` (rank 0): the name goes once the save in
        flight has committed, and its checkpoint with it if no other name is left."""
        name = names.normalize(path)
        if self._namer is None:  # nothing saved by this run: only the file is ours to drop
            if names.remove(name):
                log.info("removed the name %s (its checkpoint is left to its own run)", name)
            return
        gate = None if self._last is None else self._last.committed
        self._namer.removed(name, gate)

    # ------------------------------------------------------------------ load

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        into: Callable[[tuple[str, ...]], Mapping[str, Any]] | None = None,
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any] | None:
        """The checkpoint dict ``path`` names, read without a manager; None if ``path``
        is not a name file. ``into(removed)``: objects (FSDP2 modules, optimizers) to
        restore in place, collectively over the job, given the keys the name leaves out;
        one that was not saved keeps its state. ``map_location``: None (the CPU) or a
        device. ``weights_only=True`` is refused: the checkpoint keeps Lightning's
        non-tensor values pickled."""
        name = names.normalize(path)
        ref = names.read(name)
        if ref is None:
            self._loaded = None  # not one of ours: the next save starts as the config says
            return None
        if weights_only:
            raise CheckpointError(
                f"{name}: weights_only=True cannot be honoured: a dcp-engine checkpoint keeps "
                "Lightning's non-tensor values (loops, callbacks, hyper-parameters) pickled; "
                "load only checkpoints you trust, with weights_only=None or False"
            )
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"{name}: map_location={map_location!r}: give None or a device")
        if self.manager is not None:  # a load in the middle of a run: the next save replans
            self.close()
        reader = open_checkpoint(ref.experiment_dir, which=ref.step)
        objects = dict(into(ref.overrides.removed)) if into is not None else {}
        if objects:  # one collective read, all or nothing on every rank, the dict with it
            state = {**objects, payload.SKELETON: b""}
            reader.load(state, optional=[k for k in objects if k not in reader.keys])
            entries = {payload.SKELETON: state[payload.SKELETON]}
        else:
            keys = [k for k in (payload.TENSORS, payload.SKELETON) if k in reader.keys]
            entries = reader.load_entries(keys)
        stored = payload.rebuild(entries, name)
        snapshot = payload.Snapshot.of(ref.step, stored)
        self._loaded = _Loaded(experiment_of(reader.path), reader.path, ref.step, snapshot)
        return payload.to_device(ref.overrides.apply(stored), map_location)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for the save in flight and the names after it, then close the manager
        (collective); raises the first error of either."""
        mgr, namer = self.manager, self._namer
        if mgr is None:
            return
        self.manager, self._namer, self._last = None, None, None
        try:
            mgr.wait()
        finally:
            try:
                if namer is not None:
                    namer.stop()
            finally:
                mgr.close()

    def _open(self) -> CheckpointManager:
        if self.manager is not None:
            if self._namer is not None:
                self._namer.check()
            return self.manager
        config = _on_rank_zero(self._plan)
        mgr = CheckpointManager(config, hook=self._hook)
        self.manager, self._experiment, self._last = mgr, mgr.experiment_dir, None
        entries = mgr.checkpoints()
        newest = entries[-1].step if entries else None
        loaded, saved = self._loaded, self._saved
        self._loaded = None
        if loaded is not None and config.resume is None:
            saved = loaded.snapshot  # in place: the step loaded is the newest
        if saved is None or saved.step != newest:
            saved = None if newest is None else payload.Snapshot(newest, frozenset(), None)
        self._saved = saved
        if mgr.rank == 0:
            self._namer = Namer(mgr, fsync=config.fsync)
            self._namer.adopt(entries)
        # A save outside fit (trainer.save_checkpoint) gets its names before the exit;
        # registered after the manager's own hook, so it runs first (one per engine).
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)
        return mgr

    def _plan(self) -> CheckpointConfig:
        """Rank 0: the config of the manager to open. After a load: that experiment in
        place if the checkpoint loaded is its newest (and the config does not name
        another), else a branch from it; else the experiment this engine wrote before."""
        config, loaded = self.config, self._loaded
        if loaded is None:
            if self._experiment is None:
                return config
            return _in(config, self._experiment)
        newest = find_checkpoints(loaded.experiment)
        target = (config.root_path / config.experiment_name) if config.experiment_name else None
        here = same_location(target, loaded.experiment) if target is not None else same_location(
            config.root_path, loaded.experiment.parent
        )  # fmt: skip
        if here and newest and newest[0].step == loaded.step:
            return _in(config, loaded.experiment)
        log.info("resumed from %s (not the newest of its experiment): saves go to a branch",
                 loaded.checkpoint)  # fmt: skip
        return dataclasses.replace(config, resume=str(loaded.checkpoint))


def _close_at_exit(ref: weakref.ref[LightningEngine]) -> None:
    engine = ref()
    if engine is not None and engine.manager is not None:
        try:
            engine.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("closing the Lightning checkpoints at exit: %s", e)


def _in(config: CheckpointConfig, experiment: Location) -> CheckpointConfig:
    return dataclasses.replace(
        config, root_dir=str(experiment.parent), experiment_name=experiment.name
    )


def _on_rank_zero(plan: Callable[[], CheckpointConfig]) -> CheckpointConfig:
    """``plan()`` on rank 0, its result (or its error) on every rank, over the default
    group (Lightning initialised it; there is no manager yet)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan()
    box: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", plan())
        except Exception as e:
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(f"opening the experiment failed on rank 0: {value}")
    return value


def _int(checkpoint: Mapping[str, Any], key: str, name: str) -> int:
    value = checkpoint.get(key)
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{name}: the checkpoint's {key!r} is {value!r}, not a step")
    return value


def _epoch(checkpoint: Mapping[str, Any]) -> int | None:
    value = checkpoint.get("epoch")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


__all__ = ["LightningEngine", "check_config"]
