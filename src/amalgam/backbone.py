"""A timm classifier wrapped with its own input preprocessing, giving logits and feature maps."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from amalgam.errors import ConfigError


@dataclass
class ModelOutput:
    logits: torch.Tensor
    features: list[torch.Tensor]


SOURCES = ("hf-hub", "local-dir")
# the weight files timm looks for in a hub repo when the pretrained config names none
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin")
ARCH_FORMS = (
    "a timm name with an optional pretrained tag (resnet50, resnet50.a1_in1k), "
    "hf-hub:<org>/<repo> (hf-hub:timm/resnet50.a1_in1k) or local-dir:<dir> "
    "(a folder written by timm.models.save_for_hf)"
)


def split_arch(arch: str, key: str = "arch") -> tuple[str | None, str]:
    """(source, id): (None, timm name[.tag]), ('hf-hub', 'org/repo[@rev]'), ('local-dir', dir)."""
    try:
        return timm.models.parse_model_name(str(arch))
    except ValueError as e:
        raise ConfigError(f"{key}='{arch}': {e} An arch is {ARCH_FORMS}.") from e


def _split_rev(repo: str) -> tuple[str, str | None]:
    repo_id, _, rev = repo.partition("@")
    return repo_id, rev or None


def hub_cache_dir() -> str:
    """The Hugging Face hub cache that timm reads (HF_HOME/hub unless HF_HUB_CACHE is set)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _hub_cached(repo: str, filename: str) -> str | None:
    """The cached file's path, or None when `repo` (org/name[@rev]) does not hold it here."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, rev = _split_rev(repo)
    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=rev)
    return found if isinstance(found, str) else None


def _file_key(key: str) -> str:
    """Where a network of config key `key` takes an init file instead of pretrained weights."""
    prefix = key.rsplit(".", 1)[0] if "." in key else key
    return f"{prefix}.init_weights" if prefix == "teacher" else f"{prefix}.weights"


def _fetch_hint(repo: str, key: str, pretrained: bool = True) -> str:
    repo_id, rev = _split_rev(repo)
    r = f" --revision {rev}" if rev else ""
    init = f", or start from a file: {_file_key(key)}=<file>" if pretrained else ""
    return (
        f"fetch it on a machine online with `huggingface-cli download {repo_id}{r}` "
        f"(or `hf download {repo_id}{r}`) and copy that cache here, or set HF_HOME to a cache "
        f"that holds it{init}"
    )


def _not_cached(arch: str, key: str, repo: str, what: str, pretrained: bool) -> ConfigError:
    return ConfigError(
        f"{key}='{arch}': {what} of hub repo '{repo}' not in the local Hugging Face cache "
        f"'{hub_cache_dir()}' and HF_HUB_OFFLINE=1 forbids downloading; "
        f"{_fetch_hint(repo, key, pretrained)}"
    )


def read_arch_config(arch: str, key: str = "arch") -> dict[str, Any] | None:
    """The config.json of a hub or local-dir arch (None for a timm name)."""
    source, ident = split_arch(arch, key)
    if source is None:
        return None
    if source == "local-dir":
        path = Path(ident) / "config.json"
    else:
        cached = _hub_cached(ident, "config.json")
        if cached is None:
            return None
        path = Path(cached)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}='{arch}': '{path}' is not a readable timm config ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{key}='{arch}': '{path}' is not a timm config (not a JSON object)")
    return cfg


def _check_config_arch(arch: str, key: str, cfg: Mapping[str, Any] | None, where: str) -> None:
    if cfg is None:
        return
    name = cfg.get("architecture") or (cfg.get("pretrained_cfg") or {}).get("architecture")
    if not name or not timm.is_model(str(name)):
        raise ConfigError(
            f"{key}='{arch}': {where} names architecture '{name}', which this timm "
            f"({timm.__version__}) does not know: upgrade timm or fix config.json"
        )


def check_arch(arch: str, key: str = "arch") -> None:
    """Raise a ConfigError when `arch` names no model that can be built here (cheap: no weights).

    A timm name must be registered (close matches suggested) and its tag known; local-dir:<dir>
    must hold a config.json; hf-hub:<repo> must be in the local cache when HF_HUB_OFFLINE is set
    (online, the hub is asked when the model is built).
    """
    source, ident = split_arch(arch, key)
    if source is None:
        name, tag = timm.models.split_model_name_tag(ident)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f" Did you mean one of {close}?" if close else ""
            raise ConfigError(
                f"unknown architecture '{arch}' (config key '{key}'): it is not a timm model.{hint}"
                f" List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`"
                f" (an arch may also be hf-hub:<org>/<repo> or local-dir:<dir>)."
            )
        if tag:
            try:
                timm.models.get_pretrained_cfg(ident)
            except RuntimeError as e:
                tags = timm.list_pretrained(f"{name}.*")
                raise ConfigError(
                    f"{key}='{arch}': '{tag}' is not a pretrained tag of timm's '{name}'; "
                    f"its tags: {tags[:8]}{'...' if len(tags) > 8 else ''} (or drop the tag)"
                ) from e
        return
    if source == "local-dir":
        d = Path(ident)
        if not d.is_dir():
            raise ConfigError(
                f"{key}='{arch}': directory '{d}' not found; local-dir:<dir> names a folder "
                f"written by timm.models.save_for_hf (config.json + model.safetensors)"
            )
        if not (d / "config.json").is_file():
            raise ConfigError(
                f"{key}='{arch}': '{d}' has no config.json; local-dir:<dir> names a folder "
                f"written by timm.models.save_for_hf (config.json + model.safetensors)"
            )
        _check_config_arch(arch, key, read_arch_config(arch, key), f"'{d / 'config.json'}'")
        return
    repo_id, _ = _split_rev(ident)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"{key}='{arch}': a hub arch is hf-hub:<org>/<repo>, e.g. {HF_EXAMPLE}")
    if _hub_cached(ident, "config.json") is None:
        if hub_offline():
            raise _not_cached(arch, key, ident, "config.json", pretrained=False)
        return  # online: timm asks the hub when it builds the model
    _check_config_arch(arch, key, read_arch_config(arch, key), f"hub repo '{ident}' config.json")


HF_EXAMPLE = "hf-hub:timm/resnet18.a1_in1k"


def pretrained_source(arch: str, key: str = "arch") -> tuple[str, str, tuple[str, ...]]:
    """Where timm takes `arch`'s pretrained weights from, as (kind, location, files):
    ('hf-hub', 'org/repo', file names to try), ('local-dir', dir, ()), ('url', url, ()).
    Refuses an arch that has none."""
    source, ident = split_arch(arch, key)
    if source == "hf-hub":
        cfg = (read_arch_config(arch, key) or {}).get("pretrained_cfg") or {}
        name = cfg.get("hf_hub_filename")
        return "hf-hub", ident, (name,) if name else HUB_WEIGHT_FILES
    if source == "local-dir":
        return "local-dir", ident, ()
    cfg = timm.models.get_pretrained_cfg(ident)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if hub_id:
        name = getattr(cfg, "hf_hub_filename", None)
        return "hf-hub", hub_id, (name,) if name else HUB_WEIGHT_FILES
    if url:
        return "url", url, ()
    name, _ = timm.models.split_model_name_tag(ident)
    tags = [t for t in timm.list_pretrained(f"{name}.*") if t != ident]
    hint = f"pick a tag that has weights ({tags[:5]}), " if tags else ""
    raise ConfigError(
        f"{key}='{arch}': timm has no pretrained weights for '{ident}' (its pretrained config "
        f"names no hub repo and no url); {hint}set {key.rsplit('.', 1)[0]}.pretrained=false, "
        f"or start from a file: {_file_key(key)}=<file>"
    )


def check_pretrained(arch: str, key: str = "arch") -> None:
    """Refuse at once pretrained weights that cannot be loaded here (offline and not cached)."""
    source, ident = split_arch(arch, key)
    if source == "hf-hub" and hub_offline() and _hub_cached(ident, "config.json") is None:
        raise _not_cached(arch, key, ident, "the config and weights", pretrained=True)
    check_arch(arch, key)
    kind, where, files = pretrained_source(arch, key)
    if kind == "local-dir":
        d = Path(where)
        if not any(p.is_file() and p.name.endswith(LOCAL_WEIGHT_SUFFIXES) for p in d.iterdir()):
            raise ConfigError(
                f"{key}='{arch}': '{d}' holds no weights file (model.safetensors, "
                f"pytorch_model.bin, ...): write it with timm.models.save_for_hf(model, '{d}')"
            )
        return
    if not hub_offline():
        return  # online: timm downloads what is missing
    if kind == "hf-hub":
        if not any(_hub_cached(where, f) for f in files):
            raise _not_cached(arch, key, where, f"weights ({' or '.join(files)})", pretrained=True)
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(where)
    if not cached.is_file():
        raise ConfigError(
            f"{key}='{arch}': its pretrained weights come from the url {where} (no hub repo) and "
            f"HF_HUB_OFFLINE=1 forbids downloading; put that file at '{cached}' (torch's hub "
            f"cache), or start from a file: {_file_key(key)}=<file>"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:240]


def create_timm(
    arch: str,
    num_classes: int,
    in_chans: int = 3,
    key: str = "arch",
    *,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """`timm.create_model` for any arch form, with ConfigErrors that name the fix.

    `pretrained=True` loads timm's (or the hub repo's, or the local dir's) weights: the head is
    rebuilt for `num_classes` and the input conv adapted to `in_chans`, as timm does.
    """
    if pretrained:
        check_pretrained(arch, key)
    else:
        check_arch(arch, key)
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except ConfigError:
        raise
    except Exception as e:
        source, ident = split_arch(arch, key)
        if not pretrained and (source is None or not isinstance(e, OSError)):
            raise  # the constructor's own error (model_kwargs, ...): the caller words it
        kind, repo = pretrained_source(arch, key)[:2] if pretrained else (source, ident)
        what = "pretrained weights" if pretrained else "config"
        if kind == "hf-hub":
            what += f" of hub repo '{repo}' (Hugging Face cache '{hub_cache_dir()}')"
        fix = f"; {_fetch_hint(repo, key, pretrained)}" if kind == "hf-hub" else ""
        raise ConfigError(
            f"{key}='{arch}': timm could not load its {what} "
            f"({type(e).__name__}: {_first_line(e)}){fix}"
        ) from e


def offline_arch(arch: str, model: nn.Module, key: str = "arch") -> tuple[str, dict[str, Any]]:
    """(name, model_kwargs) with which `timm.create_model(name, pretrained=False, **kwargs)`
    rebuilds `model`'s architecture with no hub access (for metadata of exported networks).

    A timm name stays as is; hf-hub:timm/<name> becomes <name> when timm knows it; any other hub
    repo or local dir becomes its config.json's architecture plus its model_args (normalisation
    and input size are not part of the name: store them beside it).
    """
    source, ident = split_arch(arch, key)
    if source is None:
        return arch, {}
    if source == "hf-hub":
        repo_id, rev = _split_rev(ident)
        org, _, name = repo_id.partition("/")
        if org == "timm" and not rev and _known_timm_name(name):
            return name, {}
    cfg = read_arch_config(arch, key) or {}
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or pcfg.get("architecture")
    if not name:
        raise ConfigError(f"{key}='{arch}': its config names no architecture")
    args = {
        k: v
        for k, v in (cfg.get("model_args") or {}).items()
        if k not in ("num_classes", "in_chans", "pretrained_cfg", "pretrained_cfg_overlay")
    }
    return str(name), args


def _known_timm_name(name: str) -> bool:
    base, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        return False
    try:
        return timm.models.get_pretrained_cfg(name) is not None
    except RuntimeError:
        return False


def data_config(model: nn.Module) -> dict[str, Any]:
    """The input a model was pretrained for, as timm resolves it
    (`timm.data.resolve_model_data_config`): input_size (C, H, W), interpolation, crop_pct,
    crop_mode, mean, std."""
    cfg = timm.data.resolve_model_data_config(model)
    return {
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "interpolation": cfg.get("interpolation"),
        "crop_pct": cfg.get("crop_pct"),
        "crop_mode": cfg.get("crop_mode"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
    }


def default_norm(model: nn.Module) -> tuple[list[float], list[float]]:
    cfg = data_config(model)
    return cfg["mean"], cfg["std"]


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Every classification head's state-dict prefix (two for distilled ViTs: head, head_dist)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    return [classifier_prefix(model)]


def head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classification head(s), in state-dict order."""
    prefixes = tuple(p + "." for p in classifier_prefixes(model))
    return [k for k in model.state_dict() if k.startswith(prefixes)]


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
        if not features or self.feature_indices == []:
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

    @torch.no_grad()
    def stage_strides(self, image_size: int, channels: int) -> list[int]:
        """The stride of every map `feature_indices` can pick, in index order.

        timm's `feature_info` reductions where they name one stride per map of
        `forward_intermediates` (timm's convention); otherwise measured on a probe image of the
        data's size: the network's own input side (its `input_size`, else the image's) over
        the map's side. A module without `forward_intermediates` has one map, its last.
        """
        info = getattr(self.model, "feature_info", None)
        if hasattr(self.model, "forward_intermediates") and info is not None:
            try:
                reductions = [int(f["reduction"]) for f in info]
            except (TypeError, KeyError, ValueError):
                reductions = []
            if reductions:
                return reductions
        kept = self.feature_indices
        if hasattr(self.model, "forward_intermediates"):
            self.feature_indices = None  # timm: every intermediate
        try:
            shapes = self.feature_shapes(image_size, channels)
        finally:
            self.feature_indices = kept
        side = self.input_size or image_size
        return [max(1, round(side / s[1])) for s in shapes]


def match_stages(
    strides: Sequence[int], indices: Sequence[int], own: Sequence[int], who: str
) -> list[int]:
    """The indices of `who`'s maps at the strides of the maps `indices` picks from `strides`.

    The deepest map at each stride (a stage's output, not a block inside it), as a negative
    index. The last map always pairs with the last map (`[-1]` stays `[-1]`: a network of
    another total stride, or a ViT's tokens, still meets the student there).
    """
    out = []
    for i in indices:
        if not -len(strides) <= i < len(strides):
            raise ConfigError(
                f"feature_indices={i}: the student has {len(strides)} feature maps "
                f"(indices {-len(strides)}..{len(strides) - 1}); pick one of them"
            )
        if i in (-1, len(strides) - 1):
            out.append(-1)
            continue
        stride = strides[i]
        at = [j for j, s in enumerate(own) if s == stride]
        if not at:
            raise ConfigError(
                f"{who} has no feature map at stride {stride} (the student's map "
                f"feature_indices={i}); its maps' strides are {list(own)}: pick student stages "
                f"it has, or set {who}'s feature_indices"
            )
        out.append(at[-1] - len(own))
    return out


# ------------------------------------------------------------------ timm models given in memory

# what Backbone and the head checks call on a model handed over as a module
TEACHER_API = ("forward_features", "forward_head", "get_classifier")
STUDENT_API = (*TEACHER_API, "reset_classifier")


def check_timm_module(model: Any, key: str, fix: str, needs: Sequence[str] = STUDENT_API) -> None:
    """Refuse, in one line, an object that is not a timm classifier: a torch module with timm's
    `needs` methods (forward_features, forward_head, get_classifier, reset_classifier)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: a {type(model).__name__} is not a torch module; {fix}")
    missing = [m for m in needs if not callable(getattr(model, m, None))]
    if missing:
        raise ConfigError(
            f"{key}: a {type(model).__name__} is not a timm model (it has no "
            f"{', '.join(missing)}); {fix}"
        )


def head_outputs(model: nn.Module) -> int | None:
    """How many logits the model's classification head gives: the width of timm's
    `get_classifier()` (out_features of its last Linear, out_channels of a 1x1 conv), 0 for no
    head (timm's num_classes=0 leaves nn.Identity), else the model's `num_classes`; None when
    none of these tells."""
    head = model.get_classifier()
    if isinstance(head, tuple | list):  # distilled ViTs: (head, head_dist)
        head = head[0] if head else None
    if isinstance(head, nn.Identity):
        return 0
    if isinstance(head, nn.Module):
        for m in reversed(list(head.modules())):
            for attr in ("out_features", "out_channels"):
                n = getattr(m, attr, None)
                if isinstance(n, int):
                    return n
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution takes (timm's `in_chans`); else those of its
    pretrained config's input_size, else 3."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[0]) if size else 3


def timm_arch(model: nn.Module) -> str | None:
    """The timm architecture name in the model's `pretrained_cfg` (set by timm.create_model),
    None when it has none or this timm does not know it."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return str(name) if name and timm.is_model(str(name)) else None


def _signature(model: nn.Module) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    modules = [type(m).__name__ for m in model.modules()]
    return modules, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rebuilds_from_name(model: nn.Module, arch: str, num_classes: int, in_chans: int = 3) -> bool:
    """Whether `timm.create_model(arch, num_classes=, in_chans=)` (pretrained=False, no other
    arguments) builds `model`'s architecture: the same module classes in the same order and the
    same state-dict keys and shapes. Built on the meta device: no memory, no weights."""
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    try:
        with torch.device("meta"):
            fresh = timm.create_model(arch, **kwargs)
    except Exception:
        try:  # an init that the meta device does not run: build it for real
            fresh = timm.create_model(arch, **kwargs)
        except Exception:
            return False
    return _signature(fresh) == _signature(model)


def check_init(cfg: Mapping[str, Any], prefix: str, file_key: str = "weights") -> None:
    """`pretrained: true` and an init file both give initial weights: refuse the pair."""
    if cfg.get("pretrained") and cfg.get(file_key):
        raise ConfigError(
            f"{prefix}.pretrained=true and {prefix}.{file_key}='{cfg[file_key]}' both give the "
            f"initial weights: pick one ({prefix}.{file_key}=null for timm's pretrained weights, "
            f"or {prefix}.pretrained=false to start from the file)"
        )
