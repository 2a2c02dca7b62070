"""Common Feature Learning (Luo et al., IJCAI 2019): a shared common space for all networks.

Student and teacher feature maps are aligned (1x1 conv) and passed through ONE shared extractor;
the student's common features are pulled towards each teacher's by MMD, each teacher's common
features must reconstruct that teacher's map, and the student imitates the soft targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amalgam.backbone import ModelOutput
from amalgam.losses import REFERENCE_SIGMAS, mmd, reconstruction_loss, soft_target_loss
from amalgam.methods.base import Method, Shape, concat_teacher_logits
from amalgam.tasks import ConfigError, LabelSpace
from amalgam.teachers.bank import TeacherOutputs

RESIZE_RULES = ("pool", "interpolate")


def conv_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))


class Conv3x3(nn.Conv2d):
    """3x3 convolution, padding 1. On 1x1 maps only the centre tap meets data, so it runs as
    the equivalent 1x1 convolution (same parameters, same outputs and gradients, 9x fewer MACs).
    """

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, batchnorm: bool) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            Conv3x3(cin, cout, bias=not batchnorm),
            norm(cout),
            nn.ReLU(inplace=True),
            Conv3x3(cout, cout, bias=not batchnorm),
            norm(cout),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def resize(x: torch.Tensor, size: tuple[int, int], rule: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if rule == "pool":
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CommonFeatureBlock(nn.Module):
    """Per-teacher align, shared extractor, per-teacher decoder, at one common spatial size."""

    def __init__(
        self,
        student_shape: Shape,
        teacher_shapes: Sequence[Shape],
        hidden: int = 128,
        batchnorm: bool = False,
        spatial_size: int | None = None,
        resize_rule: str = "pool",
        pooled: bool = False,
        reconstruct: bool = True,
    ) -> None:
        super().__init__()
        if resize_rule not in RESIZE_RULES:
            raise ConfigError(f"method.resize='{resize_rule}': choose one of {RESIZE_RULES}")
        shapes = [student_shape, *teacher_shapes]
        if pooled:
            side = 1
        elif spatial_size:
            side = int(spatial_size)
        else:
            side = min(min(s[1], s[2]) for s in shapes)
        self.size = (side, side)
        self.resize_rule = "pool" if pooled else resize_rule
        self.align_s = conv_act(student_shape[0], 2 * hidden)
        self.align_t = nn.ModuleList(conv_act(s[0], 2 * hidden) for s in teacher_shapes)
        self.extractor = nn.Sequential(
            ResBlock(2 * hidden, hidden, batchnorm), ResBlock(hidden, hidden, batchnorm)
        )
        self.dec_t = (
            nn.ModuleList(
                nn.Sequential(
                    Conv3x3(hidden, s[0]),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(s[0], s[0], 1),
                )
                for s in teacher_shapes
            )
            if reconstruct
            else None
        )

    def fit(self, f: torch.Tensor) -> torch.Tensor:
        return resize(f, self.size, self.resize_rule)

    def forward(self, fs: torch.Tensor, fts: Sequence[torch.Tensor]):
        """Common features of the student, of each teacher, and each teacher's reconstruction."""
        hs = self.extractor(self.align_s(self.fit(fs)))
        targets = [self.fit(f) for f in fts]
        hts = [self.extractor(a(f)) for a, f in zip(self.align_t, targets, strict=True)]
        recs = (
            [d(h) for d, h in zip(self.dec_t, hts, strict=True)] if self.dec_t is not None else []
        )
        return hs, hts, recs, targets


class CFL(Method):
    needs_features = True

    def __init__(
        self,
        space: LabelSpace,
        student_shapes: Sequence[Shape],
        teacher_shapes: Mapping[str, Sequence[Shape]],
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        hidden: int = 128,
        batchnorm: bool = False,
        spatial_size: int | None = None,
        resize: str = "pool",
        pooled: bool = False,
        sigmas: Sequence[float] = REFERENCE_SIGMAS,
    ) -> None:
        weights = weights or {"kd": 1.0, "mmd": 10.0, "rec": 10.0}
        super().__init__(space, student_shapes, teacher_shapes, weights)
        self.temperature = float(temperature)
        self.sigmas = tuple(float(s) for s in sigmas)
        names = list(teacher_shapes)
        levels = len(student_shapes)
        if any(len(teacher_shapes[n]) != levels for n in names):
            raise ConfigError(
                "CFL needs as many feature levels from each teacher as from the student: "
                f"student {levels}, teachers { {n: len(teacher_shapes[n]) for n in names} }"
            )
        self.blocks = nn.ModuleList(
            CommonFeatureBlock(
                student_shapes[lvl],
                [teacher_shapes[n][lvl] for n in names],
                hidden,
                batchnorm,
                spatial_size,
                resize,
                pooled,
                reconstruct=self.active("rec"),
            )
            for lvl in range(levels)
        )

    def forward(
        self, student: ModelOutput, teachers: TeacherOutputs | None, labels=None
    ) -> dict[str, torch.Tensor]:
        w = self.weights
        target = concat_teacher_logits(teachers.logits, self.space)
        terms = {
            "kd": w.get("kd", 0.0) * soft_target_loss(student.logits, target, self.temperature)
        }
        if not (self.active("mmd") or self.active("rec")):
            return terms
        mmd_sum = student.logits.new_zeros((), dtype=torch.float32)
        rec_sum = student.logits.new_zeros((), dtype=torch.float32)
        for lvl, block in enumerate(self.blocks):
            fts = [f[lvl] for f in teachers.features]
            hs, hts, recs, targets = block(student.features[lvl], fts)
            if self.active("mmd"):
                for ht in hts:
                    mmd_sum = mmd_sum + mmd(hs, ht, self.sigmas)
            for rec, tgt in zip(recs, targets, strict=False):
                rec_sum = rec_sum + reconstruction_loss(rec, tgt)
        if self.active("mmd"):
            terms["mmd"] = w["mmd"] * mmd_sum
        if self.active("rec"):
            terms["rec"] = w["rec"] * rec_sum
        return terms
