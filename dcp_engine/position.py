"""Where a training loop is: what ``on_train_start`` returns (``TrainStart``), the loop
position kept in every checkpoint's marker (``extra["trainer"]``), and what to tell a
loop whose step count went wrong after a resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .index import CheckpointInfo

log = logging.getLogger(__name__)

LOOP_KEY = "trainer"  # in CheckpointInfo.extra: where the loop was (Dream Trainer's name)


@dataclass(frozen=True)
class TrainStart:
    """Where the loop starts: ``step`` steps are done (the global step; the next one to
    run is ``step + 1`` when counting from 1), ``epoch`` is the epoch to run, and
    ``batches_done`` of its steps were done already (0 unless resumed inside an epoch).

    A resumed loop counts its steps from ``step``, and must not run again the batches
    done: a ``ResumableDistributedSampler`` or a torchdata ``StatefulDataLoader`` in
    ``app_state`` skips them by itself; with another data loader, skip
    ``batches_done`` batches (one per step; times the accumulation steps with gradient
    accumulation) of epoch ``epoch``."""

    step: int
    epoch: int
    resumed_from: CheckpointInfo | None = None
    batches_done: int = 0


def loop_position(step: int, epoch: int, epoch_done: bool, batches_done: int = 0) -> dict[str, Any]:
    """``extra["trainer"]`` of a checkpoint: ``step`` steps done, ``batches_done`` of them
    in ``epoch``, and whether that epoch had ended (``on_train_start`` then goes on with
    the next)."""
    return {"step": step, "epoch": epoch, "epoch_done": epoch_done, "batches_done": batches_done}


def position_of(info: CheckpointInfo) -> tuple[int, int, bool, int]:
    """Steps done, epoch, whether it had ended, and steps done in it, from the marker (a
    checkpoint saved without the callbacks: its step and epoch, no step of it known)."""
    loop = info.extra.get(LOOP_KEY)
    if isinstance(loop, dict) and {"step", "epoch", "epoch_done"} <= set(loop):
        step, epoch, ended = int(loop["step"]), int(loop["epoch"]), bool(loop["epoch_done"])
        if ended:
            return step, epoch, True, 0
        if "batches_done" in loop:
            return step, epoch, False, min(int(loop["batches_done"]), step)
    else:
        step, epoch = info.step, info.epoch or 0
    log.warning(
        "%s does not record how many steps of epoch %d were done: TrainStart.batches_done "
        "is 0 (an epoch-aware sampler in app_state still knows its own position)",
        info.path,
        epoch,
    )
    return step, epoch, False, 0


def timeline_hint(start: TrainStart | None, resume: str | None, step: int) -> str:
    """Why a loop saves a step at or below the newest committed one, most often."""
    if start is None or start.resumed_from is None:
        return (
            f"this run started fresh (resume={resume!r}) in an experiment that already has "
            "checkpoints: resume='latest' continues it, a new experiment_name starts another"
        )
    if step > start.step:  # counted on from the resume: the resume was of an older step
        return (
            f"this run resumed at step {start.step} ({start.resumed_from.path}), older than "
            "the experiment's newest checkpoint (resume_step): saves go only above the "
            f"newest; to go on from step {start.step}, branch from it "
            f"(resume={str(start.resumed_from.path)!r}: a new experiment)"
        )
    return (
        f"this run resumed at step {start.step} (epoch {start.epoch}, "
        f"{start.batches_done} batches of it done) but the loop is at step {step}: "
        "count the steps from TrainStart.step (step = start.step, then step += 1), and "
        f"skip the {start.batches_done} batches done of epoch {start.epoch} (a "
        "de.ResumableDistributedSampler or a StatefulDataLoader in app_state does it)"
    )


__all__ = ["LOOP_KEY", "TrainStart", "loop_position", "position_of", "timeline_hint"]
