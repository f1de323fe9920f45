"""torchtitan's ``CheckpointManager``, with the engine underneath.

    from dcp_engine.integrations.torchtitan import CheckpointManager

    checkpointer = CheckpointManager(
        job_config.checkpoint,                  # torchtitan's config, or a dict of its keys
        dataloader=dataloader,
        model_parts=model_parts,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": trainer},
        base_folder=job_config.job.dump_folder,
    )
    checkpointer.load(step=job_config.checkpoint.load_step)
    for step in ...:
        ...
        checkpointer.save(step, last_step=step == last)
    checkpointer.close()

The constructor takes torchtitan's arguments (0.3's ``config`` or 0.2's
``checkpoint_config``) and ``save``/``load``/``maybe_wait_for_staging``/
``maybe_wait_for_saving``/``close`` behave as torchtitan's do (``docs/torchtitan.md``
lists the differences). torchtitan itself is not imported: any object with its config's
attributes, or a mapping of its keys, will do. Every rank constructs it and calls every
method with the same arguments (the engine's calls are collective).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import CheckpointConfig
from ..config_keys import KEY_ALIASES, with_torchtitan_defaults
from ..errors import ConfigError, UnsupportedKeyError
from ..manager import CheckpointManager as EngineManager
from ..saving import SaveHandle

log = logging.getLogger(__name__)

MODEL, OPTIMIZER, LR_SCHEDULER, DATALOADER = "model", "optimizer", "lr_scheduler", "dataloader"
"""torchtitan's state keys (its ``checkpointer.base``)."""


class CheckpointManager:
    """torchtitan's checkpoint manager interface over ``dcp_engine.CheckpointManager``.

    ``options``: ``CheckpointConfig`` fields beyond torchtitan's keys (``timeout_s``,
    ``storage_options``, ``local_dir``...); they win over the keys of ``config`` that set
    the same field. ``process_group``: the ranks that checkpoint together (default: the
    default group). The checkpoint holds ``model`` (the module), ``optimizer``,
    ``lr_scheduler``, ``dataloader`` (unless None) and the entries of ``states``, each
    through its own ``state_dict``/``load_state_dict``.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        dataloader: Any,
        model_parts: list[nn.Module] | nn.Module,
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        checkpoint_config: Any = None,
        sd_adapter: Any = None,
        base_folder: str = "",
        ft_manager: Any = None,
        options: Mapping[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if (config is None) == (checkpoint_config is None):
            raise TypeError(
                "pass torchtitan's checkpoint config once: as config (0.3) or "
                "checkpoint_config (0.2)"
            )
        block = torchtitan_block(config if config is not None else checkpoint_config)
        if ft_manager is not None:
            raise UnsupportedKeyError(
                "ft_manager", type(ft_manager).__name__, "CheckpointManager",
                "torchft fault-tolerant training is not supported by dcp-engine",
            )  # fmt: skip
        block.pop("enable_ft_dataloader_checkpoints", None)  # inert without torchft
        if block.pop("create_seed_checkpoint", False):
            raise UnsupportedKeyError(
                "create_seed_checkpoint", True, "checkpoint",
                "the seed-checkpoint run is torchtitan's trainer's; save the initialised "
                "model once with dcp_engine.CheckpointManager.save(0, {'model': model})",
            )  # fmt: skip
        self.enable_first_step_checkpoint = bool(block.pop("enable_first_step_checkpoint", False))
        self.load_only = bool(block.pop("load_only", False))
        self.load_step = block.pop("load_step", -1)  # load(step=...) says which
        self.config = CheckpointConfig.from_dict(
            _merge(block, options or {}), base_folder=base_folder or "."
        )
        """The engine's config: torchtitan's keys as ``CheckpointConfig.from_dict`` reads them."""
        excluded = list(self.config.exclude_from_loading)
        if MODEL in excluded:
            where = "checkpoint.exclude_from_loading"
            raise ConfigError("exclude_from_loading", excluded, "keys but 'model'", where=where)
        self.enable = self.config.enabled
        self.sd_adapter = sd_adapter
        if not self.enable:
            return
        self.interval = self.config.save_every_n_steps or 0
        self.states = states
        self.states.update(
            {
                MODEL: _one_module(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        self._proxies = {OPTIMIZER: _own_state_dict(optimizers)}
        self.manager = EngineManager(self.config, process_group)
        """The engine's manager (``checkpoints()``, ``stats()``, ``experiment_dir``...)."""
        self.folder = str(self.manager.experiment_dir)
        self._last: SaveHandle | None = None
        log.info("checkpointing active: checkpoints are loaded from and saved to %s", self.folder)

    # ------------------------------------------------------------------ torchtitan's API

    def save(self, curr_step: int, last_step: bool = False) -> bool:
        """Save if due: every ``interval`` steps, after step 1 with
        ``enable_first_step_checkpoint``, and at the last step, which writes only the
        model in ``export_dtype`` with ``last_save_model_only`` and waits for the commit.
        Other saves return once staged (``async_mode``). True if a save was made."""
        if not self.enable or not self._should_save(curr_step, last_step):
            return False
        if last_step and self.config.last_save_only is not None:
            part, dtype = self.config.final_state(self._app_state())
            handle = self.manager.save(curr_step, part, force=True, dtype=dtype)
        else:
            handle = self.manager.save(curr_step, self._app_state(), force=last_step)
        self._last = handle
        if last_step:
            self.manager.wait()
        return not handle.skipped

    def load(self, step: int = -1) -> bool:
        """Restore the state from ``step`` of the folder (-1: its newest), except
        ``exclude_from_loading``; a folder without checkpoints loads ``initial_load_path``
        (only the model with ``initial_load_model_only``) if set. False on a fresh start;
        a missing ``step`` raises ``CheckpointNotFoundError``."""
        if not self.enable:
            return False
        app = self._app_state()
        info = self.manager.resume(app, step=None if step == -1 else step)
        for key, value in app.items():  # plain values were replaced; objects in place
            if key not in self._proxies:
                self.states[key] = value
        return info is not None

    def maybe_wait_for_staging(self) -> None:
        """Block until the last save's copy of the state is done (it is by the time
        ``save`` returns, unless the engine's ``staging`` is ``"overlap"``)."""
        if self.enable and self._last is not None:
            self._last.staged.result()

    def maybe_wait_for_saving(self) -> None:
        """Block until the last save is committed; raise its error if it failed."""
        if self.enable:
            self.manager.wait()

    def close(self) -> None:
        """Flush the save in flight (raising its error) and release the engine."""
        if getattr(self, "enable", False):
            self.manager.close()

    # ------------------------------------------------------------------ work

    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.load_only:
            return False
        if curr_step == 1 and self.enable_first_step_checkpoint:
            return True
        return last_step or bool(self.interval and curr_step % self.interval == 0)

    def _app_state(self) -> dict[str, Any]:
        """``states`` as the engine saves it: None values left out, an optimizer
        container through its own ``state_dict``."""
        return {k: self._proxies.get(k, v) for k, v in self.states.items() if v is not None}


def torchtitan_block(config: Any) -> dict[str, Any]:
    """torchtitan's checkpoint config (its dataclass, any object with its attributes, or
    a mapping of its keys) as a ``checkpoint:`` block, with torchtitan's defaults."""
    if isinstance(config, Mapping):
        block = dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        block = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        raise TypeError(
            f"config must be torchtitan's checkpoint config or a dict of its keys, got "
            f"{type(config).__name__}"
        )
    return with_torchtitan_defaults(block)


def _merge(block: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` win over the keys of ``block`` that set the same field."""
    taken = {KEY_ALIASES.get(k, k) for k in options}
    kept = {k: v for k, v in block.items() if KEY_ALIASES.get(k, k) not in taken}
    return {**kept, **options}


def _one_module(model_parts: list[nn.Module] | nn.Module) -> nn.Module:
    if isinstance(model_parts, nn.Module):
        return model_parts
    parts = list(model_parts)
    if len(parts) != 1 or not isinstance(parts[0], nn.Module):
        raise ValueError(
            f"model_parts must be one nn.Module, got {len(parts)} parts: several model "
            "chunks per rank (pipeline parallelism) are not supported by this adapter"
        )
    return parts[0]


class _OwnStateDict:
    """An optimizer container saved through its own ``state_dict``/``load_state_dict``
    (torchtitan's ``OptimizersContainer`` flattens its optimizers' states by parameter
    name), not as one ``torch.optim.Optimizer`` of a module."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> dict[str, Any]:
        return dict(self.target.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.target.load_state_dict(state_dict)


def _own_state_dict(optimizers: Any) -> Any:
    """A plain ``torch.optim.Optimizer`` goes to the engine as it is (keyed by parameter
    name through the model); a container, or a subclass with its own ``state_dict``,
    through ``_OwnStateDict``."""
    if type(optimizers).state_dict is torch.optim.Optimizer.state_dict:
        return optimizers
    return _OwnStateDict(optimizers)


__all__ = ["CheckpointManager", "torchtitan_block"]
