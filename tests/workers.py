"""Rank functions run by ``tests.distributed.run_ranks`` (importable by spawned processes)."""

from __future__ import annotations

from typing import Any

import torch

import dcp_engine as de
from tests import toy


def roundtrip(
    rank: int, world_size: int, root: str, wrappers: tuple[str, ...], mode: str = "off"
) -> dict[str, Any]:
    """Save after 3 steps, load into a differently initialised state, compare, train on."""
    out: dict[str, Any] = {}
    for wrapper in wrappers:
        # A plain model is replicated: DCP writes one copy, so every rank trains it alike.
        data_rank = 0 if wrapper == "plain" else rank
        app = toy.make_app(wrapper, seed=0)
        toy.train(app, 3, data_rank)
        cfg = de.CheckpointConfig(
            root_dir=root, experiment_name=f"rt_{wrapper}_{world_size}_{mode}", async_mode=mode
        )
        with de.CheckpointManager(cfg) as mgr:
            mgr.save(3, app, epoch=0, metrics={"loss": 1.5})
            saved = toy.full_state(app)
            mgr.wait()
            info = mgr.checkpoints()[-1]
            fresh = toy.make_app(wrapper, seed=1)
            loaded_info = mgr.load(fresh)
            loaded = toy.full_state(fresh)
            assert loaded_info == info, (loaded_info, info)
            assert len(mgr.checkpoints()) == 1
        if rank == 0:
            toy.assert_equal(saved, loaded, wrapper)
        toy.assert_equal(app["center"], fresh["center"], f"{wrapper}.center rank {rank}")
        # Training goes on identically from the loaded state (optimizer step counts, moments).
        toy.train(app, 2, data_rank, start=3)
        toy.train(fresh, 2, data_rank, start=3)
        a, b = toy.full_state(app), toy.full_state(fresh)
        if rank == 0 and wrapper == "ddp":
            # DDP rebuilds its gradient buckets after a module's first iteration; the fresh
            # module's first all-reduce sums in another chunking, so only float-close here.
            torch.testing.assert_close(a["model"], b["model"], rtol=1e-5, atol=1e-7)
            toy.assert_equal(a["sched"], b["sched"], "ddp sched after 2 more steps")
        elif rank == 0:
            toy.assert_equal(a, b, f"{wrapper} after 2 more steps")
        out[wrapper] = info.bytes
    return out


def fsdp_save(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 3, rank)
    # Written by the default (process) writers, read back in-line by fsdp_load.
    with de.CheckpointManager(de.CheckpointConfig(root_dir=root, experiment_name="reshard")) as mgr:
        mgr.save(3, app, epoch=0)
    state = toy.full_state(app)
    return state if rank == 0 else None


def fsdp_load(rank: int, world_size: int, root: str) -> dict[str, Any] | None:
    app = toy.make_app("fsdp", seed=7)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="reshard", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        info = mgr.load(app)
        assert info is not None and info.step == 3
    state = toy.full_state(app)
    return state if rank == 0 else None


def collective_errors(rank: int, world_size: int, root: str) -> dict[str, str]:
    """Errors raised on every rank alike: disagreeing steps, a step saved twice, a shape
    mismatch under FSDP2 (and the model unchanged after it)."""
    msgs: dict[str, str] = {}
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 1, rank)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="errors", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        try:
            mgr.save(5 + rank, app)
        except de.CheckpointError as e:
            msgs["disagree"] = str(e)
        mgr.save(5, app)
        try:
            mgr.save(5, app)
        except de.CheckpointError as e:
            msgs["twice"] = str(e)
        wide = toy.make_app("fsdp", seed=3, hidden=32)
        before = toy.full_model_state(wide)
        try:
            mgr.load(wide)
        except de.StateMismatchError as e:
            msgs["shape"] = str(e)
        assert not wide["optim"].state, "optimizer state initialised by a failed load"
        after = toy.full_model_state(wide)
        if rank == 0:
            toy.assert_equal(before, after, "model after a failed load")
        assert [c.step for c in mgr.checkpoints()] == [5]
    return msgs


def rng_roundtrip(rank: int, world_size: int, root: str) -> list[float]:
    """Each rank's RNG is saved and restored: the draws after load equal those after save."""
    import random

    import numpy as np

    torch.manual_seed(100 + rank)
    np.random.seed(200 + rank)
    random.seed(300 + rank)
    app = {"w": torch.ones(2)}
    cfg = de.CheckpointConfig(root_dir=root, experiment_name="rng", async_mode="thread")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(1, app)
        draws = [torch.rand(1).item(), float(np.random.rand()), random.random()]
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        mgr.load(app)
        again = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    assert draws == again, (draws, again)
    return draws


def absent_rank(rank: int, world_size: int, root: str, timeout_s: float) -> dict[str, Any]:
    """Rank 1 never calls save: rank 0 must raise, naming the step, within the timeout."""
    import time

    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="absent", timeout_s=timeout_s, async_mode="off"
    )
    mgr = de.CheckpointManager(cfg)
    app = {"w": torch.ones(4)}
    mgr.save(1, app)
    if rank != 0:
        time.sleep(3 * timeout_s)  # alive but absent: a hang, not a crash
        return {}
    start = time.monotonic()
    try:
        mgr.save(2, app)
    except de.CheckpointError as e:
        return {"elapsed": time.monotonic() - start, "error": str(e)}
    raise AssertionError("save returned although rank 1 never arrived")


def snapshot_under_mutation(rank: int, world_size: int, root: str, mode: str, staging: str) -> None:
    """What is written is the state at the moment of save(), whatever training does next."""
    app = toy.make_app("fsdp", seed=0)
    toy.train(app, 2, rank)
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name=f"snap_{mode}_{staging}", async_mode=mode, staging=staging
    )
    with de.CheckpointManager(cfg) as mgr:
        at_save = toy.full_state(app)
        assert not mgr.save(2, app).skipped  # returned before the write (staged)
        if staging == "sync":
            with torch.no_grad():  # in-place mutation right after save() returns
                for p in app["model"].parameters():
                    p.mul_(-3.0).add_(1.0)
                app["center"].fill_(7.0)
        toy.train(app, 2, rank, start=2)  # optimizer steps (waits for an overlapped copy)
        mgr.wait()
        fresh = toy.make_app("fsdp", seed=5)
        assert mgr.load(fresh).step == 2
        loaded = toy.full_state(fresh)
    if rank == 0:
        toy.assert_equal(at_save, loaded, f"{mode}/{staging}")


def busy_policy(rank: int, world_size: int, root: str, policy: str) -> dict[str, Any]:
    """Rank 1's write of step 1 is held at a gate; a second save comes while it is held.
    With "skip" the gate opens after save(2) returned; with "wait" a thread opens it once
    the held write has started, and save(2) can only return after that."""
    import threading

    from tests.seams import FaultyStorage, Gate

    gate, started = Gate(f"{root}/gate_{policy}"), Gate(f"{root}/started_{policy}")
    storage = FaultyStorage(step=1, gate=gate, started=started) if rank == 1 else None
    app = {"w": torch.full((64,), float(rank)), "step": 0}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name=f"busy_{policy}", async_mode="thread", when_busy=policy
    )
    with de.CheckpointManager(cfg, storage=storage) as mgr:
        mgr.save(1, app)
        if rank == 1:
            started.wait()  # rank 1's write of step 1 is held now
        torch.distributed.barrier()  # ... on every rank's watch
        if policy == "wait" and rank == 1:
            threading.Thread(target=gate.open).start()
        handle = mgr.save(2, app)
        gate_open = gate.is_open()
        torch.distributed.barrier()  # every rank looked before the gate opens
        gate.open()
        mgr.wait()
        return {
            "steps": [c.step for c in mgr.checkpoints()],
            "skipped": [s.step for s in mgr.stats() if s.skipped],
            "handle_skipped": handle.skipped,
            "gate_open_at_return": gate_open,
        }


def writer_killed(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """SIGKILL of rank 1's writer process mid-write: every rank raises from wait() within
    the timeout; a fresh manager loads the previous checkpoint."""
    import os
    import signal
    import time

    import psutil

    from tests.seams import FaultyStorage, Gate

    started = Gate(f"{root}/writing")
    # Rank 1's writer holds its write of step 2 at a gate that never opens.
    held = FaultyStorage(step=2, gate=Gate(f"{root}/never"), started=started)
    app = {"w": torch.arange(1000, dtype=torch.float32) + rank}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="killed", async_mode="process", timeout_s=10.0
    )
    mgr = de.CheckpointManager(cfg, storage=held if rank == 1 else None)
    mgr.save(1, app)
    mgr.wait()
    mgr.save(2, app)
    if rank == 1:
        started.wait()  # the writer is in its write
        os.kill(mgr._saves._writer.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    start = time.monotonic()
    try:
        mgr.wait()
        error = None
    except de.CheckpointError as e:
        error = str(e)
    elapsed = time.monotonic() - start
    mgr.close()
    children = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    fresh = {"w": torch.zeros(1000)}
    with de.CheckpointManager(
        de.CheckpointConfig(root_dir=root, experiment_name="killed", async_mode="off")
    ) as again:
        info = again.load(fresh)
    return {
        "error": error,
        "elapsed": elapsed,
        "loaded": info.step if info else None,
        "children": [c.name() for c in children],
        "w0": fresh["w"][0].item(),
    }


def clean_close(rank: int, world_size: int, root: str, fail: bool) -> dict[str, Any]:
    """After close() (also after an exception in training) no writer process is alive and
    no shared-memory segment of ours remains."""
    import os

    import psutil

    def shm_state() -> tuple[set[str], int]:
        # Named segments (semaphores of other tests' queues aside) and our own mappings of
        # shared memory (torch's unlinked segments show as '/dev/shm/... (deleted)').
        names = {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}
        with open("/proc/self/maps") as f:
            mapped = sum("/dev/shm/" in line for line in f)
        return names, mapped

    shm_before, mapped_before = shm_state()
    app = toy.make_app("fsdp", seed=0)
    cfg = de.CheckpointConfig(root_dir=root, experiment_name=f"close_{fail}", async_mode="process")
    try:
        with de.CheckpointManager(cfg) as mgr:
            writer_pid = mgr._saves._writer.pid  # type: ignore[attr-defined]
            toy.train(app, 1, rank)
            mgr.save(1, app)
            if fail:
                raise RuntimeError("training blew up")
    except RuntimeError as e:
        assert "blew up" in str(e)
    alive = [p.pid for p in psutil.Process().children(recursive=True) if p.is_running()]
    import gc

    gc.collect()
    shm_after, mapped_after = shm_state()
    return {
        "writer_alive": writer_pid in alive,
        "new_shm": sorted(shm_after - shm_before),
        "mapped": (mapped_before, mapped_after),
    }


def retention_under_saves(rank: int, world_size: int, root: str, saves: int) -> dict[str, Any]:
    """Async saves with keep_last_n=1 on a slow disk (0.3 s a file): ``w`` holds the
    step, so a reader can tell that what it loads is what was saved."""
    from tests.seams import FaultyStorage

    app = {"w": torch.zeros(64), "step": 0}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="keep1", async_mode="thread", keep_last_n=1
    )
    with de.CheckpointManager(cfg, storage=FaultyStorage(slow_s=0.3)) as mgr:
        mgr.load(app)
        for step in range(1, saves + 1):
            app["w"].fill_(float(step))
            app["step"] = step
            mgr.save(step, app)
            app["w"].fill_(-1.0)  # training goes on mutating the state
        mgr.wait()  # on rank 0 this includes the retention that followed the last commit
        torch.distributed.barrier()
        return {"steps": [c.step for c in mgr.checkpoints()]}


def callback_run(
    rank: int, world_size: int, root: str, wrapper: str, total: int, stop_at: int
) -> dict[str, Any]:
    """A callback-driven loop on FSDP2/DDP with writer processes: ``stop_at`` steps, a
    clean stop (no train-end save), then a second callback resumes (``resume="latest"``)
    up to ``total``. Rank 1's clock runs 10x fast: the seconds trigger is rank 0's, so
    both ranks save the same steps. Returns the final state and what each run saved."""
    import dataclasses

    base = de.CheckpointConfig(
        root_dir=root, experiment_name=f"cb_{wrapper}", async_mode="process",
        save_every_n_steps=3, save_every_n_seconds=1000.0, keep_last_n=2,
        save_on_train_end=False, fsync=False,
    )  # fmt: skip
    now = [0.0]

    def clock() -> float:
        return now[0] * (10 if rank == 1 else 1)

    saved: list[list[int]] = []
    starts = []
    for cfg, until in ((base, stop_at), (dataclasses.replace(base, resume="latest"), total)):
        app = toy.make_app(wrapper, seed=0)
        cb = de.CheckpointCallback(cfg, clock=clock)
        start = cb.on_train_start(app)
        starts.append((start.step, start.epoch))
        mine = []
        for step in range(start.step + 1, until + 1):
            toy.train(app, 1, rank, start=step - 1)
            now[0] += 500.0  # rank 1 sees 5000 s per step: it alone would save every step
            if cb.on_step_end(step, app):
                mine.append(step)
        assert cb.manager is not None
        cb.manager.wait()
        kept = [c.step for c in cb.manager.checkpoints()]
        cb.close()
        saved.append(mine)
    return {"starts": starts, "saved": saved, "kept": kept, "state": toy.full_state(app)}


def teacher_student_experiment(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """3 checkpoints of a 2-rank FSDP2 DINO-like state (student, teacher, optimizer,
    centre) with val_loss 0.5, 0.3, 0.4; the teacher's full state at each step (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    student = toy.wrap(toy.make_model(1), "fsdp")
    teacher = toy.wrap(toy.make_model(2), "fsdp")
    optim = torch.optim.AdamW(student.parameters(), lr=1e-2)
    app = {"student": student, "teacher": teacher, "optim": optim, "center": torch.zeros(4)}
    cfg = de.CheckpointConfig(
        root_dir=root, experiment_name="dino", async_mode="thread", monitor="val_loss"
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    teachers = {}
    with de.CheckpointManager(cfg) as mgr:
        for step, loss in ((1, 0.5), (2, 0.3), (3, 0.4)):
            toy.train({"model": student, "optim": optim, "sched": _NoSched(),
                       "center": app["center"]}, 1, rank, start=step)  # fmt: skip
            with torch.no_grad():
                for p in teacher.parameters():
                    p.mul_(0.5).add_(float(step))
            mgr.save(step, app, epoch=0, metrics={"val_loss": loss})
            full = get_model_state_dict(teacher, options=options)
            teachers[step] = {k: v.clone() for k, v in full.items()}
        mgr.wait()
    return {"teachers": teachers if rank == 0 else None}


class _NoSched:
    def step(self) -> None:
        pass
