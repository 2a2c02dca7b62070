"""N frozen teachers behind one call, and the union label space they define."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amalgam.backbone import Backbone, ModelOutput
from amalgam.tasks import ConfigError, LabelSpace
from amalgam.teachers.io import TeacherMeta, build_teacher, module_hash, resolve_meta


@dataclass
class TeacherOutputs:
    """Per teacher (in bank order): logits over its own classes and its feature maps."""

    logits: list[torch.Tensor]
    features: list[list[torch.Tensor]]


class TeacherBank(nn.Module):
    """Frozen teachers, each with its own preprocessing and class list. Never trained."""

    def __init__(
        self,
        teachers: Mapping[str, Backbone],
        metas: Mapping[str, TeacherMeta],
        paths: Mapping[str, str],
    ) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("the teacher set is empty: name at least one teacher in teacher_set")
        self.teachers = nn.ModuleDict(dict(teachers))
        self.metas = dict(metas)
        self.paths = dict(paths)
        self.space = LabelSpace.from_mapping({n: m.classes for n, m in self.metas.items()})
        self.requires_grad_(False).eval()

    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    def train(self, mode: bool = True) -> TeacherBank:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, features: bool = True) -> TeacherOutputs:
        outs: list[ModelOutput] = [t(x, features=features) for t in self.teachers.values()]
        return TeacherOutputs([o.logits for o in outs], [o.features for o in outs])

    def hashes(self) -> dict[str, str]:
        return {n: module_hash(t.model) for n, t in self.teachers.items()}

    def record(self) -> dict[str, Any]:
        """What a student checkpoint keeps instead of teacher tensors."""
        return {n: {"path": self.paths[n], "meta": asdict(self.metas[n])} for n in self.names}


def teacher_weights(name: str, cfg: Mapping[str, Any]) -> str:
    """The teacher's weights path from its config entry; refuses a missing one with the fix."""
    weights = cfg.get("weights")
    if not weights or not Path(weights).is_file():
        raise ConfigError(
            f"teacher '{name}': weights file '{weights}' not found. Train it with "
            f"`python -m amalgam.train_teacher teacher={name}` (or `make teachers`), "
            f"or set teacher_set.{name}.weights to an existing file"
        )
    return str(weights)


def load_teacher_bank(
    teacher_set: Mapping[str, Mapping[str, Any]], feature_indices: Sequence[int] = (-1,)
) -> TeacherBank:
    """Build the bank from `teacher_set` config entries (key = teacher/task name)."""
    teachers, metas, paths = {}, {}, {}
    for name, cfg in teacher_set.items():
        cfg = dict(cfg)
        weights = teacher_weights(name, cfg)
        meta = resolve_meta(
            name,
            weights,
            arch=cfg.get("arch"),
            classes=cfg.get("class_names"),
            in_chans=cfg.get("in_chans"),
            input_size=cfg.get("input_size"),
            mean=cfg.get("mean"),
            std=cfg.get("std"),
            model_kwargs=cfg.get("model_kwargs"),
        )
        idx = cfg.get("feature_indices", feature_indices)
        teachers[name] = build_teacher(meta, weights, idx)
        metas[name] = meta
        paths[name] = str(weights)
    return TeacherBank(teachers, metas, paths)
