"""One builder: a run's parts into data module, teacher bank, student, method and module.

Each part comes as config or as an object (`RunSpec`). The config path (`spec_from_config`: a
composed config, the CLI's) and the object path (`spec_from_objects`: `api.Amalgamation(...)`)
only translate their inputs into a spec and run the cheap checks on it; `assemble` builds every
run, in one order: data, teachers, student, method, the rule's statistics, the record.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from amalgam.backbone import (
    Backbone,
    check_init,
    check_timm_module,
    create_timm,
    data_config,
    head_outputs,
    input_channels,
    rebuilds_from_name,
    timm_arch,
)
from amalgam.checkpoint import RunRecord
from amalgam.data import AmalgamDataModule, Source
from amalgam.errors import ConfigError
from amalgam.methods.base import Method
from amalgam.module import AmalgamModule
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import (
    Teacher,
    TeacherBank,
    align_stages,
    check_config_classes,
    load_teacher_bank,
    teacher_tasks,
)
from amalgam.teachers.io import check_module_teacher, init_from_file
from amalgam.utils import CONF_DIR, log, to_dict
from amalgam.validate import validate_amalgamation, validate_label_space, validate_parts

# ------------------------------------------------------------------------------ the spec


@dataclasses.dataclass
class RunSpec:
    """What a run is built from. Each part as config or as an object:

    - teachers: {name: teacher_set entry (a config dict) or `Teacher`}, or a TeacherBank;
    - data: a data config (`_target_`), a dict of AmalgamDataModule arguments, a Source, or an
      AmalgamDataModule over the teachers' tasks;
    - student: a student config dict, a timm module, or a Backbone over the union;
    - method: a method config (`_target_`), a Method class or partial, or a Method;
    - targets: the `targets` group (a rule config) for a method config, else None (the
      method's own rule).

    `config` is the composed config a config-path run stores in its checkpoint; None composes
    the stored config from the parts that are config.
    """

    teachers: Mapping[str, Any] | TeacherBank
    data: Any
    student: Any
    method: Any
    optim: Mapping[str, Any]
    targets: Any = None
    seed: int | None = None
    feature_indices: Sequence[int] = (-1,)
    teacher_dtype: str = "float32"
    teacher_channels_last: bool = False
    channels_last: bool = False
    save_dir: Path | None = None  # where in-memory teachers are written as files
    fit_rules: bool = True
    config: dict[str, Any] | None = None


@dataclasses.dataclass
class Built:
    """What `assemble` gives: the data module, the module, and how results name the run."""

    datamodule: Any
    module: AmalgamModule
    method: str
    student_arch: str


def spec_from_config(cfg: DictConfig, fit_rules: bool = True, init_student: bool = True) -> RunSpec:
    """The spec of a composed amalgamation config, after every cheap check of it
    (`validate_amalgamation`: no image read, no teacher run)."""
    if not init_student:  # every tensor comes from a checkpoint
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.student.pretrained = False
            cfg.student.weights = None
    validate_amalgamation(cfg)
    student = dict(to_dict(cfg.student))
    return RunSpec(
        teachers=dict(to_dict(cfg.teacher_set)),
        data=cfg.data,
        student=student,
        method=dict(to_dict(cfg.method)),
        optim=dict(to_dict(cfg.optim)),
        targets=cfg.get("targets"),
        seed=cfg.get("seed"),
        feature_indices=list(student.get("feature_indices") or [-1]),
        teacher_dtype=cfg.get("teacher_dtype", "float32"),
        teacher_channels_last=bool(
            cfg.get("teacher_channels_last", False) or cfg.get("channels_last")
        ),
        channels_last=bool(cfg.get("channels_last", False)),
        fit_rules=fit_rules,
        config=to_dict(cfg),
    )


def spec_from_objects(
    teachers: Mapping[str, Any] | TeacherBank,
    student: Any,
    data: Any,
    method: Any,
    optim: str | Mapping[str, Any],
    *,
    seed: int | None = None,
    teacher_dtype: str = "float32",
    save_dir: Path | None = None,
) -> RunSpec:
    """The spec of a run given as Python objects (each part an object or config; preset names
    for method and optim), after the same cheap checks on the parts that are config."""
    optim_cfg = preset("optim", optim) if isinstance(optim, str) else dict(to_dict(optim))
    if isinstance(method, str):
        method = preset("method", method)
    if isinstance(student, str):
        student = {"arch": student}
    if isinstance(method, Mapping):
        method = dict(to_dict(method))
    if isinstance(student, Mapping):
        student = dict(to_dict(student))
    entries = teachers if isinstance(teachers, TeacherBank) else teacher_entries(teachers)
    names = list(entries.teachers if isinstance(entries, TeacherBank) else entries)
    validate_parts(
        seed=seed,
        optim=optim_cfg,
        student=student if isinstance(student, Mapping) else None,
        method=method if isinstance(method, Mapping) else None,
        teacher_set=entries if not isinstance(entries, TeacherBank) else None,
        teachers=names,
    )
    return RunSpec(
        teachers=entries,
        data=data,
        student=student,
        method=method,
        optim=optim_cfg,
        seed=seed,
        feature_indices=feature_indices(student, method),
        teacher_dtype=teacher_dtype,
        save_dir=save_dir,
    )


# ------------------------------------------------------------------------------ the builder


def assemble(spec: RunSpec) -> Built:
    """Build the run a spec describes: data, teachers, student, method, the target rule's
    statistics (unless `spec.fit_rules` is False: a checkpoint is about to supply them), the
    checkpoint record and the module."""
    given_bank = isinstance(spec.teachers, TeacherBank)
    if given_bank:
        bank = spec.teachers
        tasks = {n: list(m.classes) for n, m in bank.metas.items()}
    else:
        entries = dict(spec.teachers)
        tasks = _teacher_tasks(entries)
    dm = datamodule(spec.data, tasks)
    space = dm.label_space
    validate_label_space(spec.student, space)
    if not given_bank:
        configs = {n: t for n, t in entries.items() if not isinstance(t, Teacher)}
        check_config_classes(configs, space, dm.source.classes)
        for name, t in entries.items():  # the data's names for the classes
            classes = list(space.task(name).classes)
            if isinstance(t, Teacher):
                entries[name] = dataclasses.replace(t, classes=classes)
            else:
                entries[name] = {**t, "class_names": classes}
        bank = load_teacher_bank(
            entries,
            feature_indices=spec.feature_indices,
            dtype=spec.teacher_dtype,
            channels_last=spec.teacher_channels_last,
            save_dir=spec.save_dir,
        )
    _check_same_space(dm, bank)
    _check_not_a_teacher(spec.student, bank)
    student, student_cfg = make_student(
        spec.student, space.num_classes, spec.feature_indices, spec.channels_last
    )
    # timm preprocessing takes what the data config leaves open from the student's data config
    dm.use_data_config(data_config(student.model))
    method, method_cfg = make_method(spec.method, space, student, bank, dm, spec.targets)
    rule = method.targets
    if spec.fit_rules and getattr(rule, "needs_fit", False) and not getattr(rule, "is_fit", False):
        rule.fit(bank, dm)  # statistics of the teachers' own images
    config = spec.config
    if config is None:  # enough for amalgam.load() when every part came as config
        if given_bank:
            stored = {n: {"weights": p} for n, p in bank.paths.items()}
        else:
            stored = {n: _teacher_entry(t, bank.paths[n]) for n, t in entries.items()}
        config = {
            "seed": spec.seed,
            "teacher_dtype": spec.teacher_dtype,
            "teacher_set": stored,
            "student": student_cfg,
            "method": method_cfg,
            "optim": dict(spec.optim),
            "data": dict(to_dict(spec.data)) if _is_config(spec.data) else None,
        }
    record = RunRecord(config=config, label_space=space.as_dict())
    if dm.preprocess.mode == "timm":  # as resolved (the config may leave values to the student)
        record.preprocess = {**dm.preprocess.as_dict(), "image_size": dm.image_size}
    module = AmalgamModule(bank, student, method, dict(spec.optim), record)
    return Built(dm, module, method_label(method, method_cfg), _arch(student, student_cfg))


def build_amalgamation(
    cfg: DictConfig, fit_rules: bool = True, init_student: bool = True
) -> tuple[Any, AmalgamModule]:
    """(datamodule, module) for an amalgamation config. Cheap checks come first.

    `fit_rules=False` leaves a target rule's statistics unfitted: for a module whose state
    (statistics included) is about to be loaded from a checkpoint. `init_student=False` skips
    the student's pretrained weights or init file (every tensor comes from a checkpoint).
    """
    built = assemble(spec_from_config(cfg, fit_rules, init_student))
    return built.datamodule, built.module


# ------------------------------------------------------------------------------ presets


def preset(group: str, name: str, **overrides: Any) -> dict[str, Any]:
    """conf/<group>/<name>.yaml as a dict, with `overrides` merged in (nested dicts merge).

    `preset("method", "cfl", temperature=4.0)`, `preset("optim", "sgd", lr=0.01)`.
    """
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{group}='{name}': no file '{path}'; choose one of {names}")
    raw = OmegaConf.load(path)
    follows = str(OmegaConf.to_container(raw).get("feature_indices", ""))
    if "method.feature_indices" in follows and "feature_indices" not in overrides:
        del raw["feature_indices"]  # a student preset's stages follow the run's method
    cfg = OmegaConf.merge(raw, overrides)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{group}/{name}.yaml refers to other config keys ({e}); compose the whole config "
            "with amalgam.compose() and use Amalgamation.from_config"
        ) from e


# ------------------------------------------------------------------------------ teachers


TEACHER_FORMS = (
    "a weights path, a teacher config dict, (timm model, [class names]), "
    "{'model': timm model, 'classes': [class names], ...} or amalgam.teachers.bank.Teacher"
)
TEACHER_FIELDS = {f.name for f in dataclasses.fields(Teacher)}


def _in_memory(name: str, t: Any) -> Teacher | None:
    """The `Teacher` that `t` gives in memory (checked), None when `t` names a teacher file."""
    if isinstance(t, Teacher):
        pass
    elif isinstance(t, tuple | list) and len(t) == 2 and isinstance(t[0], nn.Module):
        t = Teacher(t[0], t[1])
    elif isinstance(t, Mapping) and "model" in t:
        unknown = sorted(set(t) - TEACHER_FIELDS)
        if unknown or "classes" not in t:
            raise ConfigError(
                f"teachers['{name}']: an in-memory teacher dict takes the keys "
                f"{sorted(TEACHER_FIELDS)} ('model' and 'classes' needed); got {sorted(t)}"
            )
        t = Teacher(**dict(t))
    elif isinstance(t, nn.Module):
        raise ConfigError(
            f"teachers['{name}']: a model alone does not say which class each logit is: give "
            f"(model, [class names in logit order]) or Teacher(model, classes)"
        )
    else:
        return None
    check_module_teacher(name, t.model, t.classes)  # before any image is read
    return t


def teacher_entries(teachers: Mapping[str, Any]) -> dict[str, dict[str, Any] | Teacher]:
    """{name: teacher} -> teacher_set entries: config dicts for teacher files, `Teacher`s for
    timm classifiers in memory (checked here: timm API, head size, class list)."""
    out: dict[str, dict[str, Any] | Teacher] = {}
    for name, t in teachers.items():
        module = _in_memory(str(name), t)
        if module is not None:
            out[str(name)] = module
        elif isinstance(t, str | Path):
            out[str(name)] = {"weights": str(t)}
        elif isinstance(t, Mapping):
            out[str(name)] = dict(to_dict(t))
        else:
            raise ConfigError(f"teachers['{name}']: give {TEACHER_FORMS}; got {type(t).__name__}")
    return out


def _teacher_tasks(teacher_set: Mapping[str, dict[str, Any] | Teacher]) -> dict[str, list[Any]]:
    """Each teacher's classes, in teacher order: a file's from its metadata or config, an
    in-memory teacher's as given."""
    files = {n: t for n, t in teacher_set.items() if not isinstance(t, Teacher)}
    known = teacher_tasks(files) if files or not teacher_set else {}
    return {
        n: list(t.classes) if isinstance(t, Teacher) else known[n] for n, t in teacher_set.items()
    }


def _teacher_entry(t: dict[str, Any] | Teacher, path: str) -> dict[str, Any]:
    """The teacher_set entry a checkpoint stores: the file (an in-memory teacher's saved copy,
    '' when none could be saved) and its own feature indices."""
    idx = t.feature_indices if isinstance(t, Teacher) else t.get("feature_indices")
    return {"weights": str(path), **({"feature_indices": list(idx)} if idx is not None else {})}


def _check_same_space(dm: AmalgamDataModule, bank: TeacherBank) -> None:
    have = {t.name: list(t.classes) for t in dm.label_space.tasks}
    want = {t.name: list(t.classes) for t in bank.space.tasks}
    if have != want:
        raise ConfigError(
            f"data: the datamodule's tasks {have} differ from the teachers' classes {want}; "
            "build it with tasks={teacher: its classes}, or pass a Source and let the "
            "Amalgamation build it"
        )


def _check_not_a_teacher(student: Any, bank: TeacherBank) -> None:
    model = student.model if isinstance(student, Backbone) else student
    for name, t in bank.teachers.items():
        if model is t.model:
            raise ConfigError(
                f"student: it is the module of teacher '{name}', which stays frozen; give the "
                "student its own module (timm.create_model(...), or copy.deepcopy(teacher))"
            )


# ------------------------------------------------------------------------------ data


def build_datamodule(data_cfg: Any, tasks: Mapping[str, Any]):
    """Instantiate the datamodule for `tasks` ({name: classes, or None for every class of the
    data}); resolves classes eagerly."""
    tasks = {k: None if v is None else list(v) for k, v in tasks.items()}
    dm = hydra.utils.instantiate(data_cfg, tasks=tasks)
    _ = dm.label_space
    return dm


def datamodule(data: Any, tasks: Mapping[str, Sequence[Any]]) -> AmalgamDataModule:
    """The data module of `data`: a data config (`_target_`), a dict of AmalgamDataModule
    arguments, a Source, or an AmalgamDataModule (used as it is)."""
    if isinstance(data, AmalgamDataModule):
        return data
    if isinstance(data, Source) or callable(data):
        return AmalgamDataModule(data, tasks)
    if isinstance(data, Mapping):
        if _is_config(data):
            return build_datamodule(data, tasks)
        return AmalgamDataModule(tasks=tasks, **dict(to_dict(data)))
    raise ConfigError(
        "data: give an AmalgamDataModule, a Source (e.g. amalgam.data.synthetic()), or a dict "
        f"of AmalgamDataModule arguments with its 'source'; got {type(data).__name__}"
    )


def _is_config(part: Any) -> bool:
    """A part that is plain config (a dict with `_target_`), storable in a checkpoint."""
    return isinstance(part, Mapping) and "_target_" in part


# ------------------------------------------------------------------------------ student


STUDENT_FIX = (
    "give a timm.create_model(...) module, a timm arch name, a student config dict "
    "(conf/student/*.yaml keys) or an amalgam.backbone.Backbone"
)


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


def make_student(
    student: Any, num_classes: int, stages: Sequence[int], nhwc: bool = False
) -> tuple[Backbone, dict[str, Any] | None]:
    """(student, its config if it has one) from a config, a timm module or a Backbone; a
    config's or module's student works on `stages` (a Backbone keeps its own)."""
    if isinstance(student, Backbone):
        n = getattr(student.model, "num_classes", num_classes)
        if n != num_classes:
            raise ConfigError(
                f"student: its head has {n} outputs but the teachers' union has {num_classes} "
                "classes; build it for the union (or pass its arch name / config dict)"
            )
        return student, _rebuild_config(student, num_classes)
    if isinstance(student, nn.Module):
        net, cfg = _timm_student(student, num_classes)
    elif isinstance(student, Mapping):
        cfg = dict(to_dict(student))
        net = build_student(cfg, num_classes, nhwc)
    else:
        raise ConfigError(f"student: {STUDENT_FIX}; got {type(student).__name__}")
    net.feature_indices = list(stages)  # the stages the method works on
    if cfg is not None:
        cfg["feature_indices"] = list(stages)
    return net, cfg


def _timm_student(model: nn.Module, num_classes: int) -> tuple[Backbone, dict[str, Any] | None]:
    """A timm classifier in memory as the student: the module itself, wrapped (not copied),
    its head reset to the union classes when it has another size. Its config, for checkpoints
    to be loaded back, when timm rebuilds its architecture from its arch name alone."""
    check_timm_module(model, "student", STUDENT_FIX)
    n = head_outputs(model)
    if n != num_classes:
        model.reset_classifier(num_classes)
        got = head_outputs(model)
        if got != num_classes:
            raise ConfigError(
                f"student: reset_classifier({num_classes}) left its head with {got} outputs; "
                f"give a timm model whose head has one output per union class ({num_classes})"
            )
        (log.info if not n else log.warning)(
            "student: its head had %s outputs; reset_classifier(%d) gave it a new, untrained "
            "head over the %d union classes",
            n,
            num_classes,
            num_classes,
        )
    net = Backbone(model, input_channels(model))
    return net, _rebuild_config(net, num_classes)


def _rebuild_config(net: Backbone, num_classes: int) -> dict[str, Any] | None:
    """The student config that rebuilds `net` (a timm model from its arch name alone, and the
    Backbone's preprocessing), for checkpoints to load back; None, with a warning, if none does."""
    model = net.model
    arch = timm_arch(model)
    if arch is None or not rebuilds_from_name(model, arch, num_classes, net.in_chans):
        log.warning(
            "student: timm cannot rebuild %s from its arch name alone (built with other "
            "arguments?), so this run's checkpoints store no student config: amalgam.load "
            "needs overrides={'student': {...}}",
            arch or type(model).__name__,
        )
        return None
    mean, std = net.norm
    return {
        "arch": arch,
        "in_chans": net.in_chans,
        "input_size": net.input_size,
        "mean": mean,
        "std": std,
        "pretrained": False,  # every tensor comes from the checkpoint
        "weights": None,
        "feature_indices": list(net.feature_indices),
    }


def _arch(student: Backbone, cfg: Mapping[str, Any] | None) -> str:
    if cfg is not None:
        return str(cfg["arch"])
    pcfg = getattr(student.model, "pretrained_cfg", None) or {}
    return str(pcfg.get("architecture") or type(student.model).__name__)


def _method_stages(method: Any) -> list[int] | None:
    """The stages a method preset or config names (`feature_indices`), if it names any."""
    if isinstance(method, str):
        method = preset("method", method)
    if isinstance(method, Mapping):
        idx = to_dict(method).get("feature_indices")
        return None if idx is None else list(idx)
    return None


def feature_indices(student: Any, method: Any = None) -> list[int]:
    """The student's stages: a Backbone's own or a config's `feature_indices`, else the
    method's (as `student.feature_indices` follows `method.feature_indices` in a config), else
    the last map."""
    if isinstance(student, Backbone):
        return list(student.feature_indices)
    if isinstance(student, str):
        student = {"arch": student}
    if isinstance(student, Mapping) and to_dict(student).get("feature_indices") is not None:
        return list(to_dict(student)["feature_indices"])
    return _method_stages(method) or [-1]


# ------------------------------------------------------------------------------ method


def make_method(
    method: Any,
    space: LabelSpace,
    student: Backbone,
    bank: TeacherBank,
    dm: Any,
    targets_cfg: Any = None,
) -> tuple[Method, dict[str, Any] | None]:
    """(method, its config if it has one) from a config (`targets_cfg`: its rule), a Method
    class or partial (functools.partial(CFL, weights=...)), or a Method."""
    if isinstance(method, Method):
        return method, None
    if isinstance(method, Mapping):
        cfg = dict(to_dict(method))
        built = build_method(cfg, space, student, bank, dm.image_size, dm.channels, targets_cfg)
        return built, cfg
    if callable(method):
        rule = getattr(method, "keywords", {}).get("targets")
        return with_shapes(method, space, student, bank, dm.image_size, dm.channels, rule), None
    raise ConfigError(
        "method: give a preset name ('cfl', 'kd', ...), a method config dict, a Method class or "
        f"partial (functools.partial(CFL, weights=...)), or a Method; got {type(method).__name__}"
    )


def method_label(method: Method, cfg: Mapping[str, Any] | None) -> str:
    """The method's name in results: its config's `name`, else its class name."""
    if cfg is not None:
        return str(cfg.get("name") or str(cfg["_target_"]).rsplit(".", 1)[-1])
    return type(method).__name__.lower()


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
