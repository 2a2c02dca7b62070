"""Checks of a composed config that run before any heavy work.

Nothing here decodes an image or runs a teacher: data sets are described from their config
(class names, image counts, channels), weights files from their safetensors header, and
networks are built on the meta device, where a forward pass only computes shapes.
docs/RELIABILITY.md lists every case with its message and its test.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig
from torch import nn

from amalgam.backbone import (
    check_arch,
    check_init,
    check_pretrained,
    classifier_prefix,
    create_timm,
)
from amalgam.checkpoint import read_checkpoint
from amalgam.data import sources
from amalgam.errors import ConfigError
from amalgam.schemas import (
    HYDRA_KEYS,
    StudentConfig,
    TeacherCacheConfig,
    TeacherConfig,
    check_keys,
    conform,
)
from amalgam.tasks import LabelSpace, resolve_classes
from amalgam.teachers.bank import check_config_classes, teacher_tasks
from amalgam.teachers.io import (
    KEY_MAPS,
    check_fit,
    check_new_teacher_file,
    match_keys,
    read_meta,
    resolve_meta,
    weight_shapes,
)
from amalgam.utils import log, nearest_existing, to_dict

# the loss terms each method reads from method.weights
BUILT_BY_CODE = {"space", "student_shapes", "teacher_shapes", "tasks", "targets"}
CHANNEL_RULE = "amalgam converts channels only 1 -> n (repeat) and n -> 1 (mean)"


# ------------------------------------------------------------------------------ config keys


def _locate(target: Any, key: str) -> Any:
    try:
        return get_object(str(target))
    except Exception as e:
        raise ConfigError(f"{key}='{target}' cannot be imported ({e}); fix {key}") from e


def _params(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword names `fn` accepts; None when it takes **kwargs (anything goes)."""
    ps = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps):
        return None
    return {p.name for p in ps if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_source_keys(src: Mapping[str, Any], prefix: str = "data.source") -> None:
    fn = _locate(src.get("_target_"), f"{prefix}._target_")
    check_keys(src, _params(fn), prefix)
    if fn is sources.concat:
        for i, s in enumerate(src.get("sources") or []):
            if isinstance(s, Mapping) and "_target_" in s:
                check_source_keys(s, f"{prefix}.sources.{i}")


def check_data_keys(data: Mapping[str, Any]) -> None:
    cls = _locate(data.get("_target_"), "data._target_")
    params = _params(cls)
    check_keys(data, None if params is None else params - BUILT_BY_CODE, "data")
    if isinstance(data.get("source"), Mapping) and "_target_" in data["source"]:
        check_source_keys(data["source"])


# ------------------------------------------------------------------------------ method


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}={value!r} is not a number: set {key} to a number")
    return float(value)


def _loss_weight(value: Any, key: str, note: str, target: str) -> float:
    """A loss weight at `key`: a finite number >= 0 (the message says to set `target`)."""
    w = _number(value, key)
    if not math.isfinite(w) or w < 0:
        raise ConfigError(
            f"{key}={value}: a loss weight must be a finite number >= 0{note} "
            f"set {target} to e.g. 1.0"
        )
    return w


def check_method(method: Mapping[str, Any]) -> type:
    """Keys, loss weights, temperature and MMD bandwidths of `method`; returns its class."""
    cls = _locate(method.get("_target_"), "method._target_")
    params = _params(cls)
    allowed = None if params is None else (params - BUILT_BY_CODE) | {"name", "feature_indices"}
    check_keys(method, allowed, "method")
    idx = method.get("feature_indices")
    if idx is not None and (
        not isinstance(idx, Sequence)
        or isinstance(idx, str)
        or not idx
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
    ):
        raise ConfigError(
            f"method.feature_indices={idx!r}: give the stages the method reads as a non-empty "
            f"list of map indices, e.g. [-1] (the last map) or [-3, -2, -1]"
        )
    weights = method.get("weights")
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise ConfigError(f"method.weights={weights!r}: give a mapping {{term: weight}}")
        terms = getattr(cls, "terms", None) or None  # a Method subclass names its loss terms
        for k, v in weights.items():
            if terms is not None and k not in terms:
                raise ConfigError(
                    f"unknown config key 'method.weights.{k}': {cls.__name__} has the loss terms "
                    f"{list(terms)}; rename or remove it"
                )
            key = f"method.weights.{k}"
            _loss_weight(v, key, " (0 switches the term off);", key)
        if weights and all(float(v) == 0 for v in weights.values()):
            first = next(iter(weights))
            raise ConfigError(
                f"method.weights are all zero ({dict(weights)}): the loss would be 0 and the "
                f"student would learn nothing; give one term a positive weight, "
                f"e.g. method.weights.{first}=1.0"
            )
    if "temperature" in method:
        t = _number(method["temperature"], "method.temperature")
        if not math.isfinite(t) or t <= 0:
            raise ConfigError(
                f"method.temperature={method['temperature']}: the softmax temperature must be "
                f"a finite number > 0 (1.0 is the plain softmax); set method.temperature=1.0"
            )
    if "sigmas" in method:
        sigmas = method["sigmas"]
        if isinstance(sigmas, str | bytes) or not isinstance(sigmas, Sequence) or not sigmas:
            raise ConfigError(
                f"method.sigmas={sigmas!r}: the MMD needs a non-empty list of kernel bandwidths; "
                f"use the reference method.sigmas=[0.001,0.01,0.05,0.1,0.2,1.0,2.0]"
            )
        for i, s in enumerate(sigmas):
            v = _number(s, f"method.sigmas[{i}]")
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(
                    f"method.sigmas[{i}]={s}: an MMD kernel bandwidth must be a finite number > 0; "
                    f"fix or drop it from method.sigmas"
                )
    return cls


# ------------------------------------------------------------------------------ run values


def _finite(value: Any, key: str, low: float, low_ok: bool, example: str) -> float:
    """A finite number above `low` (or equal with low_ok) at `key`."""
    v = _number(value, key)
    if not math.isfinite(v) or v < low or (v == low and not low_ok):
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise ConfigError(f"{key}={value}: must be a finite number {bound}; set e.g. {example}")
    return v


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is not an integer: set seed to an integer, e.g. seed=0")


def check_optim(optim: Mapping[str, Any] | None) -> None:
    """Learning rate, weight decay, lr multipliers, betas, momentum: finite and in range."""
    optim = optim or {}
    if "lr" in optim:
        _finite(optim["lr"], "optim.lr", 0, False, "optim.lr=1e-3")
    if optim.get("weight_decay") is not None:
        _finite(optim["weight_decay"], "optim.weight_decay", 0, True, "optim.weight_decay=1e-4")
    if optim.get("momentum") is not None:
        _finite(optim["momentum"], "optim.momentum", 0, True, "optim.momentum=0.9")
    for k, v in (optim.get("lr_mult") or {}).items():
        _finite(v, f"optim.lr_mult.{k}", 0, True, f"optim.lr_mult.{k}=1.0")
    for i, b in enumerate(optim.get("betas") or []):
        v = _finite(b, f"optim.betas[{i}]", 0, True, "optim.betas=[0.9,0.999]")
        if v >= 1:
            raise ConfigError(f"optim.betas[{i}]={b}: must be < 1; set optim.betas=[0.9,0.999]")


def check_trainer_length(trainer: Mapping[str, Any] | None) -> None:
    """A run must train: max_epochs >= 1 (or -1 with max_steps), max_steps -1 or >= 1."""
    trainer = trainer or {}
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if steps is not None and not (isinstance(steps, int) and (steps == -1 or steps >= 1)):
        raise ConfigError(
            f"trainer.max_steps={steps!r}: give -1 (no limit) or a number of steps >= 1"
        )
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs == 0 or epochs < -1:
        raise ConfigError(
            f"trainer.max_epochs={epochs!r}: the network would not train (its results would "
            "be those of an untrained network); set trainer.max_epochs >= 1"
        )
    if epochs == -1 and (steps is None or steps == -1):
        raise ConfigError(
            "trainer.max_epochs=-1 without trainer.max_steps would train forever; set "
            "trainer.max_epochs >= 1 or trainer.max_steps >= 1"
        )


def check_norm(mean: Any, std: Any, key: str) -> None:
    """Normalisation of one network: finite means, finite stds > 0 (a std of 0 divides by 0)."""
    for name, values, low in (("mean", mean, None), ("std", std, 0.0)):
        if values is None:
            continue
        items = values if isinstance(values, Sequence) and not isinstance(values, str) else [values]
        for i, v in enumerate(items):
            k = f"{key}.{name}" + (f"[{i}]" if len(items) > 1 else "")
            x = _number(v, k)
            if not math.isfinite(x) or (low is not None and x <= low):
                need = (
                    "a finite number > 0 (images are divided by it)"
                    if low is not None
                    else ("a finite number")
                )
                raise ConfigError(
                    f"{k}={v}: must be {need}; fix {key}.{name}, or set it to null for the "
                    "network's own (timm's pretrained config, else ImageNet's)"
                )


def check_run_values(cfg: Mapping[str, Any]) -> None:
    """Seed, optimiser and training length: values Hydra accepts but that would fail (or train
    nothing) deep inside the run."""
    if "seed" in cfg:
        check_seed(cfg["seed"])
    check_optim(cfg.get("optim"))
    check_trainer_length(cfg.get("trainer"))


# ------------------------------------------------------------------------------ directories


def check_writable_dir(path: str | os.PathLike, key: str, value: Any = None) -> None:
    """`path` is, or can become, a directory we may write into (`value`: what `key` holds).

    Probes by creating and removing a file in it (or in its nearest existing ancestor):
    `os.access` says yes to root even on a read-only mount, a real write does not.
    """
    p = Path(path).expanduser().absolute()
    base = nearest_existing(p)
    shown = f"{key}='{path if value is None else value}'"
    fix = f"set {key} to a path in a directory you can write"
    if not base.is_dir():
        raise ConfigError(f"{shown} is not writable: '{base}' is a file; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".amalgam-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"{shown} is not writable ({type(e).__name__}: {e.strerror or e} in '{base}'); {fix}"
        ) from e


def check_readable_dir(path: str | os.PathLike, key: str) -> None:
    """An existing `path` must be a directory we can list; a missing one is the source's business
    (download, fallback dirs) unless a regular file sits where a directory should be."""
    p = Path(path).expanduser()
    base = nearest_existing(p.absolute())
    if not base.is_dir():
        raise ConfigError(
            f"{key}='{path}' cannot be a directory: '{base}' is a file; set {key} to a directory"
        )
    if base != p.absolute():
        return
    try:
        with os.scandir(p) as entries:
            next(entries, None)
    except OSError as e:
        raise ConfigError(
            f"{key}='{path}' cannot be read ({type(e).__name__}: {e.strerror or e}); give the "
            f"user running amalgam read access to it (e.g. chmod -R a+rX '{path}') or set {key}"
        ) from e


def _source_dirs(src: Mapping[str, Any], prefix: str = "data.source") -> list[tuple[str, str]]:
    """(key, path) of every directory a source config names (root, *_dir), nested ones too."""
    out = []
    for k, v in src.items():
        if isinstance(v, str) and (k == "root" or k.endswith("_dir")):
            out.append((f"{prefix}.{k}", v))
    for i, s in enumerate(src.get("sources") or []):
        if isinstance(s, Mapping):
            out += _source_dirs(s, f"{prefix}.sources.{i}")
    return out


def check_data_dirs(data: Mapping[str, Any]) -> None:
    src = data.get("source")
    if isinstance(src, Mapping):
        for key, path in _source_dirs(src):
            check_readable_dir(path, key)


# ------------------------------------------------------------------------------ data facts


@dataclass
class DataFacts:
    """A data source as known without decoding an image; None: known only once loaded."""

    name: str | None = None
    classes: list[str] | None = None
    train_counts: list[int] | None = None  # training images per class, before the val split
    channels: int | None = None  # channels of the source's images


def _bound(fn: Callable[..., Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in cfg.items() if k not in HYDRA_KEYS}
    try:
        bound = inspect.signature(fn).bind_partial(**kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def _count_images(directory: Path, classes: list[str]) -> list[int]:
    """Image files per class, listed as the source lists them (hidden files skipped), no decode."""
    return [len(sources.image_files(directory / c)) for c in classes]


def data_facts(src: Any) -> DataFacts:
    """Class names, per-class training counts and channels of the built-in sources."""
    if not isinstance(src, Mapping) or "_target_" not in src:
        return DataFacts()
    fn = _locate(src["_target_"], "data.source._target_")
    a = _bound(fn, src)
    if not a:
        return DataFacts()
    if fn is sources.synthetic:
        n = int(a["num_classes"])
        return DataFacts(
            a["name"], [f"c{i}" for i in range(n)], [a["train_per_class"]] * n, int(a["channels"])
        )
    if fn is sources.fashion_mnist:
        return DataFacts("fashion_mnist", list(sources.FASHION_MNIST_CLASSES), None, 1)
    if fn is sources.mnist:
        return DataFacts("mnist", list(sources.MNIST_CLASSES), None, 1)
    if fn is sources.digits:
        return DataFacts("digits", [str(i) for i in range(10)], None, 1)
    if fn is sources.cifar10 or fn is sources.cifar100:
        return DataFacts(fn.__name__, None, None, 3)
    if fn is sources.image_folder:
        d = Path(str(a.get("train_dir"))).expanduser()
        if a.get("train_dir") is None or not d.is_dir():
            return DataFacts("image_folder", None, None, 3)  # the source says what is wrong
        classes = sources.class_dirs(d)
        return DataFacts("image_folder", classes, _count_images(d, classes), 3)
    if fn is sources.concat:
        subs = [data_facts(s) for s in a.get("sources") or []]
        if not subs or any(s.name is None or s.classes is None for s in subs):
            return DataFacts()
        prefix = bool(a.get("prefix", True))
        classes = [f"{s.name}/{c}" if prefix else c for s in subs for c in s.classes or []]
        counts = None
        if all(s.train_counts is not None for s in subs):
            counts = [n for s in subs for n in s.train_counts or []]
        chans = [s.channels for s in subs]
        channels = None if None in chans else max(c for c in chans if c is not None)
        return DataFacts("+".join(str(s.name) for s in subs), classes, counts, channels)
    return DataFacts()  # a source we do not know: its own checks run when it loads


def check_channels(src: int, dst: int, what: str, fix: str) -> None:
    if src != dst and src != 1 and dst != 1:
        raise ConfigError(
            f"{what}: no rule turns {src} channels into {dst} ({CHANNEL_RULE}); {fix}"
        )


def check_data_channels(data: Mapping[str, Any], facts: DataFacts) -> int:
    """The source's channels must convert to data.channels; returns data.channels."""
    channels = int(data.get("channels", 3))
    if facts.channels is not None:
        check_channels(
            facts.channels,
            channels,
            f"data source '{facts.name}' gives {facts.channels}-channel images but "
            f"data.channels={channels}",
            "make the source give 1 or 3 channels (e.g. data.source.channels) or set "
            "data.channels to match",
        )
    return channels


def training_pool(
    data: Mapping[str, Any], facts: DataFacts, classes: Sequence[str] | None
) -> tuple[int | None, bool]:
    """(images a training epoch draws from, exact?), as AmalgamDataModule splits them.

    `classes`: the classes whose images train (None: every class). Without counts the bound
    is data.train_limit (not exact), or None.
    """
    limit = data.get("train_limit")
    if facts.train_counts is None or facts.classes is None:
        return (int(limit), False) if limit else (None, False)
    vf = float(data.get("val_fraction", 0.1))
    keep = set(facts.classes if classes is None else classes)
    n = sum(c - round(vf * c) for name, c in zip(facts.classes, facts.train_counts) if name in keep)
    return (min(n, int(limit)) if limit else n), True


def check_batch_size(data: Mapping[str, Any], pool: int | None, exact: bool) -> None:
    """A batch larger than the training pool trains nothing when the last batch is dropped."""
    bs = data.get("batch_size")
    if pool is None or not isinstance(bs, int) or bs <= pool:
        return
    if data.get("drop_last"):
        raise ConfigError(
            f"data.batch_size={bs} is larger than the {'' if exact else 'at most '}{pool} "
            f"training images (after the val split and data.train_limit) and data.drop_last=true "
            f"drops the only, partial batch: every epoch would run zero steps; set "
            f"data.batch_size<={pool} or data.drop_last=false"
        )
    if exact:
        log.warning(
            "data.batch_size=%d exceeds the %d training images: one batch per epoch", bs, pool
        )


# ------------------------------------------------------------------------------ networks


def meta_model(
    arch: str, num_classes: int, in_chans: int, key: str, kwargs: Mapping[str, Any]
) -> nn.Module:
    """The timm model on the meta device (shapes only, no memory, no init cost)."""
    check_arch(arch, key)
    prefix = key.rsplit(".", 1)[0]
    if "num_classes" in (kwargs or {}):
        raise ConfigError(
            f"{prefix}.model_kwargs.num_classes={kwargs['num_classes']}: the head size comes from "
            f"the class list ({num_classes} classes); remove {prefix}.model_kwargs.num_classes"
        )
    try:
        with torch.device("meta"):
            return create_timm(arch, num_classes, in_chans, key, **kwargs).eval()
    except ConfigError:
        raise
    except Exception:
        pass  # some constructors compute on tensors: build on the CPU, then drop the memory
    try:
        return create_timm(arch, num_classes, in_chans, key, **kwargs).to("meta").eval()
    except Exception as e:
        raise ConfigError(
            f"timm cannot build '{arch}' with in_chans={in_chans}, model_kwargs={dict(kwargs)} "
            f"({type(e).__name__}: {e}); fix {prefix}.model_kwargs / {prefix}.in_chans"
        ) from e


def total_stride(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"])  # type: ignore[index]
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def _forward_shapes(model: nn.Module, x: torch.Tensor, indices: Sequence[int] | None) -> None:
    with torch.no_grad():
        if indices and hasattr(model, "forward_intermediates"):
            final, feats = model.forward_intermediates(x, indices=list(indices), output_fmt="NCHW")
            model.forward_head(final)
        elif indices:
            feats = [model.forward_features(x)]
            model.forward_head(feats[0])
        else:
            feats = [model(x)]
    empty = [tuple(f.shape) for f in feats if 0 in f.shape]
    if empty:
        raise RuntimeError(f"empty feature maps {empty}")


def check_input_size(
    model: nn.Module,
    who: str,
    size: int,
    size_key: str,
    in_chans: int,
    indices: Sequence[int] | None,
) -> None:
    """`model` must take `size` px images: a shape-only forward on the meta device.

    Padded networks (ResNet, EfficientNet) still run below their total stride, with 1x1 last
    maps: a warning. Those that cannot (a patchify stem, unpadded downsampling) are refused.
    """
    stride = total_stride(model)
    try:
        _forward_shapes(model, torch.zeros(2, in_chans, size, size, device="meta"), indices)
    except Exception as e:
        err = e
    else:
        if stride and size < stride:
            log.warning(
                "%s runs at %d px (%s), below its total stride %d: its last feature maps are "
                "1x1 from padding alone",
                who,
                size,
                size_key,
                stride,
            )
        return
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0, 224))[-1]
    safe = max(stride or 0, int(default))
    try:
        _forward_shapes(model, torch.zeros(2, in_chans, safe, safe, device="meta"), indices)
    except Exception:
        log.warning("%s: input size not checked (shape-only forward failed: %s)", who, err)
        return
    raise ConfigError(
        f"{who} cannot take {size} px images ({size_key}={size}): its total stride is "
        f"{stride} ({type(err).__name__}: {str(err)[:160]}); set {size_key} >= {stride or safe}"
    )


def data_size(data: Mapping[str, Any]) -> int:
    """data.image_size; null (timm mode: the student's timm input size) is checked as 224."""
    size = data.get("image_size", 32)
    return 224 if size is None else int(size)


def _size(net: Mapping[str, Any], data: Mapping[str, Any], prefix: str) -> tuple[int, str]:
    if net.get("input_size"):
        return int(net["input_size"]), f"{prefix}.input_size"
    return data_size(data), "data.image_size"


def check_teacher(
    name: str,
    t: Mapping[str, Any],
    classes: Sequence[str],
    data: Mapping[str, Any],
    channels: int,
    indices: Sequence[int] | None,
) -> None:
    """One teacher file, against its metadata and the data: channels, weights fit, input size."""
    weights = str(t["weights"])
    meta = resolve_meta(
        name,
        weights,
        arch=t.get("arch"),
        classes=list(classes),
        in_chans=t.get("in_chans"),
        input_size=t.get("input_size"),
        model_kwargs=t.get("model_kwargs"),
        key_map=t.get("key_map"),
    )
    key = f"teacher_set.{name}"
    who = f"teacher '{name}' ({meta.arch})"
    mean = t.get("mean") if t.get("mean") is not None else meta.mean
    std = t.get("std") if t.get("std") is not None else meta.std
    check_norm(mean, std, key)  # the config's values, else its metadata file's
    check_channels(
        channels,
        meta.in_chans,
        f"{who} takes {meta.in_chans}-channel images ({key}.in_chans or its metadata) but "
        f"data.channels={channels}",
        f"set data.channels=1 (grey, repeated for every network) or use a teacher with "
        f"in_chans 1 or {channels}",
    )
    model = meta_model(
        meta.arch, len(meta.classes), meta.in_chans, f"{key}.arch", meta.model_kwargs
    )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = match_keys(
        weight_shapes(weights, f"teacher '{name}' weights"),
        expected,
        meta.key_map,
        f"teacher '{name}' ({weights})",
    )
    check_fit(
        expected,
        given,
        classifier_prefix(model),
        len(meta.classes),
        f"teacher '{name}' ({weights})",
    )
    size = meta.input_size or data_size(data)
    size_key = f"{key}.input_size" if meta.input_size else "data.image_size"
    check_input_size(model, who, size, size_key, meta.in_chans, indices)


def check_network_init(
    net: Mapping[str, Any], prefix: str, file_key: str, key_map_key: str
) -> None:
    """Initial weights of a network to train: timm's pretrained ones (cached when offline), or
    a file (existing, with a known key_map), never both."""
    check_init(net, prefix, file_key)
    km = net.get(key_map_key) or "name"
    if km not in KEY_MAPS:
        raise ConfigError(f"{prefix}.{key_map_key}='{km}': choose one of {list(KEY_MAPS)}")
    if net.get("pretrained"):
        check_pretrained(str(net["arch"]), f"{prefix}.arch")
    if net.get(file_key) and not Path(str(net[file_key])).is_file():
        raise ConfigError(
            f"{prefix}.{file_key} file '{net[file_key]}' not found: check the path in the config"
        )


def check_student_head(student: Mapping[str, Any], num_classes: int) -> None:
    """The student's head is built over the union; a configured size must agree with it."""
    n = student.get("num_classes")
    if n is not None and n != num_classes:
        raise ConfigError(
            f"student.num_classes={n} but the union of the teachers' classes has {num_classes}: "
            f"the student's head is always built over that union; remove student.num_classes"
        )


def check_student(
    student: Mapping[str, Any],
    num_classes: int | None,
    data: Mapping[str, Any],
    channels: int,
    needs_features: bool,
) -> None:
    """Head size, channels and input size of the student (on the meta device)."""
    if num_classes is not None:
        check_student_head(student, num_classes)
    in_chans = int(student.get("in_chans", 3))
    arch = str(student["arch"])
    check_channels(
        channels,
        in_chans,
        f"student ({arch}) takes {in_chans}-channel images (student.in_chans) but "
        f"data.channels={channels}",
        f"set student.in_chans to 1 or {channels}",
    )
    model = meta_model(
        arch, num_classes or 2, in_chans, "student.arch", student.get("model_kwargs") or {}
    )
    size, size_key = _size(student, data, "student")
    indices = student.get("feature_indices", [-1]) if needs_features else None
    check_input_size(model, f"student ({arch})", size, size_key, in_chans, indices)


# ------------------------------------------------------------------------------ label space


def check_label_space(space: LabelSpace) -> None:
    """The union of the teachers' classes must have two classes or more."""
    if space.num_classes < 2:
        raise ConfigError(
            f"the teachers' classes together are one class {list(space.classes)} (tasks "
            f"{space.as_dict()}): a student over one class learns nothing; add classes or "
            f"teachers to teacher_set so the union has at least 2"
        )


def check_teacher_weights(method: Mapping[str, Any], names: Sequence[str]) -> None:
    """method.teacher_weights (CFL): known teachers, finite factors >= 0."""
    tw = method.get("teacher_weights") or {}
    for k, v in tw.items():
        if k not in names:
            raise ConfigError(
                f"method.teacher_weights.{k}: there is no teacher '{k}' (teachers are "
                f"{list(names)}); rename or remove it"
            )
        _loss_weight(v, f"method.teacher_weights.{k}", ";", "it")


def check_targets(targets: Mapping[str, Any] | None, space: LabelSpace) -> None:
    """The target rule's keys, and its own checks against the label space (no teacher runs)."""
    if not targets or "_target_" not in targets:
        return
    cls = _locate(targets["_target_"], "targets._target_")
    params = _params(cls)
    check_keys(targets, None if params is None else params - {"space"}, "targets")
    kwargs = {k: v for k, v in targets.items() if k not in HYDRA_KEYS}
    cls(space=space, **kwargs)


def validate_label_space(student: Any, space: LabelSpace) -> None:
    """The label-space checks, again once the data is loaded (for sources whose classes are
    not known from their config: CIFAR, custom sources); `student` as config or as a module."""
    check_label_space(space)
    if isinstance(student, Mapping):
        check_student_head(to_dict(student), space.num_classes)


def validate_parts(
    *,
    seed: Any = None,
    optim: Mapping[str, Any] | None = None,
    student: Mapping[str, Any] | None = None,
    method: Mapping[str, Any] | None = None,
    teacher_set: Mapping[str, Any] | None = None,
    teachers: Sequence[str] = (),
) -> type | None:
    """The checks of a run's parts that need no data: seed, optimiser, the student's and the
    method's config, teacher_set entries' keys (those given as config; None skips a part).
    Shared by `validate_amalgamation` and the Python-object path. Returns the method's class
    (None without a method config)."""
    if seed is not None:
        check_seed(seed)
    check_optim(optim)
    method_cls = None
    if method is not None:
        method_cls = check_method(method)
        check_teacher_weights(method, list(teachers))
    if student is not None:
        conform(student, StudentConfig, "student")
        check_norm(student.get("mean"), student.get("std"), "student")
        check_arch(str(student.get("arch")), "student.arch")
        check_network_init(student, "student", "weights", "key_map")
    for name, t in (teacher_set or {}).items():
        if isinstance(t, Mapping):
            conform(t, TeacherConfig, f"teacher_set.{name}")
    return method_cls


# ------------------------------------------------------------------------------ entry points


def _output_dir(cfg: DictConfig) -> str | None:
    try:
        return str(cfg.paths.output_dir)
    except Exception:  # ${hydra:...} outside a Hydra run: nothing to check
        return None


def check_run_dirs(cfg: DictConfig) -> None:
    """The directories an amalgamation run writes: its output dir and the teacher cache.
    (Not part of validate_amalgamation: evaluating a checkpoint writes elsewhere.)"""
    out = _output_dir(cfg)
    if out:
        check_writable_dir(out, "paths.output_dir")
    tc = cfg.get("teacher_cache")
    if tc and tc.get("enabled"):
        check_writable_dir(str(tc.dir), "teacher_cache.dir")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 kernels natively here (avx512_bf16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(trainer: Mapping[str, Any] | None) -> None:
    """Warn when bf16 autocast would run on a CPU that emulates bfloat16 (slower than 32-true)."""
    trainer = trainer or {}
    precision = str(trainer.get("precision", "32-true"))
    accel = str(trainer.get("accelerator", "auto"))
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and not cpu_has_native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without native bfloat16 (no avx512_bf16/AMX): "
            "autocast emulates it and runs slower than float32; set trainer.precision=32-true",
            precision,
        )


def _run_values(cfg: DictConfig) -> dict[str, Any]:
    """seed, optim and the trainer's length keys, resolved (the rest of the trainer config may
    need Hydra's runtime)."""
    trainer = cfg.get("trainer") or {}
    return {
        **({"seed": cfg.seed} if "seed" in cfg else {}),
        "optim": to_dict(cfg.get("optim")),
        "trainer": {k: trainer.get(k) for k in ("max_epochs", "max_steps") if k in trainer},
    }


def validate_amalgamation(cfg: DictConfig) -> None:
    """Every cheap check of an amalgamation config; raises ConfigError on the first failure."""
    method = to_dict(cfg.method)
    data = to_dict(cfg.data)
    student = to_dict(cfg.student)
    teacher_set = to_dict(cfg.get("teacher_set")) or {}
    # 1. the config alone; the architectures and init files it names
    check_run_values(_run_values(cfg))
    method_cls = validate_parts(
        student=student, method=method, teacher_set=teacher_set, teachers=list(teacher_set)
    )
    check_data_keys(data)
    if cfg.get("teacher_cache") is not None:
        conform(to_dict(cfg.teacher_cache), TeacherCacheConfig, "teacher_cache")
    trainer = cfg.get("trainer") or {}  # two keys only: the rest may need Hydra's runtime
    check_precision({k: trainer.get(k) for k in ("precision", "accelerator") if k in trainer})
    # 2. directories read (those written are checked by check_run_dirs, at launch)
    check_data_dirs(data)
    # 3. teacher files and classes (metadata only)
    tasks = teacher_tasks(teacher_set)
    facts = data_facts(data.get("source"))
    space = None
    if facts.classes is not None:
        resolved = {n: resolve_classes(c, facts.classes, n) for n, c in tasks.items()}
        space = LabelSpace.from_mapping(resolved)
        check_config_classes(teacher_set, space, facts.classes)
    # 4. each teacher: channels, weights (header) against its architecture, input size
    channels = check_data_channels(data, facts)
    needs = bool(getattr(method_cls, "needs_features", False))
    s_idx = student.get("feature_indices", [-1])
    for name, t in teacher_set.items():
        classes = space.task(name).classes if space else tasks[name]
        idx = t.get("feature_indices", s_idx) if needs else None
        check_teacher(name, t, classes, data, channels, idx)
    # 5. the union label space and the student
    if space is not None:
        check_label_space(space)
        check_targets(to_dict(cfg.get("targets")), space)
    check_student(student, space.num_classes if space else None, data, channels, needs)
    # 6. batches
    union = None if data.get("unlabeled", "union") == "all" or not space else space.classes
    check_batch_size(data, *training_pool(data, facts, union))


def validate_teacher_training(cfg: DictConfig) -> None:
    """Every cheap check of a teacher-training config; raises ConfigError on the first failure."""
    t = to_dict(cfg.teacher)
    data = to_dict(cfg.data)
    name = str(t.get("name"))
    check_run_values(_run_values(cfg))
    conform(t, TeacherConfig, "teacher")
    check_norm(t.get("mean"), t.get("std"), "teacher")
    check_data_keys(data)
    out = _output_dir(cfg)
    if out:
        check_writable_dir(out, "paths.output_dir")
    if not t.get("weights"):
        raise ConfigError(
            f"teacher.weights is empty: set where the trained teacher goes, e.g. "
            f"teacher.weights=teachers/{name}.safetensors"
        )
    check_writable_dir(Path(str(t["weights"])).parent, "teacher.weights", t["weights"])
    if not cfg.get("overwrite", False):
        check_new_teacher_file(str(t["weights"]), "teacher.weights")
    check_data_dirs(data)
    check_arch(str(t["arch"]), "teacher.arch")
    check_network_init(t, "teacher", "init_weights", "init_key_map")
    facts = data_facts(data.get("source"))
    classes: Sequence[Any] = list(t.get("classes") or [])
    if facts.classes is not None:
        classes = resolve_classes(classes, facts.classes, name)
        if len(classes) < 2:
            raise ConfigError(
                f"task '{name}' has one class {list(classes)}: a classifier needs at least two; "
                f"add classes to teacher.classes"
            )
    channels = check_data_channels(data, facts)
    in_chans = int(t.get("in_chans") or 3)
    check_channels(
        channels,
        in_chans,
        f"teacher '{name}' takes {in_chans}-channel images (teacher.in_chans) but "
        f"data.channels={channels}",
        f"set teacher.in_chans to 1 or {channels}",
    )
    model = meta_model(
        str(t["arch"]), max(len(classes), 1), in_chans, "teacher.arch", t.get("model_kwargs") or {}
    )
    size, size_key = _size(t, data, "teacher")
    check_input_size(model, f"teacher '{name}' ({t['arch']})", size, size_key, in_chans, None)
    pool = training_pool(data, facts, [str(c) for c in classes] if facts.classes else None)
    check_batch_size(data, *pool)


def check_checkpoint(path: str | os.PathLike, teacher_set: Mapping[str, Any]) -> None:
    """A checkpoint to resume from: read safely, and written with this very teacher set."""
    rec = read_checkpoint(path, key="ckpt_path").record.teachers
    fresh = "resume with the teacher set it was trained with, or start afresh with ckpt_path=null"
    if sorted(rec) != sorted(teacher_set):
        raise ConfigError(
            f"ckpt_path '{path}' belongs to another teacher set: it was trained with teachers "
            f"{sorted(rec)}, this run's teacher_set has {sorted(teacher_set)}; {fresh}"
        )
    for name, r in rec.items():
        then = (r.get("meta") or {}).get("sha256")
        weights = teacher_set[name].get("weights")
        now = (read_meta(weights) or {}).get("sha256") if weights else None
        if then and now and then != now:
            raise ConfigError(
                f"ckpt_path '{path}' belongs to another teacher set: its teacher '{name}' had "
                f"weights {then[:12]} ('{r.get('path')}'), teacher_set.{name}.weights "
                f"'{weights}' has {now[:12]}; {fresh}"
            )
