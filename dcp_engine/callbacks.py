"""Driving the manager from a custom training loop: when to save, resume, flush.

    cb = CheckpointCallback(CheckpointConfig.from_yaml("config.yaml"))
    app_state["sampler"] = sampler                 # a ResumableDistributedSampler
    start = cb.on_train_start(app_state)           # resumes as config.resume says
    step = start.step                              # steps done
    for epoch in range(start.epoch, epochs):
        sampler.set_epoch(epoch)                   # a resumed epoch goes on where it was
        for batch in loader:
            ...
            step += 1
            cb.on_step_end(step, app_state, metrics={"loss": loss})
        cb.on_validation_end({"val_loss": v})
        cb.on_epoch_end(epoch, app_state)
    cb.on_train_end(app_state)

Every rank calls every hook with the same arguments. The decision to save is alike on
every rank: rules on step and epoch numbers are decided locally (no communication); a rule
on the clock or on a metric, and an overridden ``should_save``, is decided by rank 0 and
broadcast on the manager's side group. Metrics are every rank's, reduced
(``CheckpointConfig.metrics_reduce``) before they are recorded or decided on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import retention
from .config import CheckpointConfig
from .errors import TimelineError
from .guide_calls import GuideCalls
from .manager import CheckpointManager
from .marker import clean_metrics
from .position import LOOP_KEY, TrainStart, loop_position, position_of, timeline_hint
from .preemption import Preempted, SigtermWatch
from .saving import SaveHandle
from .storage import Storage

log = logging.getLogger(__name__)

STEP, EPOCH, TRAIN_END = "step", "epoch", "train_end"


class CheckpointCallback(GuideCalls):
    """Saves on the schedule of ``config`` (``save_every_n_steps``/``_epochs``/``_seconds``,
    ``save_best_only``, ``save_on_train_end``) and resumes as ``config.resume`` says.

    Writes as ``config.async_mode`` says, as given: asynchronous by default (the
    config's default is ``"process"``: ``save`` returns once the state is staged), in-line
    with ``async_mode="off"``.

    The loop position (steps done, epoch, steps done in it, whether it had ended) is kept
    in the checkpoint's marker (``CheckpointInfo.extra["trainer"]``, after Dream Trainer's
    ``trainer`` entry), so ``on_train_start`` can say where to go on. Subclasses may
    override ``should_save`` (with its arguments or, as Dream Trainer's guide does, none);
    rank 0's answer is then used on every rank. ``save()`` saves now (``guide_calls.py``,
    with SuperGradients' initial weights and train-end average). ``extra``: a
    JSON dict kept beside the position in every checkpoint's marker (DINO keeps its
    training config there, as its guide's checkpoints hold ``config``).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        process_group: dist.ProcessGroup | None = None,
        run_config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        storage: Storage | None = None,
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        self.config = config
        self.manager: CheckpointManager | None = None
        self._group, self._run_config = process_group, run_config
        self._storage = storage  # the manager's file-system seam (tests inject faults)
        if extra is not None and LOOP_KEY in extra:
            raise ValueError(f"extra[{LOOP_KEY!r}] is the callback's (the loop position)")
        self._extra = dict(extra or {})  # JSON, kept in every checkpoint's marker
        self._clock = clock
        self._step = 0  # steps done
        self._epoch = 0  # the epoch running now
        self._epoch_start = 0  # steps done when it began
        self._start: TrainStart | None = None  # what on_train_start returned
        self._metrics: dict[str, float] = {}  # from on_validation_end, not saved yet
        self._validated = False  # on_validation_end since the last save
        self._best: float | None = None  # best ``monitor`` value saved so far
        self._saved_step: int | None = None
        self._last_save = clock()
        self._sigterm = SigtermWatch()  # save_on_sigterm
        self.last_save: SaveHandle | None = None
        """The handle of the newest save the callback made (its figures, its commit)."""

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, app_state: dict[str, Any]) -> TrainStart:
        """Open the experiment and resume (``config.resume``); where the loop starts."""
        self._started, self._app_state, self._current_metric = True, app_state, None
        if not self.config.enabled:
            log.info("checkpointing is off (enabled: false): nothing is saved or resumed")
            return TrainStart(0, 0)
        self.manager = CheckpointManager(
            self.config, self._group, run_config=self._run_config, storage=self._storage
        )
        info = self.manager.resume(app_state)
        if info is None and self.config.init_weights is not None:
            self._load_init_weights(app_state)  # a fresh run (a resumed one keeps its own)
        self._last_save = self._clock()
        if self.config.save_on_sigterm:
            self._sigterm.install()
        if info is None:
            self._start = TrainStart(0, 0)
            return self._start
        if self.manager.branch_source is not None and self.config.initial_load_only is not None:
            log.info("started from %s (%s only): step 0", info.path, self.config.initial_load_only)
            self._start = TrainStart(0, 0, info)  # a new training from those weights
            return self._start
        step, epoch, ended, batches = position_of(info)
        self._step, self._epoch = step, epoch + int(ended)
        self._epoch_start = step - batches
        self._saved_step = info.step
        top = retention.best(self.manager.checkpoints(), self.config.monitor, self.config.mode)
        if self.config.monitor is not None:
            value = retention.metric_of(top or info, self.config.monitor)
            self._best = value if math.isfinite(value) else None
        log.info("resumed from %s: %d steps done, epoch %d next (%d of its steps done)",
                 info.path, step, self._epoch, step - self._epoch_start)  # fmt: skip
        self._start = TrainStart(step, self._epoch, info, step - self._epoch_start)
        return self._start

    def on_step_end(
        self, step: int, app_state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
    ) -> bool:
        """After the ``step``-th step (the global step, counted from 1); saves if due.
        Returns whether it saved. With ``save_on_sigterm``, after a SIGTERM on any rank
        this saves, waits for the commit, closes and raises ``Preempted`` (a
        ``SystemExit``: the program's ``finally`` and ``atexit`` run, the exit status is
        ``128 + signum``)."""
        start = self._start
        if start is not None and start.resumed_from is not None and step <= start.step:
            raise TimelineError(
                f"on_step_end(step={step}): step {start.step} is already committed; "
                f"{timeline_hint(start, self.config.resume, step)}"
            )
        self._step = step
        if self.config.save_on_sigterm and self.manager is not None:
            signum = self.manager.any_rank(self._sigterm.signum, f"preemption check at step {step}")
            if signum:
                self._save_and_exit(step, app_state, metrics, signum)
        return self._maybe_save(STEP, step, self._epoch, app_state, metrics, ended=False)

    def _save_and_exit(
        self, step: int, app_state: Mapping[str, Any], metrics: Any, signum: int
    ) -> None:
        assert self.manager is not None
        if step != self._saved_step:
            merged = {**self._metrics, **clean_metrics(metrics)}
            self._save(step, self._epoch, app_state, merged, ended=False, force=True)
        self.manager.wait()
        self.close()
        log.warning("preempted (signal %d): step %d is committed; exiting with %d",
                    signum, step, 128 + signum)  # fmt: skip
        raise Preempted(signum, step)

    def on_epoch_end(
        self,
        epoch: int,
        app_state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
    ) -> bool:
        """After epoch ``epoch`` (0-based); saves if due, under ``step`` (default: the last
        step seen, or the number of epochs done if no step was). Returns whether it saved.
        A step is saved once: if a step trigger saved this epoch's last step, the epoch
        end does not save again; its metrics (the validation's) are added to that
        checkpoint, which is marked as the end of the epoch
        (``CheckpointManager.update_metrics``)."""
        if step is None:
            step = self._step if self._step > 0 else epoch + 1
        self._step = step
        saved = self._maybe_save(EPOCH, step, epoch, app_state, metrics, ended=True)
        self._epoch, self._epoch_start = epoch + 1, step
        return saved

    def on_validation_end(self, metrics: Mapping[str, Any]) -> None:
        """Metrics for the next save (and for ``save_best_only``)."""
        self._metrics.update(clean_metrics(metrics))
        self._validated = True
        self._note_metric(self._metrics)

    def on_train_end(self, app_state: Mapping[str, Any], *, step: int | None = None) -> None:
        """Save the final state (``save_on_train_end``, unless that step is saved), then
        flush and close the manager."""
        if self.manager is None:
            return
        try:
            step = self._step if step is None else step
            if (
                step > 0
                and step != self._saved_step
                and self.should_save_now(TRAIN_END, step, self._epoch, {})
            ):
                final, dtype = self.config.final_state(app_state)
                self._save(step, self._epoch, final, {}, ended=False, force=True, dtype=dtype)
            self.manager.wait()
            if self.config.average_best_models:
                self._average()
        finally:
            self.close()

    def on_exception(self, app_state: Mapping[str, Any], exc: BaseException) -> None:
        """Flush what is in flight (its own error is logged, not raised over ``exc``) and
        close. A new save of a possibly broken state is made only with
        ``config.save_on_exception`` (all ranks must have failed alike: it is collective)."""
        if self.manager is None:
            return
        try:
            self.manager.wait()
            unsaved = self._step > 0 and self._step != self._saved_step
            if self.config.save_on_exception and unsaved:
                self._save(self._step, self._epoch, app_state, {}, ended=False, force=True)
                self.manager.wait()
        except Exception as e:
            log.error("while handling %s: the checkpoint flush failed: %s", type(exc).__name__, e)
        finally:
            try:
                self.close()
            except Exception as e:
                log.error("while handling %s: closing the checkpoint manager failed: %s",
                          type(exc).__name__, e)  # fmt: skip

    def close(self) -> None:
        self._sigterm.uninstall()
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()

    # ------------------------------------------------------------------ policy

    def should_save(
        self, *, event: str, step: int, epoch: int, metrics: Mapping[str, float]
    ) -> bool:
        """Whether to save now. ``event``: ``"step"``, ``"epoch"`` or ``"train_end"``.
        Override for custom rules; the override runs on rank 0 and rank 0's answer is
        used on every rank."""
        if event == TRAIN_END:
            return self.config.save_on_train_end
        return self._due(event, step, epoch) and (
            not self.config.save_best_only or self._is_new_best(metrics)
        )

    def should_save_now(
        self, event: str, step: int, epoch: int, metrics: Mapping[str, float]
    ) -> bool:
        """``should_save``, agreed by every rank (asks rank 0 only where the answer may
        differ between ranks: a clock, a metric, an override)."""
        assert self.manager is not None
        cfg = self.config
        ask = lambda: self._ask(event, step, epoch, metrics)  # noqa: E731
        what = f"should_save at step {step}"
        if type(self).should_save is not CheckpointCallback.should_save:
            if event == TRAIN_END and self._guide_form():
                return cfg.save_on_train_end  # `should_save(self)` cannot see the event
            metrics = self.manager.reduce_metrics(metrics, what)  # `ask` reads the reduced
            self._note_metric(metrics)  # and so does `should_save(self)`: _current_metric
            return self.manager.decide(ask, what)
        if event == TRAIN_END:
            return cfg.save_on_train_end
        if event == STEP and cfg.save_every_n_seconds:
            if cfg.save_best_only:
                metrics = self.manager.reduce_metrics(metrics, what)
            return self.manager.decide(ask, what)
        if not self._due(event, step, epoch):
            return False
        if cfg.save_best_only:
            metrics = self.manager.reduce_metrics(metrics, what)
            return self.manager.decide(lambda: self._is_new_best(metrics), what)
        return True

    def _due(self, event: str, step: int, epoch: int) -> bool:
        cfg = self.config
        periodic = bool(
            cfg.save_every_n_steps
            or cfg.save_every_n_epochs
            or cfg.save_every_n_seconds
            or cfg.save_at_epochs
        )
        if event == STEP:
            if cfg.save_every_n_steps and step > 0 and step % cfg.save_every_n_steps == 0:
                return True
            seconds = cfg.save_every_n_seconds
            if seconds and self._clock() - self._last_save >= seconds:
                return True
            # save_best_only alone: right after a validation.
            return cfg.save_best_only and not periodic and self._validated
        if event == EPOCH:
            if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0:
                return True
            if epoch + 1 in cfg.save_at_epochs:  # counted from 1, as SG's list
                return True
            return cfg.save_best_only and not periodic
        return False

    def _is_new_best(self, metrics: Mapping[str, float]) -> bool:
        monitor = self.config.monitor
        assert monitor is not None  # save_best_only needs one (checked by the config)
        value = metrics.get(monitor, math.nan)
        if not math.isfinite(value):
            return False
        if self._best is None:
            return True
        return value > self._best if self.config.mode == "max" else value < self._best

    # ------------------------------------------------------------------ saving

    def _maybe_save(
        self,
        event: str,
        step: int,
        epoch: int,
        app_state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        *,
        ended: bool,
    ) -> bool:
        if self.manager is None:
            return False
        self._app_state = app_state
        merged = {**self._metrics, **clean_metrics(metrics)}
        self._note_metric(merged)
        if step == self._saved_step:
            # Saved already at this step (a step trigger on the epoch's last step): the
            # metrics that came since (the validation) go to that checkpoint.
            if ended:  # (alike on every rank: so is the collective of the reduction)
                merged = self.manager.reduce_metrics(merged, f"metrics of step {step}")
                self.manager.update_metrics(step, merged, extra=self._marker(step, epoch, True))
                self._record_best(merged)
                self._metrics, self._validated = {}, False
            return False
        if not self.should_save_now(event, step, epoch, merged):
            return False
        return self._save(step, epoch, app_state, merged, ended=ended)

    def _save(
        self,
        step: int,
        epoch: int,
        app_state: Mapping[str, Any],
        metrics: Mapping[str, float],
        *,
        ended: bool,
        force: bool = False,
        dtype: torch.dtype | None = None,
    ) -> bool:
        assert self.manager is not None
        extra = self._marker(step, epoch, ended)
        try:
            handle = self.manager.save(
                step, app_state, epoch=epoch, metrics=metrics, force=force, extra=extra, dtype=dtype
            )
        except TimelineError as e:
            hint = timeline_hint(self._start, self.config.resume, step)
            raise TimelineError(f"{e}; {hint}") from e
        self.last_save = handle
        if handle.skipped:
            return False  # when_busy="skip": the previous save is still writing
        self._saved_step, self._last_save = step, self._clock()
        self._record_best(handle.metrics)
        self._metrics, self._validated = {}, False
        return True

    def _marker(self, step: int, epoch: int, epoch_done: bool) -> dict[str, Any]:
        """The marker's ``extra``: the caller's, and the loop position."""
        batches = step - self._epoch_start
        return {**self._extra, LOOP_KEY: loop_position(step, epoch, epoch_done, batches)}

    def _record_best(self, metrics: Mapping[str, float]) -> None:
        monitor = self.config.monitor
        value = metrics.get(monitor, math.nan) if monitor else math.nan
        if math.isfinite(value) and (self._best is None or self._is_new_best(metrics)):
            self._best = value


class AsyncCheckpointCallback(CheckpointCallback):
    """``CheckpointCallback`` that guarantees background writes: its config's
    ``async_mode`` must be ``"thread"`` or ``"process"`` (the default); ``"off"`` is
    refused (``ValueError``), never switched silently."""

    def __init__(self, config: CheckpointConfig, **kwargs: Any) -> None:
        if isinstance(config, CheckpointConfig) and config.async_mode == "off":
            raise ValueError(
                "AsyncCheckpointCallback writes in the background, but the config says "
                "async_mode='off': use CheckpointCallback for in-line saves, or set "
                "async_mode to 'process' (the default) or 'thread'"
            )
        super().__init__(config, **kwargs)


__all__ = [
    "LOOP_KEY",
    "AsyncCheckpointCallback",
    "CheckpointCallback",
    "Preempted",
    "TrainStart",
    "loop_position",
]
