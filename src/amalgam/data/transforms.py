"""timm-style preprocessing of image files: resize + centre crop for evaluation, timm's training
augmentation (RandomResizedCrop + flip, optionally colour jitter, AutoAugment/RandAugment,
random erasing) for the student, and replayable RandomResizedCrop views for the teacher cache.

Images leave here as float [C, S, S] in [0, 1], never normalised: every network normalises for
itself (`amalgam.backbone.Backbone`), so teachers and student see one and the same view of an
image (consistent teaching) whatever their mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from amalgam.errors import ConfigError

MODES = ("square", "timm")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
# what can be replayed exactly from a stored seed: the crop box and the flip
REPLAYABLE = ("scale", "ratio", "hflip", "interpolation")


@dataclass(frozen=True)
class Preprocess:
    """How files become model inputs.

    `mode`: `square` squashes every image to S x S (the small-image benchmarks; training
    augmentation is a reflect-pad crop + flip on the batch); `timm` follows timm's data config:
    evaluation resizes the shorter side to S / crop_pct and crops the centre S x S, training
    draws a RandomResizedCrop(S, scale, ratio) + flip (timm's `create_transform`).
    None values are filled from the student's timm data config (`with_data_config`).
    """

    mode: str = "square"
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float | None = None
    auto_augment: str | None = None
    re_prob: float = 0.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Preprocess | None) -> Preprocess:
        if cfg is None:
            return cls()
        if isinstance(cfg, Preprocess):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"data.preprocess: unknown keys {unknown}; the keys are {sorted(known)}"
            )
        given = dict(cfg)
        for k in ("scale", "ratio"):
            if k in given and given[k] is not None:
                given[k] = tuple(float(v) for v in given[k])
        out = cls(**{k: v for k, v in given.items() if v is not None or k in _NULLABLE})
        out.check()
        return out

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"data.preprocess.mode must be one of {MODES}, got {self.mode!r}: 'timm' resizes "
                "and centre-crops like timm (224 px photos), 'square' squashes (small images)"
            )
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"data.preprocess.interpolation must be one of {INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(
                f"data.preprocess.crop_pct must be in (0, 1], got {self.crop_pct!r} "
                "(timm's default is 0.875: resize to S / 0.875, crop S)"
            )
        for k, lo in (("scale", 0.0), ("ratio", 0.0)):
            a, b = getattr(self, k)
            if not (lo < a <= b) or (k == "scale" and b > 1):
                raise ConfigError(
                    f"data.preprocess.{k} must be [min, max] with 0 < min <= max"
                    f"{' <= 1' if k == 'scale' else ''}, got {[a, b]}"
                )
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"data.preprocess.hflip is a probability, got {self.hflip!r}")
        if not 0 <= self.re_prob <= 1:
            raise ConfigError(f"data.preprocess.re_prob is a probability, got {self.re_prob!r}")

    def with_data_config(self, data_config: Mapping[str, Any]) -> Preprocess:
        """None fields taken from a timm data config (`timm.data.resolve_model_data_config`)."""
        fill = {
            "interpolation": self.interpolation or data_config.get("interpolation"),
            "crop_pct": self.crop_pct or data_config.get("crop_pct"),
            "crop_mode": self.crop_mode or data_config.get("crop_mode"),
        }
        return replace(self, **fill)

    @property
    def resolved(self) -> Preprocess:
        """timm's defaults for whatever is still None."""
        return replace(
            self,
            interpolation=self.interpolation or "bilinear",
            crop_pct=self.crop_pct or 0.875,
            crop_mode=self.crop_mode or "center",
        )

    @property
    def replayable(self) -> bool:
        """Only crop + flip: a cached view can be remade exactly from its seed."""
        return not self.color_jitter and not self.auto_augment and not self.re_prob

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self.resolved)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    # ------------------------------------------------------------------ transforms

    def eval_transform(self, size: int) -> Callable[[Any], torch.Tensor]:
        """PIL image -> float [3, size, size] in [0, 1]: resize to size / crop_pct, centre crop."""
        from timm.data import create_transform

        p = self.resolved
        return create_transform(
            size,
            is_training=False,
            interpolation=p.interpolation,
            crop_pct=p.crop_pct,
            crop_mode=p.crop_mode,
            **IDENTITY,
        )

    def train_transform(self, size: int) -> Callable[[Any], torch.Tensor]:
        """PIL image -> float [3, size, size]: timm's training augmentation, not normalised."""
        from timm.data import create_transform

        p = self.resolved
        return create_transform(
            size,
            is_training=True,
            scale=p.scale,
            ratio=p.ratio,
            hflip=p.hflip,
            color_jitter=p.color_jitter,  # None: no colour jitter (timm's own default is 0.4)
            auto_augment=p.auto_augment,
            interpolation=p.interpolation,
            re_prob=p.re_prob,
            **IDENTITY,
        )

    def view(self, image: Any, size: int, seed: int) -> torch.Tensor:
        """The training view with this seed: RandomResizedCrop + flip, remade exactly."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        p = self.resolved
        g = torch.Generator().manual_seed(int(seed))
        w, h = image.size
        top, left, ch, cw = rrc_box(h, w, p.scale, p.ratio, g)
        flip = bool(torch.rand((), generator=g) < p.hflip)
        mode = InterpolationMode(p.interpolation)
        img = TF.resized_crop(image, top, left, ch, cw, [size, size], interpolation=mode)
        if flip:
            img = TF.hflip(img)
        return TF.to_tensor(img)


# timm's `normalize=False` hands out uint8 and skips random erasing; a normalisation by mean 0 and
# std 1 gives floats in [0, 1] and keeps random erasing
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
_NULLABLE = {"interpolation", "crop_pct", "crop_mode", "color_jitter", "auto_augment"}


def rrc_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop: torchvision's algorithm (10 tries of an area
    fraction in `scale` and a log-uniform aspect ratio, then a centre crop clamped to `ratio`),
    drawn from `generator` instead of the global RNG so that a view can be replayed."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):  # the same draws, in the same order and precision, as torchvision's
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        r = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        w = round(math.sqrt(target * r))
        h = round(math.sqrt(target / r))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_seed(parts: Sequence[int]) -> int:
    """One seed from a view-table row (three int16 parts, see `seed_table`)."""
    a, b, c = (int(x) & 0xFFFF for x in parts)
    return (a << 32) | (b << 16) | c


def seed_table(n: int, views: int, seed: int) -> torch.Tensor:
    """[views, n, 3] int16 parts of a 48-bit seed per (view, image): a table the teacher cache
    stores beside its outputs (like the square mode's crop offsets) and replays."""
    g = torch.Generator().manual_seed(seed * 7_919 + 29)
    return torch.randint(-(2**15), 2**15, (views, n, 3), generator=g, dtype=torch.int64).to(
        torch.int16
    )
