"""Multi-teacher feature hints (FitNets, Romero et al., ICLR 2015): the feature-KD baseline.

At each stage l the student's map goes through one learned regressor per teacher (a 1x1
convolution to that teacher's width) and must match the teacher's map, resized to the
student's map size; the student also imitates the soft targets:

    L = w_kd * KD  +  w_hint * sum_l sum_i  MSE( r_il(f_s^l),  resize(f_i^l) ).

Trained end to end with the KD term (the one-stage form of the KD toolkits), not in FitNets'
two stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amalgam.backbone import ModelOutput
from amalgam.errors import ConfigError
from amalgam.losses import reconstruction_loss, soft_cross_entropy
from amalgam.methods.base import Method, Shape
from amalgam.methods.cfl import RESIZE_RULES, MapConv, resize
from amalgam.targets import TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs


def check_levels(method: str, student_shapes, teacher_shapes) -> list[str]:
    """The teachers' names; each must give as many feature levels as the student."""
    names = list(teacher_shapes)
    levels = len(student_shapes)
    if levels == 0 or any(len(teacher_shapes[n]) != levels for n in names):
        raise ConfigError(
            f"{method} needs as many feature levels from each teacher as from the student "
            f"(at least one): student {levels}, teachers "
            f"{ {n: len(teacher_shapes[n]) for n in names} }"
        )
    return names


class Hint(Method):
    terms = ("kd", "hint")
    needs_features = True

    def __init__(
        self,
        space: LabelSpace,
        student_shapes: Sequence[Shape],
        teacher_shapes: Mapping[str, Sequence[Shape]],
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        resize: str = "pool",
        targets: TargetRule | None = None,
    ) -> None:
        super().__init__(
            space, student_shapes, teacher_shapes, weights or {"kd": 1.0, "hint": 1.0}, targets
        )
        if resize not in RESIZE_RULES:
            raise ConfigError(f"method.resize='{resize}': choose one of {RESIZE_RULES}")
        self.temperature = float(temperature)
        self.resize_rule = resize
        names = check_levels("hint", student_shapes, teacher_shapes)
        self.regressors = nn.ModuleList(
            nn.ModuleList(MapConv(s[0], teacher_shapes[n][lvl][0], 1) for n in names)
            for lvl, s in enumerate(student_shapes)
        )

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        w = self.weights
        q = self.targets(teachers.logits, self.temperature, teachers.features)
        terms = {"kd": w.get("kd", 0.0) * soft_cross_entropy(student.logits, q, self.temperature)}
        if self.active("hint"):
            total = student.logits.new_zeros((), dtype=torch.float32)
            for lvl, regs in enumerate(self.regressors):
                fs = student.features[lvl]
                size = tuple(fs.shape[-2:])
                for reg, ft in zip(regs, teachers.features, strict=True):
                    total = total + reconstruction_loss(
                        reg(fs), resize(ft[lvl], size, self.resize_rule)
                    )
            terms["hint"] = w["hint"] * total
        return terms
