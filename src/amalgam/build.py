"""Turn a composed config into data, teachers, student, method and the LightningModule."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from amalgam.backbone import Backbone, check_arch, check_init, create_timm, data_config
from amalgam.checkpoint import RunRecord
from amalgam.module import AmalgamModule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import (
    TeacherBank,
    align_stages,
    check_config_classes,
    load_teacher_bank,
    teacher_tasks,
)
from amalgam.teachers.io import init_from_file
from amalgam.utils import to_dict
from amalgam.validate import validate_amalgamation, validate_label_space


def build_datamodule(data_cfg: Any, tasks: Mapping[str, Any]):
    """Instantiate the datamodule for `tasks` ({name: classes, or None for every class of the
    data}); resolves classes eagerly."""
    tasks = {k: None if v is None else list(v) for k, v in tasks.items()}
    dm = hydra.utils.instantiate(data_cfg, tasks=tasks)
    _ = dm.label_space
    return dm


def build_student(cfg: Mapping[str, Any], num_classes: int, nhwc: bool = False) -> Backbone:
    """The student over `num_classes`: random init, timm's pretrained weights
    (`pretrained: true`), or an init file (`weights`, head dropped, `key_map` name|order)."""
    check_init(cfg, "student")
    model = create_timm(
        cfg["arch"],
        num_classes,
        cfg.get("in_chans", 3),
        key="student.arch",
        pretrained=bool(cfg.get("pretrained", False)),
        **(cfg.get("model_kwargs") or {}),
    )
    if cfg.get("weights"):
        init_from_file(model, cfg["weights"], cfg.get("key_map") or "name", "student.weights")
    student = Backbone(
        model,
        cfg.get("in_chans", 3),
        cfg.get("input_size"),
        cfg.get("mean"),
        cfg.get("std"),
        cfg.get("feature_indices", (-1,)),
        channels_last=bool(cfg.get("channels_last", False) or nhwc),
    )
    if cfg.get("compile"):
        student.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`
    return student


def build_method(
    method_cfg: Any,
    space: LabelSpace,
    student: Backbone,
    bank: TeacherBank,
    image_size: int,
    channels: int,
    targets_cfg: Any = None,
):
    """The method for this student and bank; `targets_cfg` (the `targets` group) is its rule."""
    method_cfg = dict(to_dict(method_cfg))
    method_cfg.pop("name", None)
    method_cfg.pop("feature_indices", None)  # the stages it reads: student.feature_indices
    factory = hydra.utils.instantiate(method_cfg)
    rule = None
    if targets_cfg is not None:
        rule = hydra.utils.instantiate(to_dict(targets_cfg))(space=space)
        factory = functools.partial(factory, targets=rule)
    return with_shapes(factory, space, student, bank, image_size, channels, rule)


def with_shapes(
    factory: Any,
    space: LabelSpace,
    student: Backbone,
    bank: TeacherBank,
    image_size: int,
    channels: int,
    rule: Any = None,
):
    """Call a method factory with the feature-map shapes it needs, once the teachers' maps are
    aligned to the student's strides (and each teacher's last map kept for a rule that reads
    features)."""
    func = factory
    while hasattr(func, "func"):  # partials (Hydra's or functools') down to the class
        func = func.func
    needs = bool(getattr(func, "needs_features", False))
    s_shapes, t_shapes = [], {n: [] for n in bank.teachers}
    if needs:
        keep_last = bool(getattr(rule, "needs_features", False))
        align_stages(bank.teachers, student, image_size, channels, keep_last)
        s_shapes = student.feature_shapes(image_size, channels)
        levels = len(s_shapes)
        t_shapes = {
            n: t.feature_shapes(image_size, channels)[:levels] for n, t in bank.teachers.items()
        }
    return factory(space=space, student_shapes=s_shapes, teacher_shapes=t_shapes)


def build_amalgamation(
    cfg: DictConfig, fit_rules: bool = True, init_student: bool = True
) -> tuple[Any, AmalgamModule]:
    """(datamodule, module) for an amalgamation config. Cheap checks come first.

    `fit_rules=False` leaves a target rule's statistics unfitted: for a module whose state
    (statistics included) is about to be loaded from a checkpoint. `init_student=False` skips
    the student's pretrained weights or init file (every tensor comes from a checkpoint).
    """
    if not init_student:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.student.pretrained = False
            cfg.student.weights = None

    validate_amalgamation(cfg)  # before any image is read or any teacher runs
    teacher_set = to_dict(cfg.teacher_set)
    check_arch(cfg.student.arch, "student.arch")
    tasks = teacher_tasks(teacher_set)
    dm = build_datamodule(cfg.data, tasks)
    space = dm.label_space
    check_config_classes(teacher_set, space, dm.source.classes)
    validate_label_space(cfg, space)
    for name in teacher_set:
        teacher_set[name]["class_names"] = list(space.task(name).classes)
    feat_idx = to_dict(cfg.student.get("feature_indices", [-1]))
    bank = load_teacher_bank(
        teacher_set,
        feature_indices=feat_idx,
        dtype=cfg.get("teacher_dtype", "float32"),
        channels_last=bool(cfg.get("teacher_channels_last", False) or cfg.get("channels_last")),
    )
    nhwc = bool(cfg.get("channels_last", False))
    student = build_student(to_dict(cfg.student), space.num_classes, nhwc)
    # timm preprocessing takes what the data config leaves open from the student's data config
    dm.use_data_config(data_config(student.model))
    method = build_method(
        cfg.method, space, student, bank, dm.image_size, dm.channels, cfg.get("targets")
    )
    rule = getattr(method, "targets", None)
    if fit_rules and getattr(rule, "needs_fit", False):  # statistics of the teachers' own images
        rule.fit(bank, dm)
    record = RunRecord(config=to_dict(cfg), label_space=space.as_dict())
    if dm.preprocess.mode == "timm":  # as resolved (the config may leave values to the student)
        record.preprocess = {**dm.preprocess.as_dict(), "image_size": dm.image_size}
    return dm, AmalgamModule(bank, student, method, to_dict(cfg.optim), record)
