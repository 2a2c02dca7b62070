"""Teacher files: safe weight loading, export as safetensors + JSON metadata, and load-back."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from amalgam.backbone import (
    TEACHER_API,
    Backbone,
    check_timm_module,
    classifier_prefix,
    create_timm,
    default_norm,
    head_keys,
    head_outputs,
    input_channels,
    rebuilds_from_name,
    timm_arch,
)
from amalgam.errors import ConfigError
from amalgam.files import atomic_path, atomic_write_text

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
V = TypeVar("V")  # a state dict's values: tensors, or their shapes


@dataclass
class TeacherMeta:
    """What a teacher file needs besides its tensors to be rebuilt and used."""

    name: str
    arch: str
    classes: list[str]
    in_chans: int = 3
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    test_acc: float | None = None
    data: str | None = None
    key_map: str = "name"  # how the file's tensors map to the model's keys: name | order
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherMeta:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def state_dict_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_hash(model: nn.Module) -> str:
    return state_dict_hash(model.state_dict())


def meta_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


# what torch's weights-only unpickler says when a file holds more than tensors: a global it
# refuses ("Unsupported global: GLOBAL getattr was not ...", "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked") or an opcode it does not run ("Unsupported
# operand 149"); only that part is shown, never torch's advice to allow-list the global or to
# load with weights_only=False
_PICKLED_CODE = re.compile(r"(unsupported global: global \S+|unsupported operand \d+)", re.I)


def _unreadable(path: Path, what: str, e: Exception, fix: str = "") -> ConfigError:
    """One line for a file torch or safetensors cannot read safely. torch's own message advises
    re-running with weights_only=False, which would run the file's code: it is never shown."""
    fix = fix or "Re-export it as safetensors."
    text = str(e)
    refused = _PICKLED_CODE.search(text.replace("unsupported GLOBAL", "Unsupported global: GLOBAL"))
    if refused or "Weights only load failed" in text:
        reason = refused.group(1) if refused else "an object that is not a tensor"
        return ConfigError(
            f"{what} file '{path}' holds pickled Python code, not only tensors ({reason}): "
            f"refused for safety, since unpickling it could run that code. {fix}"
        )
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0][:200]  # torch's first sentence; the rest is its advice
    return ConfigError(
        f"{what} file '{path}' cannot be read safely ({type(e).__name__}: {first}). "
        f"It is truncated or corrupt. {fix}"
    )


def torch_load_safely(path: str | os.PathLike, what: str, fix: str = "") -> Any:
    """torch.load with weights_only=True (tensors and plain containers only, never code)."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the error says more
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(Path(path), what, e, fix) from e


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file '{path}' not found: check the path in the config")
    return path


def read_weights(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a tensor dict without ever unpickling code: safetensors, or torch with weights_only."""
    path = _existing(path, what)
    try:
        if path.suffix == ".safetensors":
            sd: Any = load_file(str(path))
        elif path.suffix in TORCH_SUFFIXES:
            sd = torch_load_safely(path, what)
        else:
            raise ConfigError(
                f"{what} file '{path}': unknown suffix '{path.suffix}'; use .safetensors "
                f"(preferred) or a torch file ({', '.join(TORCH_SUFFIXES)}) saved with tensors only"
            )
    except ConfigError:
        raise
    except Exception as e:
        raise _unreadable(path, what, e) from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{what} file '{path}' does not hold a flat dict of tensors")
    return dict(sd)


def weight_shapes(path: str | os.PathLike, what: str = "weights") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file; a safetensors file's header only."""
    path = _existing(path, what)
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_weights(path, what).items()}
    try:
        with safe_open(str(path), "pt") as f:  # checks the header covers the whole file
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise _unreadable(path, what, e) from e


def strip_prefix(sd: Mapping[str, V], model_keys: Sequence[str]) -> dict[str, V]:
    """Drop the prefix that wrappers add ('model.', 'module.', 'student.model.', ...)."""
    keys = set(model_keys)
    if keys & set(sd):
        return dict(sd)
    votes: Counter[str] = Counter()
    for k in sd:
        for mk in keys:
            if k.endswith("." + mk):
                votes[k[: -len(mk)]] += 1
    if not votes:
        return dict(sd)
    prefix = votes.most_common(1)[0][0]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def check_fit(
    expected: Mapping[str, Sequence[int]],
    given: Mapping[str, Sequence[int]],
    head: str,
    num_classes: int,
    who: str,
) -> None:
    """Refuse weights (name -> shape, prefix stripped) that do not fit a model's state dict."""
    hw = given.get(f"{head}.weight")
    if hw is not None and hw[0] != num_classes:
        raise ConfigError(
            f"{who}: the head '{head}' has {hw[0]} outputs but the class list has "
            f"{num_classes} classes: fix the class list or use the right weights file"
        )
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: file {tuple(given[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(given) & set(expected))
        if tuple(given[k]) != tuple(expected[k])
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{who}: the weights do not fit the architecture. missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}. "
            f"Check the architecture name and the weights file."
        )


KEY_MAPS = ("name", "order")


def match_keys(
    given: Mapping[str, V],
    expected: Mapping[str, Sequence[int]],
    key_map: str = "name",
    who: str = "weights",
    drop: Collection[str] = (),
) -> dict[str, V]:
    """Rename the file's tensors to the model's keys.

    `name` (default): by name, up to a common prefix ('module.', 'model.', ...). `order`: the
    i-th tensor of the file is the model's i-th state-dict entry, shapes checked one by one: for
    public files from other code bases whose names differ but whose layers line up (a torch file
    keeps its order; a safetensors file does not, so it is refused).
    `drop`: model keys left out of the result (a head of another size): by name, the file's
    tensors of those names; by order, the file's tensors at those keys' positions, unchecked.
    """
    drop = set(drop)
    if key_map == "name":
        return {k: v for k, v in strip_prefix(given, list(expected)).items() if k not in drop}
    if key_map != "order":
        raise ConfigError(f"{who}: key_map='{key_map}': choose one of {KEY_MAPS}")
    src, dst = list(given.items()), list(expected)
    if len(src) != len(dst):
        raise ConfigError(
            f"{who}: key_map=order needs as many tensors in the file ({len(src)}) as in the "
            f"model ({len(dst)}); check the architecture name, or use key_map=name"
        )
    out = {}
    for i, ((k, v), d) in enumerate(zip(src, dst, strict=True)):
        if d in drop:
            continue
        shape = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
        if shape != tuple(expected[d]):
            raise ConfigError(
                f"{who}: key_map=order: tensor #{i} '{k}' {shape} does not line up with the "
                f"model's '{d}' {tuple(expected[d])}: the layers are not in the model's order"
            )
        out[d] = v
    return out


def load_into(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    num_classes: int,
    who: str,
    key_map: str = "name",
) -> None:
    """Strictly load `sd` into `model`, with errors that say what does not fit."""
    expected = model.state_dict()
    sd = match_keys(sd, {k: v.shape for k, v in expected.items()}, key_map, who)
    check_fit(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in sd.items()},
        classifier_prefix(model),
        num_classes,
        who,
    )
    model.load_state_dict(sd, strict=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def init_from_file(
    model: nn.Module,
    path: str | os.PathLike,
    key_map: str = "name",
    who: str = "init weights",
) -> dict[str, Any]:
    """Initialise `model`'s body from a weights file, its classification head left as built.

    The head (`head_keys`: timm's classifier prefix(es)) keeps its fresh init for this model's
    classes, whatever size the file's head has. `key_map`: `name` (up to a common prefix such
    as 'model.') or `order` (the file's i-th tensor is the model's i-th state-dict key; a torch
    file, since safetensors keeps no order; the file's head tensors are those at the model's
    head positions). Every body tensor must be in the file with the model's shape.
    Returns what to record about the init: {'file', 'sha256', 'key_map'}.
    """
    sd = read_weights(path, who)
    if key_map == "order" and Path(path).suffix == ".safetensors":
        raise ConfigError(
            f"{who} '{path}': key_map=order needs a torch file (a safetensors file keeps no "
            f"tensor order); use key_map=name or the original torch file"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = head_keys(model)
    body = match_keys(sd, expected, key_map, f"{who} '{path}'", drop=head)
    missing = [k for k in expected if k not in body and k not in head]
    unexpected = [k for k in body if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {expected[k]}"
        for k, v in body.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        hint = " or key_map=order (tensors in the model's order)" if key_map == "name" else ""
        raise ConfigError(
            f"{who} '{path}' does not fit '{type(model).__name__}' (head {head[:2]} dropped): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches "
            f"{shapes[:5]}; check the architecture name and the file{hint}"
        )
    model.load_state_dict(body, strict=False)
    return {"file": str(path), "sha256": file_sha256(path), "key_map": key_map}


def export_teacher(
    model: nn.Module,
    meta: TeacherMeta,
    directory: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the weights (safetensors) and their metadata (`.json` beside them); returns the
    weights path: `path` if given, else `<directory>/<name>.safetensors`. With
    `overwrite=False` an existing teacher file is refused (`check_new_teacher_file`)."""
    if path is None:
        if directory is None:
            raise ValueError("export_teacher: give a directory or a path")
        path = Path(directory) / f"{meta.name}.safetensors"
    path = Path(path)
    if not overwrite:
        check_new_teacher_file(path, "teacher.weights")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta.sha256 = state_dict_hash(sd)
    if meta.mean is None or meta.std is None:
        meta.mean, meta.std = default_norm(model)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"amalgam": json.dumps(asdict(meta))})
    atomic_write_text(meta_path(path), json.dumps(asdict(meta), indent=2))
    return path


def check_new_teacher_file(path: str | os.PathLike, key: str) -> None:
    """Where a teacher is exported: a .safetensors path whose weights and metadata files do
    not exist yet (an existing teacher is replaced only with overwrite=true)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"{key}='{path}': a teacher is exported as safetensors; give a path ending in "
            f"'.safetensors' (e.g. {key}={path.with_suffix('.safetensors')})"
        )
    existing = [p for p in (path, meta_path(path)) if p.exists()]
    if existing:
        raise ConfigError(
            f"{key}='{path}': a teacher already exists there ({', '.join(map(str, existing))}); "
            f"training would replace it. Give another path ({key}=<new file>.safetensors), "
            "delete it, or add overwrite=true to replace it"
        )


def read_meta(weights: str | os.PathLike) -> dict[str, Any] | None:
    p = meta_path(weights)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher metadata '{p}' is not valid JSON ({e}); re-export it") from e


def resolve_meta(name: str, weights: str | os.PathLike, **overrides: Any) -> TeacherMeta:
    """Metadata from the sidecar JSON when it exists, with config values filling or overriding."""
    base = read_meta(weights) or {}
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**base, **given, "name": name}
    for key in ("arch", "classes"):
        if not merged.get(key):
            raise ConfigError(
                f"teacher '{name}': '{key}' is unknown: there is no metadata file "
                f"'{meta_path(weights)}', so set teacher.{key} in its config"
            )
    merged["classes"] = [str(c) for c in merged["classes"]]
    if len(merged["classes"]) == 0:
        raise ConfigError(f"teacher '{name}': empty class list")
    return TeacherMeta.from_dict(merged)


def build_teacher(meta: TeacherMeta, weights: str | os.PathLike, feature_indices=(-1,)) -> Backbone:
    """Rebuild a frozen teacher from its weights file; checks the head size and the hash."""
    who = f"teacher '{meta.name}' ({weights})"
    model = create_timm(
        meta.arch,
        len(meta.classes),
        meta.in_chans,
        key=f"teacher.{meta.name}.arch",
        **meta.model_kwargs,
    )
    sd = read_weights(weights, what=f"teacher '{meta.name}' weights")
    if meta.key_map == "order" and Path(weights).suffix == ".safetensors":
        raise ConfigError(f"{who}: key_map=order needs a torch file (safetensors has no order)")
    load_into(model, sd, len(meta.classes), who, meta.key_map)
    digest = module_hash(model)
    if meta.sha256 and digest != meta.sha256:
        raise ConfigError(
            f"{who}: weight hash {digest[:12]} differs from its metadata ({meta.sha256[:12]}): "
            f"the file changed after export; re-export it or delete the stale metadata"
        )
    meta.sha256 = digest
    teacher = Backbone(model, meta.in_chans, meta.input_size, meta.mean, meta.std, feature_indices)
    teacher.requires_grad_(False).eval()
    return teacher


# ------------------------------------------------------------------ teachers given in memory

MODULE_FIX = (
    "give a classifier from timm.create_model(..., num_classes=<its number of classes>) with "
    "its trained weights, and its class names in logit order: (model, [names])"
)


def check_module_teacher(name: str, model: Any, classes: Any) -> list[str]:
    """Refuse an in-memory teacher that cannot be used as given: not a timm classifier, weights
    not in float32, an empty or repeating class list, a head whose outputs are not one per
    class. Returns the class list (as given: names, or indices into the data's classes)."""
    key = f"teacher '{name}'"
    check_timm_module(model, key, MODULE_FIX, TEACHER_API)
    if isinstance(classes, str | bytes) or not isinstance(classes, Sequence):
        raise ConfigError(
            f"{key}: its classes must be a list of class names in logit order, got "
            f"{type(classes).__name__}"
        )
    classes = list(classes)
    if not classes:
        raise ConfigError(f"{key}: empty class list; give its class names in logit order")
    repeated = sorted({str(c) for c in classes if classes.count(c) > 1})
    if repeated:
        raise ConfigError(f"{key}: class names {repeated} repeat; give one name per logit")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise ConfigError(
            f"{key}: its weights are {', '.join(dtypes)}; give it in float32 (model.float()) "
            "and set teacher_dtype='bfloat16' for a half-precision teacher bank"
        )
    n = head_outputs(model)
    if n != len(classes):
        what = {
            0: "no classification head (built with num_classes=0)",
            None: "outputs amalgam cannot count (get_classifier() is no Linear or conv)",
        }.get(n, f"{n} outputs")
        raise ConfigError(
            f"{key}: its head has {what} but its class list has {len(classes)} classes: give "
            "one class name per output of its trained head, in logit order (or the model that "
            "was trained on these classes)"
        )
    return classes


def module_teacher(
    name: str,
    model: nn.Module,
    classes: Sequence[Any],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
    feature_indices: Sequence[int] = (-1,),
) -> tuple[Backbone, TeacherMeta]:
    """A teacher from a timm classifier in memory, and its metadata: the module itself is
    wrapped, frozen in place (eval mode, requires_grad False), never copied.

    Normalisation: `mean`/`std`, else the model's timm data config (its `pretrained_cfg`,
    `timm.data.resolve_model_data_config`). `input_size`: images are resized to it, else the
    teacher sees the data module's images at their size. `meta.sha256` hashes its weights now.
    """
    classes = [str(c) for c in check_module_teacher(name, model, classes)]
    in_chans = input_channels(model)
    teacher = Backbone(model, in_chans, input_size, mean, std, feature_indices)
    teacher.requires_grad_(False).eval()
    norm_mean, norm_std = teacher.norm
    meta = TeacherMeta(
        name=name,
        arch=timm_arch(model) or type(model).__name__,
        classes=classes,
        in_chans=in_chans,
        input_size=input_size,
        mean=norm_mean,
        std=norm_std,
        sha256=module_hash(model),
        extra={"given_as": "module"},
    )
    return teacher, meta


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "teacher"


def save_teacher_copy(
    model: nn.Module, meta: TeacherMeta, directory: str | os.PathLike
) -> Path | None:
    """Write an in-memory teacher as a teacher file: `<name>-<sha256[:12]>.safetensors` in
    `directory`, its metadata beside it (named by its hash, so a file already there holds the
    same weights), for a checkpoint naming it to be loaded back. None, and nothing written, when
    timm cannot rebuild the architecture from `meta.arch` alone (other constructor arguments)."""
    if not timm.is_model(meta.arch) or not rebuilds_from_name(
        model, meta.arch, len(meta.classes), meta.in_chans
    ):
        return None
    path = Path(directory) / f"{_safe_name(meta.name)}-{meta.sha256[:12]}.safetensors"
    copy = replace(meta, extra=dict(meta.extra))
    export_teacher(model, copy, path=path)  # atomic; the same bytes when the file was there
    if copy.sha256 != meta.sha256:
        raise ConfigError(f"teacher '{meta.name}': its weights changed while being saved")
    return path
