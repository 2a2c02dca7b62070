"""Unifying Heterogeneous Classifiers (Vongkulbhisal et al., CVPR 2019), cross-entropy form.

No soft target over the union: for each teacher i, the student's distribution over the union,
renormalised over teacher i's classes C_i, is matched to teacher i's own distribution,

    L = T^2 * sum_i  mean_x  CE( softmax(z_i / T),  softmax(s[C_i] / T) ),

where s[C_i] are the student's logits at the union positions of C_i (renormalising the union
softmax over C_i is the softmax of those logits). Overlapping class sets need no rule: a class
two teachers share simply appears in both terms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from amalgam.backbone import ModelOutput
from amalgam.losses import soft_target_loss
from amalgam.methods.base import Method
from amalgam.targets import TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs


class UHC(Method):
    """The configured target rule is not used by the loss (the run's teacher-ensemble row is
    still reported under it, so a sweep's tables compare like with like)."""

    terms = ("uhc",)

    def __init__(
        self,
        space: LabelSpace,
        student_shapes=(),
        teacher_shapes=None,
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        targets: TargetRule | None = None,
    ) -> None:
        super().__init__(space, student_shapes, teacher_shapes, weights or {"uhc": 1.0}, targets)
        self.temperature = float(temperature)
        for i, name in enumerate(space.names):
            idx = torch.tensor(space.indices(name), dtype=torch.long)
            self.register_buffer(f"classes_{i}", idx, persistent=False)

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        s = student.logits
        total = s.new_zeros((), dtype=torch.float32)
        for i, z in enumerate(teachers.logits):
            own = s.index_select(1, getattr(self, f"classes_{i}"))
            total = total + soft_target_loss(own, z, self.temperature)
        return {"uhc": self.weights.get("uhc", 0.0) * total}
