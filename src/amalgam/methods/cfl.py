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
from amalgam.errors import ConfigError
from amalgam.losses import REFERENCE_SIGMAS, mmd_to_each, reconstruction_loss, soft_cross_entropy
from amalgam.methods.base import Method, Shape
from amalgam.targets import TargetRule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import TeacherOutputs

RESIZE_RULES = ("pool", "interpolate")


def centre_tap(w: torch.Tensor) -> torch.Tensor:
    """The centre tap of a (cout, cin, k, k) kernel, as a (cout, cin, 1, 1) view."""
    c = w.shape[-1] // 2
    return w[:, :, c : c + 1, c : c + 1]


class MapConv(nn.Conv2d):
    """k x k convolution (k = 1 or 3, 'same' padding) with a fast path on 1x1 maps.

    On a 1x1 map only the centre tap meets data, so it runs as a matrix product with the centre
    tap (same parameters, same outputs and gradients, 9x fewer MACs for k = 3 and none of the
    convolution kernels' set-up cost): the common-feature block on pooled or last-stage maps at
    small image sizes is a stack of matrix products.

    `point=True` declares that every input is a 1x1 map (the block knows its common size when
    it is built): the layer then holds only the centre tap, initialised from the same draw as the
    k x k kernel (same values, same scale), so its outputs and gradients are those of the k x k
    layer while its parameters, gradients and optimiser state are k^2 times smaller. A k x k
    weight in a state dict (a checkpoint of the full layer) loads as its centre tap.
    """

    def __init__(self, cin: int, cout: int, k: int = 1, bias: bool = True, point: bool = False):
        if k not in (1, 3):
            raise ValueError("MapConv supports 1x1 and 3x3 kernels")
        super().__init__(cin, cout, k, padding=k // 2, bias=bias)
        self.point = bool(point)
        if self.point and k > 1:
            self.weight = nn.Parameter(centre_tap(self.weight.detach()).clone())
            self.kernel_size, self.padding = (1, 1), (0, 0)
            self.register_load_state_dict_pre_hook(self._centre_of_full_kernel)

    @staticmethod
    def _centre_of_full_kernel(module, state_dict, prefix, *args) -> None:
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 4 and w.shape[-2:] != (1, 1):
            state_dict[prefix + "weight"] = centre_tap(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            k = self.kernel_size[0]
            # a view for 1x1 weights (no gradient scatter); the centre tap of a k x k kernel
            w = self.weight.flatten(1) if k == 1 else self.weight[:, :, k // 2, k // 2]
            return F.linear(x.flatten(1), w, self.bias)[..., None, None]
        if self.point:
            raise ValueError(
                f"MapConv(point=True) holds the centre tap only and takes 1x1 maps, got "
                f"{tuple(x.shape[-2:])}"
            )
        return super().forward(x)


def conv_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(MapConv(cin, cout, 1), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, batchnorm: bool, point: bool = False) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            MapConv(cin, cout, 3, bias=not batchnorm, point=point),
            norm(cout),
            nn.ReLU(inplace=True),
            MapConv(cout, cout, 3, bias=not batchnorm, point=point),
            norm(cout),
        )
        self.skip = nn.Identity() if cin == cout else MapConv(cin, cout, 1)

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
        self.batchnorm = batchnorm
        self.resize_rule = "pool" if pooled else resize_rule
        self.align_s = conv_act(student_shape[0], 2 * hidden)
        self.align_t = nn.ModuleList(conv_act(s[0], 2 * hidden) for s in teacher_shapes)
        # common maps of 1x1 (pooled, or last-stage maps of small images): the 3x3 layers keep
        # their centre tap only, the one that meets data (same outputs and gradients)
        point = side == 1
        self.extractor = nn.Sequential(
            ResBlock(2 * hidden, hidden, batchnorm, point),
            ResBlock(hidden, hidden, batchnorm, point),
        )
        self.dec_t = (
            nn.ModuleList(
                nn.Sequential(
                    MapConv(hidden, s[0], 3, point=point),
                    nn.ReLU(inplace=True),
                    MapConv(s[0], s[0], 1),
                )
                for s in teacher_shapes
            )
            if reconstruct
            else None
        )

    def to_common_size(self, f: torch.Tensor) -> torch.Tensor:
        """A map pooled or interpolated to the block's common spatial size."""
        return resize(f, self.size, self.resize_rule)

    def forward(self, fs: torch.Tensor, fts: Sequence[torch.Tensor]):
        """Common features of the student, of each teacher, and each teacher's reconstruction."""
        aligned = [self.align_s(self.to_common_size(fs))]
        sized = [self.to_common_size(f) for f in fts]  # what each reconstruction aims at
        aligned += [a(f) for a, f in zip(self.align_t, sized, strict=True)]
        if self.batchnorm:  # batch statistics per network, as in the reference
            hs, *hts = [self.extractor(a) for a in aligned]
        else:  # the shared extractor is per-sample: one pass over all networks' rows
            hs, *hts = self.extractor(torch.cat(aligned)).split([len(a) for a in aligned])
        recs = (
            [d(h) for d, h in zip(self.dec_t, hts, strict=True)] if self.dec_t is not None else []
        )
        return hs, hts, recs, sized


class CFL(Method):
    terms = ("kd", "mmd", "rec")
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
        teacher_weights: Mapping[str, float] | None = None,
        targets: TargetRule | None = None,
    ) -> None:
        weights = weights or {"kd": 1.0, "mmd": 10.0, "rec": 10.0}
        super().__init__(space, student_shapes, teacher_shapes, weights, targets)
        self.temperature = float(temperature)
        self.sigmas = tuple(float(s) for s in sigmas)
        names = list(teacher_shapes)
        tw = dict(teacher_weights or {})
        unknown = sorted(set(tw) - set(names))
        if unknown:
            raise ConfigError(
                f"method.teacher_weights names unknown teachers {unknown}; teachers are {names}"
            )
        # per-teacher factor on that teacher's MMD and reconstruction terms (default 1)
        self.teacher_weights = [float(tw.get(n, 1.0)) for n in names]
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
        q = self.targets(teachers.logits, self.temperature, teachers.features)
        terms = {"kd": w.get("kd", 0.0) * soft_cross_entropy(student.logits, q, self.temperature)}
        if not (self.active("mmd") or self.active("rec")):
            return terms
        mmd_sum = student.logits.new_zeros((), dtype=torch.float32)
        rec_sum = student.logits.new_zeros((), dtype=torch.float32)
        for lvl, block in enumerate(self.blocks):
            fts = [f[lvl] for f in teachers.features]
            hs, hts, recs, sized = block(student.features[lvl], fts)
            tw = self.teacher_weights
            if self.active("mmd"):
                pairs = [(w_i, ht) for w_i, ht in zip(tw, hts, strict=True) if w_i]
                dists = mmd_to_each(hs, [ht for _, ht in pairs], self.sigmas)
                for (w_i, _), d in zip(pairs, dists, strict=True):
                    mmd_sum = mmd_sum + w_i * d
            for w_i, rec, tgt in zip(tw, recs, sized, strict=False):
                if w_i:
                    rec_sum = rec_sum + w_i * reconstruction_loss(rec, tgt)
        if self.active("mmd"):
            terms["mmd"] = w["mmd"] * mmd_sum
        if self.active("rec"):
            terms["rec"] = w["rec"] * rec_sum
        return terms
