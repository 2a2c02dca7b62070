"""N frozen teachers behind one call, and the union label space they define."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amalgam.backbone import Backbone, ModelOutput, check_arch, match_stages
from amalgam.errors import ConfigError
from amalgam.tasks import LabelSpace, resolve_classes
from amalgam.teachers.io import (
    TeacherMeta,
    build_teacher,
    meta_path,
    module_hash,
    module_teacher,
    read_meta,
    resolve_meta,
    save_teacher_copy,
)
from amalgam.utils import log


@dataclass
class TeacherOutputs:
    """Per teacher (in bank order): logits over its own classes and its feature maps."""

    logits: list[torch.Tensor]
    features: list[list[torch.Tensor]]


@dataclass(eq=False)
class Teacher:
    """A trained teacher in memory: a timm classifier and the class names of its logits.

    `model`: from `timm.create_model(arch, num_classes=len(classes))`, trained; it is used as is
    (not copied) and frozen in place: eval mode, requires_grad False. `classes`: one name per
    output of its head, in logit order (names of the data's classes, or indices into them).
    `mean`/`std`: its normalisation of [0, 1] images; None: the model's timm data config (its
    `pretrained_cfg`). `input_size`: images are resized to it; None: the teacher sees the data
    module's images at the data's image_size. `feature_indices`: the maps its features come
    from; None: the student's.
    """

    model: nn.Module = field(repr=False)
    classes: Sequence[Any]
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    input_size: int | None = None
    feature_indices: Sequence[int] | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ConfigError(f"teacher_dtype='{dtype}': choose one of {list(DTYPES)}")
    return DTYPES[str(dtype)]


class TeacherBank(nn.Module):
    """Frozen teachers, each with its own preprocessing and class list. Never trained.

    `dtype` bfloat16/float16 keeps the teachers' weights in half precision (half the memory,
    faster kernels where the hardware has them); inputs are preprocessed in float32 and the
    outputs handed back in float32, so the loss terms see the usual types.
    `channels_last` runs the teachers in NHWC memory format (same weights, same hash; on the
    CPU, oneDNN's NHWC kernels are much faster, max pooling above all); their feature maps are
    handed back in that format.
    """

    def __init__(
        self,
        teachers: Mapping[str, Backbone],
        metas: Mapping[str, TeacherMeta],
        paths: Mapping[str, str],
        dtype: str | torch.dtype = "float32",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_teacher_set(teachers)
        self.teachers = nn.ModuleDict(dict(teachers))
        self.metas = dict(metas)
        self.paths = dict(paths)
        self.space = LabelSpace.from_mapping({n: m.classes for n, m in self.metas.items()})
        self.requires_grad_(False).eval()
        self.dtype = parse_dtype(dtype)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            for t in self.teachers.values():
                t.use_channels_last()
        self._cast_hashes: dict[str, str] | None = None
        if self.dtype != torch.float32:
            self.to(self.dtype)
            for t in self.teachers.values():  # preprocessing stays in float32
                t.mean, t.std = t.mean.float(), t.std.float()
            self._cast_hashes = self._module_hashes()

    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    def train(self, mode: bool = True) -> TeacherBank:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, features: bool = True) -> TeacherOutputs:
        outs: list[ModelOutput] = [t(x, features=features) for t in self.teachers.values()]
        if self.dtype != torch.float32:
            return TeacherOutputs(
                [o.logits.float() for o in outs], [[f.float() for f in o.features] for o in outs]
            )
        return TeacherOutputs([o.logits for o in outs], [o.features for o in outs])

    def _module_hashes(self) -> dict[str, str]:
        return {n: module_hash(t.model) for n, t in self.teachers.items()}

    def hashes(self) -> dict[str, str]:
        """SHA-256 of each teacher's weights as they are now (equal to the file's if unchanged).

        Half-precision copies cannot be hashed back to the float32 file: an unchanged copy reports
        the file's hash (verified when it was loaded), a changed one its own, different hash.
        """
        now = self._module_hashes()
        if self._cast_hashes is None:
            return now
        return {n: self.metas[n].sha256 if now[n] == self._cast_hashes[n] else now[n] for n in now}

    def record(self) -> dict[str, Any]:
        """What a student checkpoint keeps instead of teacher tensors."""
        return {n: {"path": self.paths[n], "meta": asdict(self.metas[n])} for n in self.names}


def align_stages(
    teachers: Mapping[str, Backbone],
    student: Backbone,
    image_size: int,
    channels: int,
    keep_last: bool = False,
) -> None:
    """Give each teacher the feature maps at the strides of the student's maps.

    A teacher whose feature indices were set explicitly (`fixed_stages`) keeps them.
    `keep_last` also hands over each teacher's last map after those (a target rule reads the
    pooled last map, whatever stages the method works on): the method reads the first
    `len(student.feature_indices)` maps of each teacher.
    """
    strides = student.stage_strides(image_size, channels)
    for name, t in teachers.items():
        if getattr(t, "fixed_stages", False):
            continue
        own = t.stage_strides(image_size, channels)
        idx = match_stages(strides, student.feature_indices, own, f"teacher '{name}'")
        if keep_last and idx[-1] != -1:
            idx.append(-1)
        t.feature_indices = idx


def teacher_file(name: str, cfg: Mapping[str, Any]) -> str:
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
    teacher_set: Mapping[str, Mapping[str, Any] | Teacher],
    feature_indices: Sequence[int] = (-1,),
    dtype: str | torch.dtype = "float32",
    channels_last: bool = False,
    save_dir: str | os.PathLike | None = None,
) -> TeacherBank:
    """Build the bank from `teacher_set` entries (key = teacher/task name): teacher config
    entries (a weights file and its metadata), or `Teacher`s (timm classifiers in memory).

    With `save_dir`, each in-memory teacher is also written there as a teacher file
    (`save_teacher_copy`, named by its weights' hash) and the bank's path for it is that file,
    so checkpoints can be loaded back from files; a teacher timm cannot rebuild from its arch
    name alone gets no file (its path is '', and a warning says so). Saved before any cast to
    `dtype`, the files hold the float32 weights.
    """
    teachers, metas, paths = {}, {}, {}
    for name, cfg in teacher_set.items():
        if isinstance(cfg, Teacher):
            idx = feature_indices if cfg.feature_indices is None else cfg.feature_indices
            teacher, meta = module_teacher(
                name, cfg.model, cfg.classes, cfg.mean, cfg.std, cfg.input_size, idx
            )
            path = save_teacher_copy(cfg.model, meta, save_dir) if save_dir is not None else None
            if save_dir is not None and path is None:
                log.warning(
                    "teacher '%s': timm cannot rebuild it from its arch name '%s' alone (built "
                    "with other arguments?), so no copy is saved in %s: amalgam.load of this "
                    "run's checkpoints needs overrides={'teacher_set': {'%s': {'weights': "
                    "<its file>}}} (amalgam.teachers.export_teacher writes one)",
                    name,
                    meta.arch,
                    save_dir,
                    name,
                )
            teacher.fixed_stages = cfg.feature_indices is not None
            teachers[name], metas[name], paths[name] = teacher, meta, str(path or "")
            continue
        cfg = dict(cfg)
        weights = teacher_file(name, cfg)
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
            key_map=cfg.get("key_map"),
        )
        idx = cfg.get("feature_indices", feature_indices)
        teachers[name] = build_teacher(meta, weights, idx)
        teachers[name].fixed_stages = cfg.get("feature_indices") is not None
        metas[name] = meta
        paths[name] = str(weights)
    return TeacherBank(teachers, metas, paths, dtype, channels_last)


def check_teacher_set(teacher_set: Mapping[str, Any]) -> None:
    """The one refusal of an empty teacher set (config, Python API and bank alike)."""
    if not teacher_set:
        raise ConfigError(
            "teacher_set is empty: amalgamation needs at least one teacher; pick a set "
            "(e.g. teacher_set=fashion2) or add entries teacher_set.<name>.weights=..."
        )


def teacher_tasks(teacher_set: Mapping[str, Any]) -> dict[str, list]:
    """Each teacher's classes: its metadata file's names, else the config's names/indices."""
    check_teacher_set(teacher_set)
    tasks = {}
    for name, t in teacher_set.items():
        weights = teacher_file(name, t)
        meta = read_meta(weights) or {}
        arch = t.get("arch") or meta.get("arch")
        if not arch:
            raise ConfigError(f"teacher '{name}': no arch in config nor in '{meta_path(weights)}'")
        check_arch(arch, f"teacher_set.{name}.arch")
        classes = meta.get("classes") or t.get("classes")
        if not classes:
            raise ConfigError(f"teacher '{name}': empty class list (teacher_set.{name}.classes)")
        tasks[name] = list(classes)
    return tasks


def check_config_classes(teacher_set: Mapping[str, Any], space: LabelSpace, data_classes) -> None:
    """A teacher's configured classes must equal those its file was trained on."""
    for name, t in teacher_set.items():
        if t.get("classes") and read_meta(t["weights"]):
            given = resolve_classes(t["classes"], data_classes, name)
            if tuple(given) != space.task(name).classes:
                raise ConfigError(
                    f"teacher '{name}': config classes {list(given)} differ from the classes its "
                    f"file was trained on {list(space.task(name).classes)}; fix teacher classes"
                )
