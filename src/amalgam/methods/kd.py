"""Knowledge distillation from the teachers' concatenated soft targets (the KD baseline)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from amalgam.backbone import ModelOutput
from amalgam.losses import soft_target_loss
from amalgam.methods.base import Method, concat_teacher_logits
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs


class KD(Method):
    def __init__(
        self,
        space: LabelSpace,
        student_shapes=(),
        teacher_shapes=None,
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(space, student_shapes, teacher_shapes, weights or {"kd": 1.0})
        self.temperature = float(temperature)

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        target = concat_teacher_logits(teachers.logits, self.space)
        return {
            "kd": self.weights["kd"] * soft_target_loss(student.logits, target, self.temperature)
        }
