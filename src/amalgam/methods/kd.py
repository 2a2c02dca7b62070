"""Knowledge distillation from the teachers' concatenated soft targets (the KD baseline)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from amalgam.backbone import ModelOutput
from amalgam.losses import soft_cross_entropy
from amalgam.methods.base import Method
from amalgam.targets import TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs


class KD(Method):
    terms = ("kd",)

    def __init__(
        self,
        space: LabelSpace,
        student_shapes=(),
        teacher_shapes=None,
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        targets: TargetRule | None = None,
    ) -> None:
        super().__init__(space, student_shapes, teacher_shapes, weights or {"kd": 1.0}, targets)
        self.temperature = float(temperature)

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        q = self.targets(teachers.logits, self.temperature, teachers.features)
        return {"kd": self.weights["kd"] * soft_cross_entropy(student.logits, q, self.temperature)}
