"""Supervised upper bound: the student trained WITH LABELS on the union label space.

Not an amalgamation method: it is the reference that shows what labels would buy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amalgam.backbone import ModelOutput
from amalgam.methods.base import Method


class Scratch(Method):
    terms = ("ce",)
    uses_labels = True
    uses_teachers = False

    def __init__(
        self,
        space,
        student_shapes=(),
        teacher_shapes=None,
        weights=None,
        targets=None,
        temperature: float | None = None,
    ) -> None:
        # `temperature` is accepted and unused (no soft targets here): an experiment can then
        # set `method.temperature` once for a sweep that includes this labelled bound.
        super().__init__(space, student_shapes, teacher_shapes, weights or {"ce": 1.0}, targets)

    def forward(self, student: ModelOutput, teachers=None, labels=None) -> dict[str, torch.Tensor]:
        if labels is None:
            raise ValueError("the scratch upper bound needs labeled batches")
        return {"ce": self.weights["ce"] * F.cross_entropy(student.logits.float(), labels)}
