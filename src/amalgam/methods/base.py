"""The contract of an amalgamation method: learnable parts + named, weighted loss terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amalgam.backbone import ModelOutput
from amalgam.targets import Concat, TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs

Shape = tuple[int, int, int]


class Method(nn.Module):
    """Subclasses set the flags and return {term name: weighted loss} from `forward`.

    `targets` is the rule that turns the teachers' logits into soft targets over the union
    label space (amalgam.targets; default: the reference's concatenation rule).
    """

    terms: tuple[str, ...] = ()  # names of the loss terms (keys of `weights`)
    uses_labels: bool = False
    uses_teachers: bool = True
    needs_features: bool = False

    def __init__(
        self,
        space: LabelSpace,
        student_shapes: Sequence[Shape] = (),
        teacher_shapes: Mapping[str, Sequence[Shape]] | None = None,
        weights: Mapping[str, float] | None = None,
        targets: TargetRule | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.weights = {k: float(v) for k, v in (weights or {}).items()}
        self.targets = targets if targets is not None else Concat(space)

    @property
    def needs_teacher_features(self) -> bool:
        """Teachers' feature maps are needed by the method itself or by its target rule."""
        return self.needs_features or bool(getattr(self.targets, "needs_features", False))

    def active(self, term: str) -> bool:
        return self.weights.get(term, 0.0) != 0.0

    def forward(
        self,
        student: ModelOutput,
        teachers: TeacherOutputs | None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
