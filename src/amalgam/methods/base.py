"""The contract of an amalgamation method: learnable parts + named, weighted loss terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amalgam.backbone import ModelOutput
from amalgam.tasks import ConfigError, LabelSpace
from amalgam.teachers.bank import TeacherOutputs

Shape = tuple[int, int, int]


def concat_teacher_logits(logits: Sequence[torch.Tensor], space: LabelSpace) -> torch.Tensor:
    """Teacher logits laid out over the union label space (teacher order = union order)."""
    if not space.disjoint:
        raise ConfigError(
            "teachers with overlapping class sets are not supported by the soft-target rule "
            f"yet (tasks {space.as_dict()}); make the class sets disjoint"
        )
    return torch.cat(list(logits), dim=1)


class Method(nn.Module):
    """Subclasses set the flags and return {term name: weighted loss} from `forward`."""

    uses_labels: bool = False
    uses_teachers: bool = True
    needs_features: bool = False

    def __init__(
        self,
        space: LabelSpace,
        student_shapes: Sequence[Shape] = (),
        teacher_shapes: Mapping[str, Sequence[Shape]] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.weights = {k: float(v) for k, v in (weights or {}).items()}

    def active(self, term: str) -> bool:
        return self.weights.get(term, 0.0) != 0.0

    def forward(
        self,
        student: ModelOutput,
        teachers: TeacherOutputs | None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
