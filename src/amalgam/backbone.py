"""A timm classifier wrapped with its own input preprocessing, giving logits and feature maps."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from amalgam.tasks import ConfigError


@dataclass
class ModelOutput:
    logits: torch.Tensor
    features: list[torch.Tensor]


def check_arch(arch: str, key: str = "arch") -> None:
    """Raise a ConfigError naming close matches when `arch` is not a timm architecture."""
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ConfigError(
        f"unknown architecture '{arch}' (config key '{key}'): it is not a timm model.{hint} "
        f"List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`."
    )


def create_timm(
    arch: str, num_classes: int, in_chans: int = 3, key: str = "arch", **kwargs
) -> nn.Module:
    check_arch(arch, key)
    return timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def default_norm(model: nn.Module) -> tuple[list[float], list[float]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix of the model's classification head ('fc', 'head.fc', ...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name:
        return str(name)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for n, m in model.named_modules():
        if m is head:
            return n
    raise ConfigError(f"cannot find the classifier head of {type(model).__name__}")


class Backbone(nn.Module):
    """Normalises and resizes [0, 1] images for its model; returns logits and feature maps.

    One forward pass yields both: timm's `forward_intermediates` + `forward_head`, or
    `forward_features` + `forward_head` for modules without it.
    """

    def __init__(
        self,
        model: nn.Module,
        in_chans: int = 3,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_indices: Sequence[int] = (-1,),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.channels_last = False
        if channels_last:
            self.use_channels_last()
        self.in_chans = in_chans
        self.input_size = input_size
        dmean, dstd = default_norm(model)
        mean = list(mean) if mean is not None else dmean
        std = list(std) if std is not None else dstd
        if len(mean) != in_chans:
            mean = [sum(mean) / len(mean)] * in_chans
            std = [sum(std) / len(std)] * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.feature_indices = list(feature_indices)

    def use_channels_last(self) -> None:
        """NHWC weights, and inputs turned NHWC in `preprocess`."""
        self.channels_last = True
        self.model.to(memory_format=torch.channels_last)

    @property
    def norm(self) -> tuple[list[float], list[float]]:
        return self.mean.flatten().tolist(), self.std.flatten().tolist()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"cannot turn {c}-channel images into {self.in_chans} channels")
        size = (self.input_size, self.input_size) if self.input_size else None
        if size and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # in the input's precision
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor, features: bool = True) -> ModelOutput:
        x = self.preprocess(x)
        dtype = next(self.model.parameters()).dtype
        if x.dtype != dtype:
            x = x.to(dtype)  # a half-precision copy (a teacher bank's dtype)
        if not features or not self.feature_indices:
            return ModelOutput(self.model(x), [])
        if hasattr(self.model, "forward_intermediates"):
            final, feats = self.model.forward_intermediates(
                x, indices=self.feature_indices, output_fmt="NCHW"
            )
        else:
            final = self.model.forward_features(x)
            feats = [final]
        return ModelOutput(self.model.forward_head(final), list(feats))

    @torch.no_grad()
    def feature_shapes(self, image_size: int, channels: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each feature map for data images of the given size."""
        was_training = self.training
        self.eval()
        x = torch.zeros(2, channels, image_size, image_size, device=self.mean.device)
        out = self(x)
        self.train(was_training)
        return [tuple(f.shape[1:]) for f in out.features]
