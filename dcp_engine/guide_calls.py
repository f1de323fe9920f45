"""What the guides' callbacks offer beyond our hooks, for ``CheckpointCallback``:

- Dream Trainer: ``save()`` (another callback sets ``_current_metric`` and saves now), a
  ``should_save`` override without arguments that reads ``self._current_metric``;
- SuperGradients: the initial weights loaded at train start (``init_weights``:
  ``checkpoint_path``, ``strict_load``, ``load_backbone``) and the average of the best
  checkpoints written at train end (``average_best_models``).

A mixin: it reads the callback's ``config``, ``manager`` and loop position.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import layout

if TYPE_CHECKING:
    from .config import CheckpointConfig
    from .manager import CheckpointManager
    from .saving import SaveHandle

log = logging.getLogger("dcp_engine.callbacks")


class GuideCalls:
    """Dream Trainer's and SuperGradients' calls on ``CheckpointCallback``."""

    config: CheckpointConfig
    manager: CheckpointManager | None
    last_save: SaveHandle | None
    _step: int
    _epoch: int
    _saved_step: int | None
    _metrics: dict[str, float]
    _save: Callable[..., bool]  # CheckpointCallback's
    _record_best: Callable[[Mapping[str, float]], None]  # CheckpointCallback's

    _current_metric: Any = None
    """The newest value of ``monitor`` the hooks saw (None after a resume, as Dream
    Trainer's); ``save()`` saves it as the monitor's value."""
    _app_state: Mapping[str, Any] | None = None  # the newest the hooks were given
    _started = False

    def save(self, app_state: Mapping[str, Any] | None = None) -> SaveHandle | None:
        """Save now, at the current step (the last ``on_step_end``), with
        ``_current_metric`` as the value of ``monitor``: Dream Trainer's ``save()``.
        ``app_state``: default the one the hooks were last given. Collective: every rank
        calls it. Returns the handle; None when checkpointing is off, or when this step
        is saved already (the metrics then go to that checkpoint)."""
        if not self._started:
            raise RuntimeError("CheckpointCallback.save() before on_train_start")
        if self.manager is None:
            return None  # enabled: false
        state = app_state if app_state is not None else self._app_state
        assert state is not None  # on_train_start keeps one
        metrics = dict(self._metrics)
        if self.config.monitor is not None and self._current_metric is not None:
            metrics[self.config.monitor] = float(self._current_metric)
        if self._step == self._saved_step:  # (a save reduces its metrics itself)
            metrics = self.manager.reduce_metrics(metrics, f"metrics of step {self._step}")
            self.manager.update_metrics(self._step, metrics)
            self._record_best(metrics)
            return None
        self._save(self._step, self._epoch, state, metrics, ended=False, force=True)
        return self.last_save

    def _note_metric(self, metrics: Mapping[str, float]) -> None:
        monitor = self.config.monitor
        if monitor is not None and monitor in metrics:
            self._current_metric = metrics[monitor]

    def _guide_form(self) -> bool:
        """``should_save`` is overridden as Dream Trainer's guide writes it: no arguments."""
        return _takes_no_arguments(type(self))

    def _ask(self, event: str, step: int, epoch: int, metrics: Mapping[str, float]) -> bool:
        """An overridden ``should_save``'s answer, called with our keyword arguments or
        with none (Dream Trainer's ``def should_save(self) -> bool``)."""
        should_save: Any = self.should_save  # type: ignore[attr-defined]
        if self._guide_form():
            return bool(should_save())
        return bool(should_save(event=event, step=step, epoch=epoch, metrics=metrics))

    def _load_init_weights(self, app_state: Mapping[str, Any]) -> None:
        """A fresh run: ``config.init_weights`` into its module (every rank reads it)."""
        from .weights import load_init_weights

        cfg = self.config
        assert cfg.init_weights is not None
        load_init_weights(app_state, cfg.init_weights, into=cfg.init_weights_into,
                          strict=cfg.init_weights_strict,
                          backbone_only=cfg.init_weights_backbone_only,
                          storage_options=cfg.storage_options)  # fmt: skip

    def _average(self) -> None:
        """``average_best_models``: rank 0 writes ``average_model.pth`` into the experiment
        (the remote one with a local tier, once uploaded); every rank raises its error."""
        from .export import average_modules

        manager, cfg = self.manager, self.config
        assert manager is not None and cfg.monitor is not None
        monitor = cfg.monitor
        manager.wait_uploads()
        exp = manager.remote_dir or manager.experiment_dir
        out = exp / layout.AVERAGE_FILE
        steps = manager.decide(
            lambda: average_modules(exp, out, monitor=monitor, mode=cfg.mode),
            f"average_best_models of {exp}",
        )
        if manager.rank == 0:
            log.info("averaged steps %s (the best by %s) into %s", steps, monitor, out)


_BARE: dict[type, bool] = {}


def _takes_no_arguments(cls: type) -> bool:
    """Whether ``cls.should_save`` takes no argument besides ``self``."""
    if cls not in _BARE:
        params = list(inspect.signature(cls.should_save).parameters.values())  # type: ignore[attr-defined]
        _BARE[cls] = len(params) == 1
    return _BARE[cls]


__all__ = ["GuideCalls"]
