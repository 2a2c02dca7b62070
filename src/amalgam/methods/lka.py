"""Layer-wise knowledge amalgamation (Shen et al., "Amalgamating Knowledge towards
Comprehensive Classification", AAAI 2019).

At each stage l the teachers' maps (resized to the student's map size) are concatenated and
compressed by a learned encoder (a 1x1 convolution) into an amalgamated map a^l with the
student's width; one decoder per teacher must reconstruct that teacher's map from a^l, and the
student's map at that stage learns a^l (held fixed for that term, so the encoder is shaped by
the teachers' reconstruction alone); the student also imitates the soft targets:

    a^l = E_l( [resize(f_1^l), ..., resize(f_N^l)] )
    L = w_kd * KD + w_amal * sum_l MSE( f_s^l, sg(a^l) )
                  + w_rec * sum_l sum_i MSE( D_il(a^l), resize(f_i^l) )     (sg: stop-gradient).
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
from amalgam.methods.hint import check_levels
from amalgam.targets import TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs


class AmalgamationBlock(nn.Module):
    """The encoder of the concatenated teacher maps into the student's width, and one decoder
    back to each teacher."""

    def __init__(self, student_channels: int, teacher_channels: Sequence[int]) -> None:
        super().__init__()
        self.encoder = MapConv(sum(teacher_channels), student_channels, 1)
        self.decoders = nn.ModuleList(MapConv(student_channels, c, 1) for c in teacher_channels)

    def forward(self, fts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        a = self.encoder(torch.cat([f.float() for f in fts], dim=1))
        return a, [d(a) for d in self.decoders]


class LKA(Method):
    terms = ("kd", "amal", "rec")
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
        weights = weights or {"kd": 1.0, "amal": 1.0, "rec": 1.0}
        super().__init__(space, student_shapes, teacher_shapes, weights, targets)
        if resize not in RESIZE_RULES:
            raise ConfigError(f"method.resize='{resize}': choose one of {RESIZE_RULES}")
        self.temperature = float(temperature)
        self.resize_rule = resize
        names = check_levels("lka", student_shapes, teacher_shapes)
        self.blocks = nn.ModuleList(
            AmalgamationBlock(s[0], [teacher_shapes[n][lvl][0] for n in names])
            for lvl, s in enumerate(student_shapes)
        )

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        w = self.weights
        q = self.targets(teachers.logits, self.temperature, teachers.features)
        terms = {"kd": w.get("kd", 0.0) * soft_cross_entropy(student.logits, q, self.temperature)}
        if not (self.active("amal") or self.active("rec")):
            return terms
        amal = student.logits.new_zeros((), dtype=torch.float32)
        rec = student.logits.new_zeros((), dtype=torch.float32)
        for lvl, block in enumerate(self.blocks):
            fs = student.features[lvl]
            size = tuple(fs.shape[-2:])
            fts = [resize(f[lvl].float(), size, self.resize_rule) for f in teachers.features]
            a, recs = block(fts)
            amal = amal + reconstruction_loss(fs, a.detach())
            for r, ft in zip(recs, fts, strict=True):
                rec = rec + reconstruction_loss(r, ft)
        if self.active("amal"):
            terms["amal"] = w["amal"] * amal
        if self.active("rec"):
            terms["rec"] = w["rec"] * rec
        return terms
