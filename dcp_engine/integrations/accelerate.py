"""Hugging Face Accelerate on dcp-engine: ``save_state``/``load_state`` through a
``CheckpointManager``.

    from accelerate.utils import ProjectConfiguration
    from dcp_engine.integrations.accelerate import DcpEngineAccelerator

    accelerator = DcpEngineAccelerator(
        project_config=ProjectConfiguration(project_dir="runs/exp1", total_limit=3),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if accelerator.checkpoint_manager.checkpoints():
        accelerator.load_state()               # the newest committed checkpoint
    ...
    accelerator.save_state()                   # returns once staged; rank 0 commits
    accelerator.end_training()                 # waits for the last commit

``DcpEngineAccelerator`` is an ``accelerate.Accelerator`` whose ``save_state`` and
``load_state`` go through the engine: every rank writes its own shards with DCP in the
background, rank 0 commits and indexes the checkpoint, retention follows ``total_limit``.
The mapping of Accelerate's names to the engine's is in ``docs/accelerate.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

import dcp_engine as de

from ..location import is_url, same_location
from . import accelerate_state as st

log = logging.getLogger(__name__)

_OWN_FORMATS = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)


class DcpEngineAccelerator(Accelerator):
    """An ``Accelerator`` that checkpoints through dcp-engine.

    Takes every argument of ``Accelerator`` and ``checkpoint_config`` (a
    ``CheckpointConfig``; default: the engine's defaults). The experiment directory is
    ``project_dir`` (``ProjectConfiguration``, or the ``project_dir`` argument) when set,
    else ``checkpoint_config``'s ``root_dir``/``experiment_name``; checkpoints are
    ``<experiment>/checkpoints/step_<iteration>`` whether or not
    ``automatic_checkpoint_naming`` is on. ``total_limit`` is the engine's ``keep_last_n``.
    The manager is created here (collective: every process constructs the accelerator)
    and takes the experiment's lease; ``end_training`` closes it.
    """

    def __init__(
        self, *args: Any, checkpoint_config: de.CheckpointConfig | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.distributed_type in _OWN_FORMATS:
            raise ValueError(
                f"DcpEngineAccelerator does not support distributed_type={self.distributed_type}: "
                "it keeps its own checkpoint format; use accelerate.Accelerator's save_state"
            )
        if kwargs.get("fsdp_plugin") is not None and self.distributed_type != DistributedType.FSDP:
            log.warning(
                "fsdp_plugin was given but Accelerate chose distributed_type=%s (it applies "
                "FSDP on accelerator devices only, never with cpu=True): models are not sharded",
                self.distributed_type,
            )
        config = engine_config(self.project_configuration, checkpoint_config)
        self._checkpoint_manager = de.CheckpointManager(config)

    # ------------------------------------------------------------------ public

    @property
    def checkpoint_manager(self) -> de.CheckpointManager:
        """The engine's manager: ``checkpoints()``, ``wait()``, ``stats()``..."""
        return self._checkpoint_manager

    def save_state(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        safe_serialization: bool = True,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        **save_model_func_kwargs: Any,
    ) -> de.SaveHandle:
        """Save models, optimizers, schedulers, dataloader positions, the scaler, the RNG
        states, ``register_for_checkpointing`` objects, ``step`` and what the save hooks
        write, as checkpoint ``step_<save_iteration>``; then ``save_iteration`` goes up
        by one. Collective.

        Returns the engine's ``SaveHandle`` once the state is staged (``handle.result()``
        waits for the commit); a background failure is raised by the next
        ``save_state``/``load_state``/``end_training``. ``output_dir``: ignored with
        ``automatic_checkpoint_naming`` (as in Accelerate); otherwise it must be None or
        the experiment directory (the engine names its checkpoints). ``epoch`` and
        ``metrics`` go into the checkpoint's marker (``monitor``, ``keep_top_k``).
        ``safe_serialization`` has no effect: tensors are never pickled.
        """
        if save_model_func_kwargs:
            raise TypeError(
                f"save_state({', '.join(sorted(save_model_func_kwargs))}=...): dcp-engine "
                "saves through torch.distributed.checkpoint and takes no save_model_func_kwargs"
            )
        self._check_output_dir(output_dir)
        mgr = self._checkpoint_manager
        step = self.save_iteration
        app_state = self._save_app_state()
        try:
            handle = mgr.save(step, app_state, epoch=epoch, metrics=metrics)
        except de.TimelineError as e:
            raise de.TimelineError(
                f"{e}; to continue this experiment call load_state() first (the next save "
                "follows the checkpoint it loads), or set ProjectConfiguration(iteration=...) "
                "above its newest step"
            ) from e
        self.project_configuration.iteration += 1
        return handle

    def load_state(
        self,
        input_dir: str | os.PathLike[str] | int | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        **load_model_func_kwargs: Any,
    ) -> de.CheckpointInfo:
        """Restore everything ``save_state`` saved, all or nothing, and set ``step`` and
        ``save_iteration`` (the checkpoint's step + 1) so that the next save follows it.

        ``input_dir``: None (or the experiment directory): the newest committed checkpoint
        that verifies; a checkpoint directory (of this experiment or another), a step, or
        ``"latest"``/``"best"``. No checkpoint: ``CheckpointNotFoundError``; a corrupt
        or mismatching one: ``IntegrityError``/``StateMismatchError``; the objects are
        untouched then. ``map_location`` is accepted and has no effect (the state loads
        in place, each tensor on its own device). Collective.
        """
        load_model_func_kwargs.pop("map_location", None)
        if load_kwargs or load_model_func_kwargs:
            given = sorted({*(load_kwargs or {}), *load_model_func_kwargs})
            raise TypeError(
                f"load_state({', '.join(given)}=...): dcp-engine loads strictly through "
                "torch.distributed.checkpoint and takes no load kwargs"
            )
        mgr = self._checkpoint_manager
        which = self._which(input_dir)
        keep = list(self._models)
        if self._load_model_state_pre_hook:
            found = mgr.verify(which)  # the hooks read its files before the load
            which = found.path
            keep = self._run_load_hooks(found)
        app_state = self._load_app_state(keep)
        info = mgr.load(app_state, which)
        if info is None:
            raise de.CheckpointNotFoundError(
                f"load_state(): no committed checkpoint in {mgr.experiment_dir}"
            )
        self.step = int(app_state[st.ACCELERATOR]["step"])
        self.project_configuration.iteration = info.step + 1
        return info

    def end_training(self) -> None:
        """Wait for the checkpoint in flight to commit (raising its error), give the
        experiment back, then end as ``Accelerator.end_training`` does."""
        try:
            self._checkpoint_manager.close()
        finally:
            super().end_training()

    # ------------------------------------------------------------------ app_state

    def _hookable(self) -> list[Any]:
        """The models the state hooks see: under FSDP none (as in Accelerate)."""
        return [] if self.distributed_type == DistributedType.FSDP else list(self._models)

    def _save_app_state(self) -> dict[str, Any]:
        models: list[Any] = list(self._models)
        files: dict[str, bytes] = {}
        if self._save_model_state_pre_hook:
            models, files = self._run_save_hooks()
        native = self._models_for_engine(models)
        fixed: dict[str, Any] = {}  # Stateful objects whose state is rank 0's
        for i, opt in enumerate(self._optimizers):
            native[st.key(st.OPTIMIZER, i)] = st.stateful_of(opt)
        for i, sched in enumerate(self._schedulers):
            fixed[st.key(st.SCHEDULER, i)] = sched
        for i, loader in enumerate(self._dataloaders):
            fixed[st.key(st.DATALOADER, i)] = st.LoaderState(loader)
        if self.scaler is not None:
            fixed[st.SCALER] = self.scaler
        for i, obj in enumerate(self._custom_objects):
            name, value = st.key(st.CUSTOM, i), st.stateful_of(obj)
            (native if st.is_engine_native(value) else fixed)[name] = value
        st.check_optimizers(native)  # before the collective: alike on every rank
        values = {k: v.state_dict() for k, v in fixed.items()}
        values[st.ACCELERATOR] = {"step": int(self.step)}
        if self._save_model_state_pre_hook:
            values[st.FILES] = files
        values = st.rank0_values(values, self._checkpoint_manager.decide)
        app_state: dict[str, Any] = dict(native)
        app_state.update((k, st.Rank0State(v, values[k])) for k, v in fixed.items())
        app_state[st.ACCELERATOR] = values[st.ACCELERATOR]
        if st.FILES in values:
            app_state[st.FILES] = values[st.FILES]
        return app_state

    def _load_app_state(self, models: list[Any]) -> dict[str, Any]:
        app_state = self._models_for_engine(models)
        for i, opt in enumerate(self._optimizers):
            app_state[st.key(st.OPTIMIZER, i)] = st.stateful_of(opt)
        for i, sched in enumerate(self._schedulers):
            app_state[st.key(st.SCHEDULER, i)] = st.Rank0State(sched)
        for i, loader in enumerate(self._dataloaders):
            app_state[st.key(st.DATALOADER, i)] = st.Rank0State(st.LoaderState(loader))
        if self.scaler is not None:
            app_state[st.SCALER] = st.Rank0State(self.scaler)
        for i, obj in enumerate(self._custom_objects):
            value = st.stateful_of(obj)
            native = st.is_engine_native(value)
            app_state[st.key(st.CUSTOM, i)] = value if native else st.Rank0State(value)
        app_state[st.ACCELERATOR] = {"step": int(self.step)}
        return app_state

    def _models_for_engine(self, kept: list[Any]) -> dict[str, Any]:
        """The models the engine saves or loads: those the hooks left it, and those whose
        parameters an optimizer steps (the engine names optimizer state through them)."""
        return {
            st.key(st.MODEL, i): model
            for i, model in enumerate(self._models)
            if any(model is m for m in kept) or st.owns_optimizer(model, self._optimizers)
        }

    # ------------------------------------------------------------------ hooks

    def _run_save_hooks(self) -> tuple[list[Any], dict[str, bytes]]:
        """Accelerate's save hooks, ``hook(models, weights, output_dir)``: a model whose
        weights a hook removes from ``weights`` is left to the hook (unless an optimizer
        steps its parameters); what the hooks write into ``output_dir`` (a private scratch
        directory) is kept in the checkpoint as ``accelerate_files``."""
        models = self._hookable()
        weights = [self.get_state_dict(m, unwrap=False) for m in models]
        handed = list(weights)
        with st.scratch_dir("save") as scratch:
            for hook in list(self._save_model_state_pre_hook.values()):
                hook(list(models), weights, scratch)
            files = st.read_files(scratch)
        kept_ids = {id(w) for w in weights}
        dropped = [m for m, w in zip(models, handed, strict=True) if id(w) not in kept_ids]
        keep = [m for m in self._models if not any(m is d for d in dropped)]
        return keep, files

    def _run_load_hooks(self, found: de.CheckpointInfo) -> list[Any]:
        """Accelerate's load hooks, ``hook(models, input_dir)``, over a scratch directory
        holding the checkpoint's ``accelerate_files``: a model a hook removes from
        ``models`` is left to the hook (unless an optimizer steps its parameters: then
        the engine loads it after the hook, with the values saved at the same moment)."""
        with de.open_checkpoint(found.path, verify=False) as ck:
            saved = ck.load_entries([st.FILES])[st.FILES] if st.FILES in ck.keys else {}
        models = self._hookable()
        handed = list(models)
        with st.scratch_dir("load") as scratch:
            st.write_files(scratch, saved)
            for hook in list(self._load_model_state_pre_hook.values()):
                hook(models, scratch)
        dropped = [m for m in handed if not any(m is k for k in models)]
        return [m for m in self._models if not any(m is d for d in dropped)]

    # ------------------------------------------------------------------ arguments

    def _check_output_dir(self, output_dir: str | os.PathLike[str] | None) -> None:
        if output_dir is None or self.project_configuration.automatic_checkpoint_naming:
            return
        exp = self._checkpoint_manager.experiment_dir
        if not same_location(output_dir, exp) and not same_location(
            output_dir, exp / "checkpoints"
        ):
            raise ValueError(
                f"save_state({os.fspath(output_dir)!r}): dcp-engine names its checkpoints "
                f"itself ({exp}/checkpoints/step_<iteration>); call save_state() (the "
                "experiment is ProjectConfiguration.project_dir, or the checkpoint_config's "
                "root_dir/experiment_name)"
            )

    def _which(self, input_dir: str | os.PathLike[str] | int | None) -> Any:
        if input_dir is None:
            return "latest"
        if isinstance(input_dir, int) or input_dir in ("latest", "best"):
            return input_dir
        if same_location(input_dir, self._checkpoint_manager.experiment_dir):
            return "latest"
        path = os.fspath(input_dir)
        return path if is_url(path) else os.path.expanduser(path)


def engine_config(project: Any, config: de.CheckpointConfig | None) -> de.CheckpointConfig:
    """The ``CheckpointConfig`` of an accelerator: ``config`` (default: the engine's
    defaults) with ``project_dir`` as the experiment directory and ``total_limit`` as
    ``keep_last_n``; a conflict between the two configurations is a ``ConfigError``."""
    config = config if config is not None else de.CheckpointConfig()
    changes: dict[str, Any] = {}
    if config.resume is not None:
        raise de.ConfigError(
            "resume", config.resume, "None with DcpEngineAccelerator (resume with load_state())"
        )
    if project.save_on_each_node:
        raise ValueError(
            "ProjectConfiguration(save_on_each_node=True): dcp-engine writes one checkpoint "
            "that every rank reaches (a shared file system or an object store)"
        )
    if project.project_dir is not None:
        root, name = _split(os.fspath(project.project_dir))
        if config.experiment_name and _join(config.root_dir, config.experiment_name) != _join(
            root, name
        ):
            raise de.ConfigError(
                "experiment_name",
                config.experiment_name,
                f"unset, or naming project_dir={project.project_dir!r} "
                f"(root_dir={config.root_dir!r} names another directory)",
            )
        changes.update(root_dir=root, experiment_name=name)
    elif not config.experiment_name:
        raise ValueError(
            "DcpEngineAccelerator needs its experiment directory: set "
            "ProjectConfiguration(project_dir=...) (or project_dir=...), or "
            "CheckpointConfig(experiment_name=...); a new default name every run would "
            "leave load_state() nothing to resume"
        )
    limit = project.total_limit
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"ProjectConfiguration.total_limit={limit!r}: expected an int >= 1")
        if config.keep_last_n is not None and config.keep_last_n != limit:
            raise de.ConfigError(
                "keep_last_n",
                config.keep_last_n,
                f"unset or equal to ProjectConfiguration.total_limit={limit}",
            )
        changes["keep_last_n"] = limit
    return replace(config, **changes) if changes else config


def _split(project_dir: str) -> tuple[str, str]:
    """``project_dir`` as (root_dir, experiment_name); local paths made absolute."""
    if is_url(project_dir):
        head, _, name = project_dir.rstrip("/").rpartition("/")
        return head, name
    root, name = os.path.split(os.path.abspath(os.path.expanduser(project_dir)))
    return root, name


def _join(root: str, name: str) -> str:
    if is_url(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.abspath(os.path.join(os.path.expanduser(root), name))


__all__ = ["DcpEngineAccelerator", "engine_config"]
