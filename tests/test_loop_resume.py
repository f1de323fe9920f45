"""The training loop (issue 16): resume inside an epoch (the resumable sampler, torchdata's
``StatefulDataLoader`` saved per rank, ``TrainStart.batches_done``, the example), metrics
reduced across ranks, the save log line, what each callback class does, preemption that
lets ``finally`` and ``atexit`` run, and a module's rebound buffer."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import dcp_engine as de
from tests.distributed import multirank

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cfg(root: Path | str, **kw: Any) -> de.CheckpointConfig:
    base = {"root_dir": str(root), "experiment_name": "exp", "async_mode": "off", "fsync": False}
    return de.CheckpointConfig(**{**base, **kw})


def tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            tensors_equal(a[k], b[k]) for k in a
        )
    return bool(a == b)


# ----------------------------------------------------------------------------- the sampler


def walk(sampler: de.ResumableDistributedSampler, n: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_the_sampler_resumes_on_the_same_or_another_world_size_with_each_sample_once(drop_last):
    """Pass: 2 ranks take 3 batches of 4; the state (alike on both ranks) says 24 samples
    of epoch 0 are consumed. Resumed on 2 ranks, each rank yields exactly what it would
    have yielded uninterrupted; on 1 or 3 ranks, the unseen samples are dealt out, every
    rank the same count, none seen twice (with ``drop_last`` fewer than the world size
    are dropped; without it, the last batch is padded)."""
    data = list(range(50))

    def sampler(world: int, rank: int) -> de.ResumableDistributedSampler:
        return de.ResumableDistributedSampler(
            data, num_replicas=world, rank=rank, seed=7, drop_last=drop_last
        )

    straight = [list(sampler(2, r)) for r in range(2)]
    before = [sampler(2, r) for r in range(2)]
    seen = [walk(s, 12) for s in before]
    assert seen == [s[:12] for s in straight]
    state = before[0].state_dict()
    assert state == before[1].state_dict() and state["consumed"] == 24 and state["epoch"] == 0
    for world in (1, 2, 3):
        rest = []
        for r in range(world):
            s = sampler(world, r)
            s.load_state_dict(state)
            s.set_epoch(0)  # the resumed loop enters the epoch it was in: the position stays
            left = len(s)
            rest.append(list(s))
            assert len(rest[-1]) == left
        assert len({len(x) for x in rest}) == 1, rest  # every rank the same number of steps
        if world == 2:
            assert rest == [s[12:] for s in straight]
        flat = [i for x in rest for i in x]
        unseen = set(data) - {i for x in seen for i in x}
        if drop_last:
            assert len(flat) == len(set(flat)) and set(flat) <= unseen
            assert len(unseen) - len(flat) < world
        else:
            assert unseen <= set(flat) and len(flat) - len(unseen) < world


def test_the_sampler_starts_the_next_epoch_afresh_and_refuses_another_data_set():
    """Pass: ``set_epoch`` of another epoch restarts at its first sample, a finished pass
    starts again when iterated anew (as ``DistributedSampler``), and a state of another
    seed or data set size is refused naming the field."""
    s = de.ResumableDistributedSampler(list(range(10)), num_replicas=1, rank=0, seed=1)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first  # a new pass, same epoch
    walk(s, 4)
    s.set_epoch(1)
    assert s.state_dict()["consumed"] == 0 and len(s) == 10 and sorted(s) == list(range(10))
    other = de.ResumableDistributedSampler(list(range(12)), num_replicas=1, rank=0, seed=1)
    with pytest.raises(ValueError, match="dataset_size"):
        other.load_state_dict(s.state_dict())
    reseeded = de.ResumableDistributedSampler(list(range(10)), num_replicas=1, rank=0, seed=2)
    with pytest.raises(ValueError, match="seed"):
        reseeded.load_state_dict(s.state_dict())
    assert isinstance(s, torch.distributed.checkpoint.stateful.Stateful)


def loop_with_sampler(root: Path, seen: list, *, stop: int | None, resume: bool) -> de.TrainStart:
    """Two epochs of 10 batches over a resumable sampler in ``app_state``; stops after step
    ``stop`` (a job's time limit: ``on_train_end`` saves where it stopped)."""
    data = torch.arange(40.0)
    sampler = de.ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    app = {"model": model, "optim": optim, "sampler": sampler}
    cb = de.CheckpointCallback(cfg(root, save_every_n_steps=3,
                                   resume="latest" if resume else None))  # fmt: skip
    start = cb.on_train_start(app)
    step = start.step
    for epoch in range(start.epoch, 2):
        sampler.set_epoch(epoch)
        for batch in loader:
            seen.append(batch.tolist())
            optim.zero_grad()
            model(batch).pow(2).sum().backward()
            optim.step()
            step += 1
            cb.on_step_end(step, app)
            if step == stop:
                break
        if step == stop:
            break
        cb.on_epoch_end(epoch, app)
    cb.on_train_end(app)
    return start


def test_a_sampler_in_app_state_makes_a_resumed_loop_see_exactly_the_batches_it_has_not_seen(
    tmp_path,
):
    """Pass: a run stopped after step 13 (batch 3 of epoch 1) resumes with
    ``TrainStart(step=13, epoch=1, batches_done=3)`` and sees exactly the 7 batches left:
    both runs together saw what an uninterrupted run sees."""
    straight: list = []
    loop_with_sampler(tmp_path / "straight", straight, stop=None, resume=False)
    first: list = []
    loop_with_sampler(tmp_path / "cut", first, stop=13, resume=False)
    second: list = []
    start = loop_with_sampler(tmp_path / "cut", second, stop=None, resume=True)
    assert (start.step, start.epoch, start.batches_done) == (13, 1, 3)
    assert first + second == straight and len(straight) == 20


# ----------------------------------------------------------------------------- per rank


class Position:
    """A per-rank Stateful (a data stream of this rank alone)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def state_dict(self) -> dict[str, int]:
        return {"at": self.at}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.at = sd["at"]


def make_loader() -> Any:
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(64))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1)
    return StatefulDataLoader(data, batch_size=4, sampler=sampler)


@multirank(2)
def loaders_per_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Rank r is 2 + r batches into its StatefulDataLoader when step 1 is saved; a fresh
    loader resumed from it yields the rest of that rank's epoch."""
    c = cfg(root, async_mode="thread")
    loader = make_loader()
    it = iter(loader)
    for _ in range(2 + rank):
        next(it)
    app = {"loader": loader, "position": de.PerRank(Position(100 + rank)), "w": torch.ones(3)}
    with de.CheckpointManager(c) as mgr:
        mgr.save(1, app)
    expected = [b.tolist() for b in it]
    fresh = {"loader": make_loader(), "position": de.PerRank(Position(-1)), "w": torch.zeros(3)}
    with de.CheckpointManager(dataclasses.replace(c, resume="latest")) as mgr:
        mgr.resume(fresh)
    got = [b.tolist() for b in fresh["loader"]]
    return {"same": got == expected, "left": len(expected), "at": fresh["position"].value.at}


@pytest.mark.multirank
def test_a_stateful_dataloader_resumes_each_rank_at_its_own_position(tmp_path):
    """Pass: each rank's StatefulDataLoader (and a ``PerRank`` value) gets its own state
    back, though the ranks were at different positions; loading that checkpoint on
    another world size is refused naming the key and both world sizes, and the caller's
    loader is untouched."""
    out = loaders_per_rank.run(str(tmp_path))
    assert [o["same"] for o in out] == [True, True]
    assert [o["left"] for o in out] == [6, 5] and [o["at"] for o in out] == [100, 101]
    mine = {"loader": make_loader(), "position": de.PerRank(Position(-1)), "w": torch.zeros(3)}
    with (
        de.CheckpointManager(cfg(tmp_path, resume="latest")) as mgr,
        pytest.raises(de.StateMismatchError, match=r"'loader'.*2 ranks.*1"),
    ):
        mgr.load(mine)
    assert mine["position"].value.at == -1 and len(list(mine["loader"])) == 16


# ----------------------------------------------------------------------------- metrics


@multirank(2)
def two_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Metrics: rank r reports loss 1 + r at step 1 (saved) and val_loss 3 + r at the
    epoch end, under each ``metrics_reduce``. Waiting: rank 1's disk is slow, and step 2
    is saved while it still writes step 1: the figures of step 2 on each rank."""
    from tests.seams import FaultyStorage

    out: dict[str, Any] = {}
    for how in ("mean", "max", "min", "rank0", "same"):
        c = cfg(root, experiment_name=how, metrics_reduce=how, save_every_n_steps=1,
                monitor="val_loss", save_on_train_end=False)  # fmt: skip
        cb = de.CheckpointCallback(c)
        app = {"w": torch.zeros(2)}
        cb.on_train_start(app)
        try:
            cb.on_step_end(1, app, metrics={"loss": 1.0 + rank, "lr": 0.5})
            assert cb.last_save is not None
            out[how] = dict(cb.last_save.metrics)
            cb.on_validation_end({"val_loss": 3.0 + rank})
            cb.on_epoch_end(0, app)
        except de.CheckpointError as e:
            out[how] = str(e)
        cb.close()
    slow = {"storage": FaultyStorage(slow_s=0.3)} if rank == 1 else {}
    with de.CheckpointManager(cfg(root, experiment_name="wait", async_mode="thread"),
                              **slow) as mgr:  # fmt: skip
        mgr.save(1, {"w": torch.ones(1000)})
        handle = mgr.save(2, {"w": torch.ones(1000)})
        mgr.wait()
    assert handle.stats is not None
    out["stats"] = dataclasses.asdict(handle.stats) | {"blocked_s": handle.stats.blocked_s}
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("two_ranks")
    return root, two_ranks.run(str(root))


@pytest.mark.multirank
def test_metrics_that_differ_per_rank_are_reduced_or_refused_on_every_rank(two_rank_run):
    """Pass: the marker holds the mean over the ranks by default (``max``, ``min``,
    ``rank0`` on request; the epoch-end validation too), the same on every rank; with
    ``metrics_reduce="same"`` the save is refused on every rank naming the metric and
    each rank's value."""
    root, out = two_rank_run
    expected = {"mean": 1.5, "max": 2.0, "min": 1.0, "rank0": 1.0}
    expected_val = {"mean": 3.5, "max": 4.0, "min": 3.0, "rank0": 3.0}
    for how, loss in expected.items():
        assert out[0][how] == out[1][how] == {"loss": loss, "lr": 0.5}
        (info,) = de.find_checkpoints(root / how)
        assert info.metrics == {"loss": loss, "lr": 0.5, "val_loss": expected_val[how]}
    for o in out:
        assert "'loss'" in o["same"] and "1.0" in o["same"] and "2.0" in o["same"], o["same"]
    assert not list((root / "same" / "checkpoints").glob("step_*"))


@pytest.mark.multirank
def test_a_wait_for_another_ranks_previous_save_counts_as_waiting_not_staging(two_rank_run):
    """Pass: step 2 is saved while rank 1 still writes step 1 on its slow disk. The ranks
    stage in step, so the longest wait of any rank held every rank: each rank's
    ``waited_s`` is that wait, capped by how long its own ``save`` had run when the ranks
    agreed (a rank that called ``save`` a little later was held a little less), never
    counted as staging; on every rank ``blocked_s = waited_s + staged_s``. Rank 0, whose
    own disk is fast, reports the bulk of rank 1's wait: the two calls of ``save`` are
    apart by far less than the 0.3 s rank 1 waits."""
    _, out = two_rank_run
    stats = [o["stats"] for o in out]
    longest = max(s["waited_s"] for s in stats)
    assert stats[0]["waited_s"] > longest / 2
    for s in stats:
        assert 0 < s["waited_s"] <= min(longest, s["blocked_s"]) and s["staged_s"] >= 0
        assert s["blocked_s"] == s["waited_s"] + s["staged_s"]


# ----------------------------------------------------------------------------- the save log


LOG_SCRIPT = """
import logging, sys
import torch
import dcp_engine as de
from tests.seams import FaultyStorage

def run(name, slow_s=0.0, **kw):
    cfg = de.CheckpointConfig(root_dir=sys.argv[1], experiment_name=name,
                              async_mode="thread", fsync=False, **kw)
    with de.CheckpointManager(cfg, storage=FaultyStorage(slow_s=slow_s)) as mgr:
        app = {"w": torch.zeros(1000)}
        mgr.save(1, app)
        handle = mgr.save(2, app)  # while step 1 is still writing: waits for it
        mgr.wait()
    s = handle.stats
    print(f"STATS {s.waited_s} {s.staged_s} {s.blocked_s}", file=sys.stderr, flush=True)

print("PHASE default", file=sys.stderr, flush=True)
run("a", slow_s=0.3)  # a slow disk: step 2 waits for step 1
print("PHASE log_saves", file=sys.stderr, flush=True)
run("b", log_saves=False)
print("PHASE level", file=sys.stderr, flush=True)
logging.getLogger("dcp_engine").setLevel(logging.WARNING)
run("c")
logging.getLogger("dcp_engine").setLevel(logging.NOTSET)
print("PHASE configured", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.INFO, format="USER %(name)s: %(message)s")
run("d")
"""


def test_the_save_line_is_printed_by_default_and_separates_waiting_from_staging(tmp_path):
    """Pass: with no logging configured, rank 0 prints one line per save (binary units,
    blocked = waited + staged, the time to commit); ``log_saves=False`` and the
    ``dcp_engine`` logger's level silence it; a program that configures logging gets it
    once, through its own handler. The second save waited for the first: its figures
    say so apart from staging."""
    script = tmp_path / "log_saves.py"
    script.write_text(LOG_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    phases = dict(re.findall(r"PHASE (\w+)\n(.*?)(?=PHASE |\Z)", proc.stderr, re.S))
    line = re.compile(
        r"\[rank=0\]\[step=(\d)\] saved [\d.]+ KiB: blocked ([\d.]+) ms \(waited ([\d.]+) ms "
        r"\+ staged ([\d.]+) ms\), committed [\d.]+ s after the call \([\d.]+ [KMG]iB/s\)"
    )
    default = line.findall(phases["default"])
    assert [s for s, *_ in default] == ["1", "2"], phases["default"]
    assert float(default[1][2]) > 0  # step 2 waited for step 1
    waited, staged, blocked = map(float, re.findall(r"STATS (\S+) (\S+) (\S+)", proc.stderr)[0])
    assert waited > 0 and blocked == waited + staged
    assert not line.search(phases["log_saves"]) and not line.search(phases["level"])
    configured = [ln for ln in phases["configured"].splitlines() if line.search(ln)]
    assert len(configured) == 2 and all(ln.startswith("USER dcp_engine") for ln in configured)


# ----------------------------------------------------------------------------- callbacks


def test_each_callback_class_does_what_its_name_says(tmp_path):
    """Pass: ``AsyncCheckpointCallback`` refuses ``async_mode="off"`` naming the fix and
    keeps an asynchronous config as it is; ``CheckpointCallback`` honours the config as
    given (asynchronous by default, ``"off"`` when asked)."""
    with pytest.raises(ValueError, match=r"async_mode='off'.*CheckpointCallback"):
        de.AsyncCheckpointCallback(cfg(tmp_path, async_mode="off"))
    assert de.AsyncCheckpointCallback(cfg(tmp_path, async_mode="thread")).config.async_mode == (
        "thread"
    )
    assert de.CheckpointCallback(de.CheckpointConfig(root_dir=str(tmp_path))).config.async_mode == (
        "process"
    )
    assert de.CheckpointCallback(cfg(tmp_path, async_mode="off")).config.async_mode == "off"


def test_a_loop_that_counts_from_zero_after_a_resume_is_told_why_the_save_is_refused(tmp_path):
    """Pass: after an in-place resume at step 2, a loop that numbers its steps from 1 again
    gets a timeline error at its first step end (before it trains anything twice), with a
    hint: the step committed, where the loop resumed, and to count from
    ``TrainStart.step`` and skip the batches done. A save of a committed step that the
    manager refuses gets the same hint."""
    c = cfg(tmp_path, save_every_n_steps=2, save_every_n_epochs=1)
    app = {"w": torch.zeros(2)}
    cb = de.CheckpointCallback(c)
    cb.on_train_start(app)
    for step in (1, 2):
        cb.on_step_end(step, app)
    cb.on_train_end(app)
    cb = de.CheckpointCallback(dataclasses.replace(c, resume="latest"))
    start = cb.on_train_start(app)
    assert (start.step, start.batches_done) == (2, 2)
    with pytest.raises(de.TimelineError) as caught:
        cb.on_step_end(1, app)  # the natural loop: step = 0; step += 1
    msg = str(caught.value)
    assert "step 2 is already committed" in msg
    assert "resumed at step 2" in msg and "TrainStart.step" in msg and "2 batches" in msg
    with pytest.raises(de.TimelineError) as caught:
        cb.on_epoch_end(0, app, step=1)  # a save the manager refuses
    assert "step 2 is already committed" in str(caught.value)
    assert "TrainStart.step" in str(caught.value)
    cb.close()


def test_a_loop_resumed_at_an_older_step_is_told_to_branch(tmp_path):
    """A resume of an older step (``resume_step``) and a loop that counts on from it
    correctly: the refused save says to branch from that step, not to count again."""
    c = cfg(tmp_path, save_every_n_steps=1)
    app = {"w": torch.zeros(2)}
    cb = de.CheckpointCallback(c)
    cb.on_train_start(app)
    for step in (1, 2, 3):
        cb.on_step_end(step, app)
    cb.on_train_end(app)
    cb = de.CheckpointCallback(dataclasses.replace(c, resume="latest", resume_step=1))
    start = cb.on_train_start(app)
    assert start.step == 1
    with pytest.raises(de.TimelineError) as caught:
        cb.on_step_end(start.step + 1, app)
    msg = str(caught.value)
    assert "resumed at step 1" in msg and "branch from it" in msg and "resume=" in msg
    assert "TrainStart.step" not in msg
    cb.close()


PREEMPTED_SCRIPT = """
import atexit, os, sys
import torch
import dcp_engine as de

root, out = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").write("ran"))
cfg = de.CheckpointConfig(root_dir=root, experiment_name="pre", async_mode="thread",
                          fsync=False, save_on_sigterm=True, save_every_n_steps=1000,
                          save_on_train_end=False)
cb = de.CheckpointCallback(cfg)
app = {"w": torch.zeros(4)}
cb.on_train_start(app)
step = 0
try:
    for step in range(1, 10):
        app["w"].fill_(step)
        if step == 3:
            print("ready", flush=True)
            sys.stdin.read()  # the test sends SIGTERM, then closes our stdin
        cb.on_step_end(step, app)
    cb.on_train_end(app)
finally:
    open(os.path.join(out, "finally"), "w").write(str(step))
"""


def test_preemption_saves_then_lets_finally_and_atexit_run_and_exits_128_plus_the_signal(
    tmp_path,
):
    """Pass: a real SIGTERM during step 3 of a real process: step 3 is saved and committed,
    then the step end raises ``Preempted``; the program's ``finally`` and ``atexit`` run
    and the process exits with 143 (128 + SIGTERM)."""
    script = tmp_path / "preempted.py"
    script.write_text(textwrap.dedent(PREEMPTED_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(tmp_path)], cwd=REPO, env=ENV,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(input="", timeout=120)  # closes its stdin: step 3 ends
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (tmp_path / "finally").read_text() == "3" and (tmp_path / "atexit").exists()
    assert "step 3 is committed; exiting with 143" in err
    (info,) = de.find_checkpoints(tmp_path / "pre")
    assert info.step == 3
    with de.open_checkpoint(tmp_path / "pre") as ck:
        assert torch.equal(ck.load_entries(["w"])["w"], torch.full((4,), 3.0))


# ----------------------------------------------------------------------------- DINO's centre


class Centre(torch.nn.Module):
    """As DINO's loss: ``center`` is a registered buffer that ``update`` rebinds."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, 4))

    @torch.no_grad()
    def update(self, teacher_output: torch.Tensor) -> None:
        self.center = self.center * 0.9 + teacher_output.mean(0, keepdim=True) * 0.1


def test_a_module_whose_buffer_is_rebound_saves_its_current_value(tmp_path):
    """Pass: passed as a module, the loss saves the centre it holds now; the tensor taken
    from it before training (the README's old ``"center": loss_fn.center``) is the
    initial zeros, as the rebinding left it behind."""
    loss = Centre()
    early = loss.center
    for _ in range(3):
        loss.update(torch.ones(2, 4))
    with de.CheckpointManager(cfg(tmp_path)) as mgr:
        mgr.save(1, {"loss": loss, "center": early})
        fresh = {"loss": Centre(), "center": torch.full((1, 4), -1.0)}
        mgr.load(fresh)
    assert torch.equal(fresh["loss"].center, loss.center) and loss.center.sum() > 0
    assert torch.equal(fresh["center"], torch.zeros(1, 4))


# ----------------------------------------------------------------------------- the example

EXAMPLE_CONFIG = """
checkpoint:
  dir: {root}
  experiment_name: {name}
  save_every_n_steps: 5
  save_frequency: 1
  monitor: val_loss
  async_mode: thread
  fsync: false
  resume: latest
"""


def run_example(tmp_path: Path, name: str, *extra: str) -> str:
    config = tmp_path / f"{name}.yaml"
    config.write_text(EXAMPLE_CONFIG.format(root=tmp_path, name=name))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch/examples/custom_loop.py"), str(config), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_the_custom_loop_example_resumed_mid_epoch_ends_where_an_uninterrupted_run_does(
    tmp_path,
):
    """Pass: ``launch/examples/custom_loop.py`` on 2 ranks, stopped after step 5 and run
    again, ends at step 20 like an uninterrupted run, with the same model and optimizer
    values at step 20, bit for bit."""
    assert "step 20" in run_example(tmp_path, "straight")
    assert "step 5" in run_example(tmp_path, "cut", "--max-steps", "5")
    assert "step 20" in run_example(tmp_path, "cut")
    steps = {c.step for c in de.find_checkpoints(tmp_path / "cut")}
    assert 5 in steps and max(steps) == 20
    values = []
    for name in ("straight", "cut"):
        with de.open_checkpoint(tmp_path / name, which=20) as ck:
            values.append(ck.load_entries(["model", "optim"]))
    assert tensors_equal(values[0], values[1])
