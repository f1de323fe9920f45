"""The checkpoint file names of the guides our users come from, and what each names in an
experiment of ours. Users type them where a checkpoint path goes (``resume``,
``load_weights``, ``open_checkpoint``, the CLI); ``resolve.follow`` maps one to our alias
or step only when no file of that name exists. Parsed with ``re.fullmatch``.

    checkpoint_latest.pth, latest.pt, ckpt_latest.pth   the ``latest`` alias
    checkpoint_best.pth, best.pt, ckpt_best.pth         the ``best`` alias
    checkpoint_epoch_0050.pth (DINO)                    the end of epoch 50 as saved
                                                        (``save_checkpoint(epoch=50)``)
    epoch_0010.pt (experiment config), ckpt_epoch_10.pth (SuperGradients)
                                                        the end of the 10th epoch (index 9)
    checkpoint_step_10000 (Dream Trainer)               step 10000

``.pt`` and ``.pth`` are interchangeable. Epochs are the marker's (0-based, as the
callbacks and ``save_checkpoint`` record them); the guides that count epochs done (SG's
``save_ckpt_epoch_list``, the experiment config's ``save_frequency``) name the N-th
epoch's end ``_N``, DINO names it by the epoch it saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXT = r"\.(?:pt|pth)"
_ALIAS_RE = re.compile(rf"(?:checkpoint_|ckpt_)?(latest|best){_EXT}")
_EPOCH_AS_SAVED_RE = re.compile(rf"checkpoint_epoch_(\d+){_EXT}")
_EPOCHS_DONE_RE = re.compile(rf"(?:ckpt_)?epoch_(\d+){_EXT}")
_STEP_RE = re.compile(rf"checkpoint_step_(\d+)(?:{_EXT})?")


@dataclass(frozen=True)
class Spelling:
    """What a guide's file name names: one of an alias, a step, or the end of an epoch."""

    alias: str | None = None
    step: int | None = None
    epoch: int | None = None
    """0-based, as markers record it."""
    counted_from_1: bool = False
    """The name counted epochs from 1 (``epoch_0010``: epoch index 9)."""

    def describe(self) -> str:
        if self.alias is not None:
            return f"the {self.alias} checkpoint"
        if self.step is not None:
            return f"step {self.step}"
        assert self.epoch is not None
        if self.counted_from_1:
            return f"the end of epoch {self.epoch + 1} (counted from 1; index {self.epoch})"
        return f"the end of epoch {self.epoch}"


def parse(name: str) -> Spelling | None:
    """The spelling ``name`` is, or None if it is none of the guides'."""
    if m := _ALIAS_RE.fullmatch(name):
        return Spelling(alias=m.group(1))
    if m := _EPOCH_AS_SAVED_RE.fullmatch(name):
        return Spelling(epoch=int(m.group(1)))
    if (m := _EPOCHS_DONE_RE.fullmatch(name)) and int(m.group(1)) >= 1:
        return Spelling(epoch=int(m.group(1)) - 1, counted_from_1=True)
    if m := _STEP_RE.fullmatch(name):
        return Spelling(step=int(m.group(1)))
    return None


__all__ = ["Spelling", "parse"]
