"""The ways of writing a state that the save benchmarks compare: dcp-engine's modes next
to their peers (``torch.save``, ``dcp.save``, ``dcp.async_save``) and the floors.

Every method saves the same state (``benchmarks/states.py``). ``start()`` returns when the
caller could go on (``blocking``), ``staged()`` when the state may change again, ``done()``
when the save is durable (``committed``).
"""

from __future__ import annotations

import os
import shutil
from concurrent import futures
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcp_engine as de

from .measure import save_figures
from .states import State

# ----------------------------------------------------------------------------- methods


class Method:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "peer"  # "floor", "peer" or "engine" (the plots colour by it)

    def __init__(self, state: State, root: Path) -> None:
        self.state, self.root, self.n = state, root, 0

    def start(self) -> None: ...

    def staged(self) -> None: ...

    def done(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """What to record about this method's last save (e.g. the engine's SaveStats)."""
        return {}

    def cleanup(self) -> None:
        """Every rank calls it after each save: rank 0 deletes what the save wrote."""
        dist.barrier()
        if dist.get_rank() == 0:
            for p in self.root.iterdir():
                if p.name == "engine":
                    for c in p.glob("*/checkpoints/step_*"):
                        shutil.rmtree(c)
                elif p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        dist.barrier()

    def close(self) -> None: ...


class Copy(Method):
    """T_copy: this rank's tensors copied into reused buffers (the floor of blocking)."""

    name, kind = "copy", "floor"

    def __init__(self, state: State, root: Path) -> None:
        super().__init__(state, root)
        self.src = state.tensors()
        self.dst = [torch.empty_like(t).zero_() for t in self.src]

    def start(self) -> None:
        for d, s in zip(self.dst, self.src, strict=True):
            d.copy_(s)


def fsync_write(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.numpy().data)
        f.flush()
        os.fsync(f.fileno())


class RawWrite(Method):
    """The same bytes written to one file per rank and fsynced: the storage floor."""

    name, kind = "raw_write", "floor"

    def start(self) -> None:
        d = self.root / f"raw{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        fsync_write(d / f"rank{dist.get_rank()}.bin", self.state.tensors())
        self.n += 1


class TorchSave(Method):
    """The full state gathered to rank 0, ``torch.save`` + fsync there."""

    name = "torch_save"

    def start(self) -> None:
        sd = self.state.full_state()
        if dist.get_rank() == 0:
            with open(self.root / f"full{self.n}.pt", "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        self.n += 1


class DcpSave(Method):
    """``dcp.save`` with the stock ``FileSystemWriter(sync_files=True)``."""

    name = "dcp_save"

    def start(self) -> None:
        writer = dcp.FileSystemWriter(self.root / f"dcp{self.n}", sync_files=True)
        dcp.save(self.state.dcp_state(), storage_writer=writer)
        self.n += 1


_SIDE_GROUP: dist.ProcessGroup | None = None


def side_group() -> dist.ProcessGroup:
    """A gloo group for dcp.async_save's collectives, as DCP's docs advise: on the default
    group its background collectives interleave with training's, and the run hangs (it
    does here, with FSDP2 on gloo). Collective the first time: call it on every rank
    before any method runs."""
    global _SIDE_GROUP
    if _SIDE_GROUP is None:
        _SIDE_GROUP = dist.new_group(backend="gloo")
    return _SIDE_GROUP


def stager_options() -> dict[str, bool]:
    """The ``StagingOptions`` of ``dcp_async_save_stager``: all on, except what needs an
    accelerator (pinned memory and non-blocking copies assert without one)."""
    gpu = torch.accelerator.is_available()
    return {
        "use_pinned_memory": gpu,
        "use_shared_memory": True,
        "use_async_staging": True,
        "use_non_blocking_copy": gpu,
    }


class DcpAsyncSave(Method):
    """``dcp.async_save`` as shipped: a thread writes, the default stager copies in the
    call (``checkpoint_id`` only, so DCP picks its writer, ``sync_files=True``)."""

    name = "dcp_async_save"
    stager: Any = None
    executor: Any = None

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        if self.executor is not None:
            kwargs["async_checkpointer_type"] = self.executor
        self.future = dcp.async_save(
            self.state.dcp_state(),
            checkpoint_id=self.root / f"dcpa{self.n}",
            process_group=side_group(),
            **kwargs,
        )
        self.n += 1

    def staged(self) -> None:
        if hasattr(self.future, "staging_completion"):
            self.future.staging_completion.result()

    def done(self) -> None:
        f = self.future
        (f.upload_completion if hasattr(f, "upload_completion") else f).result()

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


class DcpAsyncSaveStager(DcpAsyncSave):
    """``dcp.async_save`` with a reused ``DefaultStager`` (``stager_options()``: shared
    memory and a staging thread; its buffers are cached from the second save on)."""

    name = "dcp_async_save_stager"

    def __init__(self, state: State, root: Path) -> None:
        super().__init__(state, root)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(StagingOptions(**stager_options()))


class DcpAsyncSaveProcess(DcpAsyncSave):
    """``dcp.async_save(async_checkpointer_type=PROCESS)``: a daemon process writes (it
    lives on for the rest of the run; the first save starts it)."""

    name = "dcp_async_save_process"

    def __init__(self, state: State, root: Path) -> None:
        super().__init__(state, root)
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.executor = AsyncCheckpointerType.PROCESS


class Engine(Method):
    """dcp-engine as a run uses it: ``load()`` at start-up (a fresh run's finds nothing
    and allocates the staging buffers), then ``save``; committed: ``handle.committed``."""

    kind = "engine"
    mode: ClassVar[str] = "thread"
    staging: ClassVar[str] = "sync"
    cold: ClassVar[bool] = False

    def __init__(self, state: State, root: Path) -> None:
        super().__init__(state, root)
        cfg = de.CheckpointConfig(
            root_dir=str(root / "engine"),
            experiment_name=self.name,
            async_mode=self.mode,
            staging=self.staging,
            capture_rng=False,
        )
        self.mgr = de.CheckpointManager(cfg)
        self.handle: de.SaveHandle | None = None
        if not self.cold:
            assert self.mgr.load(state.app) is None

    def start(self) -> None:
        self.handle = self.mgr.save(self.n, self.state.app)
        self.n += 1

    def staged(self) -> None:
        # Whichever comes first: with async_mode="off" `staged` may never resolve.
        assert self.handle is not None
        either: list[futures.Future[Any]] = [self.handle.staged, self.handle.committed]
        futures.wait(either, return_when=futures.FIRST_COMPLETED)

    def done(self) -> None:
        assert self.handle is not None
        self.handle.committed.result()
        self.mgr.wait()

    def info(self) -> dict[str, Any]:
        return save_figures(self.handle)

    def close(self) -> None:
        self.mgr.close()


class EngineOff(Engine):
    name, mode = "engine_off", "off"


class EngineThread(Engine):
    name, mode = "engine_thread", "thread"


class EngineProcess(Engine):
    name, mode = "engine_process", "process"


class EngineOverlap(Engine):
    """Thread mode with overlapped staging: ``save`` returns before the copy is done."""

    name, mode, staging = "engine_overlap", "thread", "overlap"


class EngineProcessOverlap(Engine):
    name, mode, staging = "engine_process_overlap", "process", "overlap"


class EngineProcessCold(EngineProcess):
    """Process mode without the start-up ``load()``: the first save allocates the pool."""

    name, cold = "engine_process_cold", True


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        Copy,
        RawWrite,
        TorchSave,
        DcpSave,
        DcpAsyncSave,
        DcpAsyncSaveStager,
        DcpAsyncSaveProcess,
        EngineOff,
        EngineThread,
        EngineProcess,
        EngineOverlap,
        EngineProcessOverlap,
        EngineProcessCold,
    )
}
# dcp_async_save_process last: its daemon process lives on (and is sampled) to the end.
SAVE_DEFAULT = [
    "copy",
    "raw_write",
    "torch_save",
    "dcp_save",
    "dcp_async_save",
    "dcp_async_save_stager",
    "engine_off",
    "engine_thread",
    "engine_process",
    "engine_overlap",
    "dcp_async_save_process",
]
STALL_DEFAULT = [
    "raw_write",
    "dcp_async_save",
    "dcp_async_save_stager",
    "engine_thread",
    "engine_process",
    "engine_overlap",
]
