"""The DINO loss: cross-entropy between the centred, sharpened teacher on the global
crops and the student on every other crop; the centre is an EMA of the teacher's output,
averaged over all ranks.

The ``center`` buffer is training state: a run resumed without it computes another loss
(``dino-checkpointing.md``, "Why save the loss center?"). It is a persistent buffer, so a
checkpoint of this module holds it (``dino_loss.center``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # the teacher temperature rises linearly over the warm-up, then stays
        warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        rest = np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp
        self.teacher_temp_schedule = np.concatenate((warm, rest))

    def teacher_temp(self, epoch: int) -> float:
        schedule = self.teacher_temp_schedule
        return float(schedule[min(epoch, len(schedule) - 1)])

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp(epoch)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = student_output.new_zeros(()), 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue  # the student never predicts the teacher's own view
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        self.update_center(teacher_output)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher output's mean over the global batch (all ranks)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
