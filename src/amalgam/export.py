"""`python -m amalgam.export ckpt_path=...`: a student checkpoint in the timm / Hugging Face format.

Writes what `timm.models.save_for_hf` writes, `model.safetensors` and `config.json` (whose
`pretrained_cfg` holds the student's training preprocessing and whose `amalgam` entry holds its
tasks, provenance and amalgam's own preprocessing record), plus a model card `README.md` with
Hugging Face metadata, so that `timm.create_model("local-dir:<dir>", pretrained=True)` and
`timm.data.resolve_model_data_config` run the student with timm alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import timm
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from amalgam.backbone import Backbone, offline_arch
from amalgam.build import build_student
from amalgam.checkpoint import RunRecord, StudentCheckpoint, read_checkpoint
from amalgam.data.transforms import Preprocess
from amalgam.errors import ConfigError
from amalgam.launch import one_line_errors
from amalgam.report.run import HEADER, md_table, rows
from amalgam.results import problem
from amalgam.tasks import LabelSpace
from amalgam.teachers.io import load_into, state_dict_hash
from amalgam.trust import trust_list
from amalgam.utils import CONF_DIR, log, quiet_known_warnings

STUDENT_PREFIX = "student.model."
FORMAT = "amalgam-student/2"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FILES = {"weights": WEIGHTS, "config": CONFIG, "card": CARD}
CHANNEL_RULE = (
    "1-channel images are repeated to in_chans channels; with in_chans=1, multi-channel images "
    "are averaged over channels; any other mismatch is refused"
)
RESIZE = {"mode": "bilinear", "antialias": True, "align_corners": False}
TAGS = ["image-classification", "timm", "knowledge-amalgamation"]
# the Hugging Face hub data sets behind amalgam's built-in sources (the others have no one id)
HF_DATASETS = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
}
# what timm's pretrained config of the arch says about its source weights, not about this
# student (the license stays when the student started from those weights)
SOURCE_ONLY = (
    "tag",
    "license",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "description",
    "label_names",
    "label_descriptions",
    "label_offset",
    "test_input_size",
    "test_crop_pct",
    "test_pool_size",
)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# PIL resizes in 8 bits: timm's transform of a file may differ from amalgam's float resize by
# one grey level
GREY_LEVEL = 1 / 255


def student_state(ckpt: StudentCheckpoint, where: str) -> dict[str, torch.Tensor]:
    """The bare timm state dict of the student (`student.model.*` keys, prefix dropped)."""
    sd = {
        k[len(STUDENT_PREFIX) :]: v.detach().cpu().contiguous()
        for k, v in ckpt.state_dict.items()
        if k.startswith(STUDENT_PREFIX)
    }
    if not sd:
        raise ConfigError(
            f"checkpoint '{where}' holds no student weights ('{STUDENT_PREFIX}*' keys): "
            f"pass a checkpoint written by amalgam.amalgamate"
        )
    return sd


def rebuild_student(ckpt: StudentCheckpoint, where: str) -> tuple[Backbone, LabelSpace]:
    """The student Backbone (weights loaded strictly) and its label space; no teachers needed."""
    rec = ckpt.record
    lacking = [k for k in ("config", "label_space", "teachers") if not getattr(rec, k)]
    if lacking or "student" not in rec.config:
        raise ConfigError(
            f"checkpoint '{where}': its amalgam record lacks {lacking or ['config.student']}; "
            f"re-run amalgam.amalgamate to write a complete checkpoint"
        )
    space = LabelSpace.from_mapping(rec.label_space)
    # the init file and compile/channels_last only matter for training: every tensor is loaded
    scfg = {
        **rec.config["student"],
        "weights": None,
        "pretrained": False,
        "compile": False,
        "channels_last": False,
    }
    student = build_student(scfg, space.num_classes)
    load_into(student.model, student_state(ckpt, where), space.num_classes, f"student of '{where}'")
    return student.eval(), space


# ---------------------------------------------------------------- preprocessing


def file_transform(rec: RunRecord, where: str) -> dict[str, Any] | None:
    """timm mode's file transform as the run resolved it (None: square mode), checked."""
    ft = rec.preprocess
    if not ft:
        return None
    bad = f"checkpoint '{where}': its stored timm preprocessing {ft!r} is invalid"
    if not isinstance(ft, Mapping) or not _size(ft.get("image_size")):
        raise ConfigError(f"{bad} (no image_size); re-run amalgam.amalgamate to rewrite it")
    try:
        p = Preprocess.from_config({k: v for k, v in ft.items() if k != "image_size"})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{bad} ({e}); re-run amalgam.amalgamate to rewrite it") from e
    return {**p.as_dict(), "image_size": int(ft["image_size"])}


def norm_of(student: Backbone) -> tuple[list[float], list[float]]:
    """The student's mean and std, float32 noise dropped (0.485, not 0.48500001430511475)."""
    mean, std = student.norm
    return [float(f"{v:.7g}") for v in mean], [float(f"{v:.7g}") for v in std]


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def trained_size(cfg: Mapping[str, Any], ft: Mapping[str, Any] | None, where: str) -> int:
    """The side of the images the data module handed to the student (data.image_size)."""
    size = ft["image_size"] if ft else (cfg.get("data") or {}).get("image_size")
    if not _size(size):
        raise ConfigError(
            f"checkpoint '{where}': its stored config has no data.image_size ({size!r}); "
            f"re-run amalgam.amalgamate to write a complete checkpoint"
        )
    return int(size)


def timm_data_config(student: Backbone, ft: Mapping[str, Any] | None, size: int) -> dict[str, Any]:
    """The student's evaluation preprocessing as a timm data config (what timm's
    `resolve_model_data_config` returns): the model's input is `student.input_size` (the size
    the student resizes to) or the data's image size; timm mode keeps its interpolation, crop
    fraction and crop mode; square mode squashes the whole image (crop_pct 1.0, 'squash'),
    bilinear."""
    side = int(student.input_size or size)
    mean, std = norm_of(student)
    return {
        "input_size": (student.in_chans, side, side),
        "interpolation": ft["interpolation"] if ft else "bilinear",
        "crop_pct": float(ft["crop_pct"]) if ft else 1.0,
        "crop_mode": ft["crop_mode"] if ft else "squash",
        "mean": tuple(mean),
        "std": tuple(std),
    }


def timm_transform_note(ft: Mapping[str, Any] | None, size: int, side: int) -> str:
    """How timm's transform of this config relates to the run's own evaluation transform."""
    if size == side and ft:
        return "reproduces the training evaluation transform (the same timm transform)"
    if size == side:
        return (
            "reproduces the training evaluation transform (up to one grey level: PIL resizes "
            "in 8 bits, training in float)"
        )
    how = "squashed" if not ft else "resized and centre-cropped"
    return (
        f"approximates the training evaluation transform: training {how} files to {size} px, "
        f"then the student resized them to {side} px; timm goes to {side} px in one step"
    )


def preprocessing(
    student: Backbone, data_cfg: Mapping[str, Any], ft: Mapping[str, Any] | None, size: int
) -> dict[str, Any]:
    """What the data module and Backbone.preprocess do, as data: files to [0, 1] images
    (`file_transform` in timm mode, a squash to image_size in square mode), then channels,
    resize and normalise."""
    mean, std = norm_of(student)
    side = int(student.input_size or size)
    out = {
        "input_range": [0.0, 1.0],
        "layout": "NCHW float32",
        "order": ["channels", "resize", "normalize"],
        "in_chans": student.in_chans,
        "channel_rule": CHANNEL_RULE,
        "input_size": student.input_size,
        "resize": {**RESIZE, "when": "only if H or W differs from input_size (null: never)"},
        "mean": mean,
        "std": std,
        "trained_on": {
            "image_size": size,
            "channels": data_cfg.get("channels"),
            "mode": "timm" if ft else "square",
        },
        "pil_mode": "L" if student.in_chans == 1 else "RGB",
        "timm_transform": timm_transform_note(ft, size, side),
    }
    if ft:  # timm mode: how files were turned into images before the model
        out["file_transform"] = dict(ft)
    return out


# ---------------------------------------------------------------- the config's amalgam entry


def method_of(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, loss weights, other settings) from the record's `method` config."""
    m = dict(cfg.get("method") or {})
    name = str(m.get("name") or str(m.get("_target_", "?")).rsplit(".", 1)[-1])
    weights = dict(m.get("weights") or {})
    rest = {k: v for k, v in m.items() if k not in {"_target_", "_partial_", "name", "weights"}}
    return name, weights, rest


def rule_of(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(target rule name, settings) from the record's `targets` config (none: Concat)."""
    t = dict(cfg.get("targets") or {})
    name = str(t.get("_target_") or "Concat").rsplit(".", 1)[-1]
    return name, {k: v for k, v in t.items() if k not in {"_target_", "_partial_"}}


def data_sources(cfg: Mapping[str, Any]) -> list[str]:
    """The built-in sources (`amalgam.data.sources.<name>`) of data.source, parts of a concat."""
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, Mapping):
            target = v.get("_target_")
            if isinstance(target, str) and target.startswith("amalgam.data.sources."):
                name = target.rsplit(".", 1)[-1]
                if name != "concat" and name not in found:
                    found.append(name)
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk((cfg.get("data") or {}).get("source"))
    return found


def describe(
    name: str,
    ckpt: StudentCheckpoint,
    ckpt_path: Path,
    student: Backbone,
    space: LabelSpace,
    sha256: str,
    pre: dict[str, Any],
) -> dict[str, Any]:
    """config.json's `amalgam` entry: tasks, amalgam's preprocessing record, provenance."""
    rec = ckpt.record
    cfg = rec.config
    method, weights, _ = method_of(cfg)
    # a name timm rebuilds with no hub access (hf-hub:timm/<name> -> <name>, ...)
    arch, arch_kwargs = offline_arch(str(cfg["student"]["arch"]), student.model, "student.arch")
    return {
        "format": FORMAT,
        "name": name,
        "weights": WEIGHTS,
        "sha256": sha256,
        "arch": arch,
        "in_chans": student.in_chans,
        "model_kwargs": {**arch_kwargs, **dict(cfg["student"].get("model_kwargs") or {})},
        "tasks": {
            t.name: {"classes": list(t.classes), "indices": space.indices(t.name)}
            for t in space.tasks
        },
        "preprocessing": pre,
        "source": {
            "checkpoint": str(ckpt_path.resolve()),
            "epoch": ckpt.epoch,
            "global_step": ckpt.global_step,
            "method": method,
            "loss_weights": weights,
            "target_rule": rule_of(cfg)[0],
            "seed": cfg.get("seed"),
            "data": data_sources(cfg),
            "student_init": student_init(cfg["student"]),
            "wandb_id": rec.wandb_id,
            "teachers": {
                n: {"arch": t["meta"]["arch"], "sha256": t["meta"]["sha256"], "path": t["path"]}
                for n, t in rec.teachers.items()
            },
        },
    }


def student_init(scfg: Mapping[str, Any]) -> str:
    if scfg.get("weights"):
        return f"file {scfg['weights']}"
    return f"timm pretrained {scfg['arch']}" if scfg.get("pretrained") else "random"


# ---------------------------------------------------------------- results.json


def find_results(ckpt_path: Path, space: LabelSpace) -> dict[str, Any] | None:
    """The results.json of this very checkpoint in its run dir (or run dir/eval), if any;
    one that names this checkpoint but is malformed is refused."""
    run_dir = ckpt_path.parent.parent
    for p in (run_dir / "results.json", run_dir / "eval" / "results.json"):
        if not p.is_file():
            continue
        try:
            res = json.loads(p.read_text())
            same = isinstance(res, dict) and os.path.samefile(
                str(res.get("checkpoint", "")), ckpt_path
            )
        except (OSError, ValueError, TypeError):
            continue
        if same:
            check_results(res, p, space)
            return res
    return None


def check_results(res: dict[str, Any], path: Path, space: LabelSpace) -> None:
    """A results.json that names this checkpoint must fit the schema and be of its tasks."""
    tasks = res.get("tasks")
    ok = (
        problem(res) is None
        and sorted(tasks) == sorted(space.names)
        and all(isinstance(t.get("classes"), list) for t in tasks.values())
    )
    if not ok:
        raise ConfigError(
            f"'{path}' names this checkpoint but is not a results.json of its tasks "
            f"{space.names} (accuracies in [0, 1] per task and joint): re-run python -m "
            f"amalgam.evaluate ckpt_path={res.get('checkpoint')}, or delete it"
        )


# ---------------------------------------------------------------- the model card


def cell(v: Any) -> str:
    """A markdown table cell: pipes escaped, one line."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    return md_table([cell(h) for h in header], [[cell(v) for v in r] for r in body])


def pct(v: float) -> float:
    return round(100 * float(v), 2)


def card_metadata(
    name: str, config: Mapping[str, Any], results: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The model card's YAML front matter (Hugging Face model card metadata)."""
    am = config["amalgam"]
    sources = am["source"]["data"]
    meta: dict[str, Any] = {"library_name": "timm", "tags": list(TAGS)}
    if config["pretrained_cfg"].get("license"):
        meta["license"] = config["pretrained_cfg"]["license"]
    datasets = [HF_DATASETS[s] for s in sources if s in HF_DATASETS]
    if datasets:
        meta["datasets"] = datasets
    if results:
        data = "+".join(sources) or "test set"
        dtype = datasets[0] if len(datasets) == 1 and len(sources) == 1 else data
        n = sum(len(t["classes"]) for t in results["tasks"].values())
        metrics = [
            {"type": "accuracy", "value": pct(t["student_acc"]), "name": f"{task} accuracy"}
            for task, t in results["tasks"].items()
        ]
        metrics.append(
            {
                "type": "accuracy",
                "value": pct(results["joint"]["student_acc"]),
                "name": f"joint accuracy ({n} classes)",
            }
        )
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": data, "type": dtype, "split": "test"},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return meta


def file_transform_text(ft: Mapping[str, Any]) -> str:
    """timm mode's evaluation transform, in words and as timm code."""
    size, pct_ = ft["image_size"], ft["crop_pct"]
    return (
        f"resize the shorter side to {math.floor(size / pct_)} ({ft['interpolation']}), crop "
        f"the centre {size}x{size}, to [0, 1] (timm: `create_transform({size}, "
        f"crop_pct={pct_}, interpolation='{ft['interpolation']}', crop_mode='{ft['crop_mode']}')`"
        " without its Normalize)"
    )


def augmentation_text(cfg: Mapping[str, Any], ft: Mapping[str, Any] | None) -> str:
    data = cfg.get("data") or {}
    if not data.get("augment"):
        return "none (data.augment=false)"
    if not ft:
        flip = ", horizontal flip" if data.get("hflip", True) else ""
        return f"reflect-pad by 4 and crop back{flip}, on the batch"
    extra = [f"{k}={ft[k]}" for k in ("color_jitter", "auto_augment", "re_prob") if ft.get(k)]
    return (
        f"RandomResizedCrop({ft['image_size']}, scale={ft['scale']}, ratio="
        f"{[round(r, 4) for r in ft['ratio']]}), horizontal flip p={ft['hflip']}"
        + (", " + ", ".join(extra) if extra else "")
    )


def preprocessing_lines(config: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    pre = config["amalgam"]["preprocessing"]
    pc = config["pretrained_cfg"]
    ft = pre.get("file_transform")
    size, chans = pre["trained_on"]["image_size"], pre["trained_on"]["channels"]
    side = pc["input_size"][-1]
    files = (
        file_transform_text(ft)
        if ft
        else f"squash the whole image to {size}x{size} (bilinear, antialiased), to [0, 1]"
    )
    resize = (
        f"resize to {side}x{side} (bilinear, antialiased)"
        if pre["input_size"] and pre["input_size"] != size
        else "no further resize"
    )
    grey = pre["in_chans"] == 1 or chans == 1
    return [
        "Evaluation (and the teachers' view of each image), in this order:",
        "",
        f"1. image files: {files};",
        f"2. channels ({pre['in_chans']}; the data had {chans}): {pre['channel_rule']};",
        f"3. {resize};",
        f"4. normalise: (x - mean) / std, mean {pre['mean']}, std {pre['std']}.",
        "",
        f"Training augmentation: {augmentation_text(cfg, ft)}.",
        "",
        "In timm's terms (`pretrained_cfg` of config.json, what "
        "`timm.data.resolve_model_data_config` returns): "
        + ", ".join(
            f"{k} {tuple(pc[k]) if isinstance(pc[k], list) else pc[k]}"
            for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
        )
        + f". Its `create_transform` {pre['timm_transform']}."
        + (
            " The images were grey: open files as `L` for a 1-channel model, as "
            "`.convert('L').convert('RGB')` for a 3-channel one (PIL weighs R, G, B "
            "0.299/0.587/0.114 where training averaged them; equal on grey files)."
            if grey
            else ""
        ),
    ]


def model_card(
    name: str, config: Mapping[str, Any], ckpt: StudentCheckpoint, results: Mapping[str, Any] | None
) -> str:
    """README.md: Hugging Face metadata, results, use, classes, preprocessing, teachers, method."""
    rec = ckpt.record
    cfg = rec.config
    am = config["amalgam"]
    arch, src = config["architecture"], am["source"]
    method, weights, rest = method_of(cfg)
    rule, rule_cfg = rule_of(cfg)
    pre = am["preprocessing"]
    grey_data = pre["trained_on"]["channels"] == 1 and pre["in_chans"] != 1
    convert = 'convert("L").convert("RGB")' if grey_data else f'convert("{pre["pil_mode"]}")'
    first = next(iter(am["tasks"]))
    front = yaml.safe_dump(card_metadata(name, config, results), sort_keys=False)
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# {name}",
        "",
        f"A `{arch}` image classifier over {config['num_classes']} classes, the union of the "
        f"tasks of {len(rec.teachers)} teachers, trained without labels by knowledge "
        f"amalgamation (amalgam, method `{method}`, target rule `{rule}`).",
        "",
        "## Results (test set)",
        "",
    ]
    if results:
        lines += [
            "Accuracy in %; a task's accuracy is the argmax over its own classes (its teacher "
            "alone), the joint one over all classes (the teachers' ensemble by the target rule).",
            "",
            *table(HEADER, rows(dict(results))),
        ]
    else:
        lines.append(
            "No results.json of this checkpoint in its run dir; run "
            "`python -m amalgam.evaluate ckpt_path=...` and export again to include them."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import json",
        "",
        "import timm",
        "import torch",
        "from PIL import Image",
        "",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()',
        f'# once uploaded: timm.create_model("hf-hub:<user>/{name}", pretrained=True)',
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        f'image = Image.open("image.png").{convert}',
        "with torch.no_grad():",
        "    logits = model(transform(image)[None])",
        'labels = model.pretrained_cfg["label_names"]',
        "print(labels[logits.argmax(1).item()])",
        "# within one teacher's task: the argmax over its classes",
        f'task = json.load(open("<this folder>/config.json"))["amalgam"]["tasks"]["{first}"]',
        'print(task["classes"][logits[0, task["indices"]].argmax().item()])',
        "```",
        "",
        "## Classes",
        "",
        "Logit `i` scores `label_names[i]`; each teacher's task is a slice of them "
        "(`amalgam.tasks` in config.json):",
        "",
        *table(
            ("task", "logits", "classes"),
            [
                (t, ", ".join(map(str, v["indices"])), ", ".join(v["classes"]))
                for t, v in am["tasks"].items()
            ],
        ),
        "",
        "## Preprocessing",
        "",
        *preprocessing_lines(config, cfg),
        "",
        "## Teachers",
        "",
        *table(
            ("teacher", "arch", "classes", "test acc %", "sha256"),
            [
                (
                    n,
                    f"`{t['meta']['arch']}`",
                    ", ".join(map(str, t["meta"]["classes"])),
                    "-"
                    if t["meta"].get("test_acc") is None
                    else f"{100 * t['meta']['test_acc']:.2f}",
                    f"`{t['meta']['sha256']}`",
                )
                for n, t in rec.teachers.items()
            ],
        ),
        "",
        "## Method",
        "",
        f"- method: `{method}`; loss weights: "
        + (", ".join(f"{k} {v}" for k, v in weights.items()) or "-"),
        f"- method settings: {', '.join(f'{k}={v}' for k, v in rest.items()) or '-'}",
        f"- target rule (the soft targets over the union from the teachers' outputs): `{rule}`"
        + (f" ({', '.join(f'{k}={v}' for k, v in rule_cfg.items())})" if rule_cfg else ""),
        f"- student init: {src['student_init']}; data: {', '.join(src['data']) or '-'}",
        f"- seed: {src['seed']}; epoch {src['epoch']}, global step {src['global_step']}",
        f"- source checkpoint: `{src['checkpoint']}`",
        f"- weights sha256 (amalgam state-dict hash): `{am['sha256']}`",
    ]
    if src.get("wandb_id"):
        lines.append(f"- wandb run id: `{src['wandb_id']}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing and checking


def export_pretrained_cfg(cfg: Mapping[str, Any], keep_license: bool) -> dict[str, Any]:
    """The arch's pretrained config less what describes its source weights."""
    drop = set(SOURCE_ONLY) - ({"license"} if keep_license else set())
    return {k: v for k, v in cfg.items() if k not in drop}


def save_hf(
    student: Backbone,
    out: Path,
    classes: Sequence[str],
    info: dict[str, Any],
    data_config: dict[str, Any],
    keep_license: bool,
) -> None:
    """`timm.models.save_for_hf`: model.safetensors + config.json with this preprocessing."""
    model = student.model
    model.pretrained_cfg = export_pretrained_cfg(model.pretrained_cfg, keep_license)
    try:
        timm.models.save_for_hf(
            model,
            str(out),
            model_config={"label_names": list(classes), "amalgam": info},
            safe_serialization=True,
            data_config=data_config,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"timm cannot write this student in its format ({type(e).__name__}: {e}); set "
            f"student.input_size to a size the architecture takes and re-run, or report this"
        ) from e


def same_data_config(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    return (
        tuple(got["input_size"]) == tuple(want["input_size"])
        and got["interpolation"] == want["interpolation"]
        and math.isclose(got["crop_pct"], want["crop_pct"])
        and got["crop_mode"] == want["crop_mode"]
        and all(
            len(got[k]) == len(want[k])
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got[k], want[k]))
            for k in ("mean", "std")
        )
    )


def check_loads(
    d: Path, student: Backbone, data_config: dict[str, Any], size: int, chans: int
) -> None:
    """timm alone (`local-dir:`) must rebuild the student, give its logits and its
    preprocessing."""
    model = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    x = torch.rand(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(x, features=False).logits
        got = model(student.preprocess(x))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        diff = (got - want).abs().max() if got.shape == want.shape else got.shape
        raise ConfigError(
            f"the export in '{d}' loads in timm but its logits differ from the student's "
            f"({diff}); report this with the checkpoint"
        )
    resolved = timm.data.resolve_model_data_config(model)
    if not same_data_config(resolved, data_config):
        raise ConfigError(
            f"the export in '{d}' loads in timm but timm resolves its preprocessing to "
            f"{resolved}, not the training one {data_config}; report this with the checkpoint"
        )


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def export_student(
    ckpt_path: str | Path | None,
    out_dir: str | Path | None = None,
    name: str = "student",
    verify: bool = True,
    trust_targets: Sequence[str] = (),
) -> dict[str, Path]:
    """Write model.safetensors, config.json and README.md (default dir: `<run dir>/export`)."""
    quiet_known_warnings()
    if not ckpt_path:
        raise ConfigError(
            "ckpt_path is required: python -m amalgam.export "
            "ckpt_path=<run dir>/checkpoints/final.ckpt"
        )
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"name '{name}' must be a plain model name such as name=fashion_student (letters, "
            f"digits, '-', '_', '.'; at most 96)"
        )
    ckpt_path = Path(ckpt_path)
    where = str(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, trust_targets, "ckpt_path")
    student, space = rebuild_student(ckpt, where)
    rec = ckpt.record
    cfg = rec.config
    ft = file_transform(rec, where)
    size = trained_size(cfg, ft, where)
    results = find_results(ckpt_path, space)
    data_config = timm_data_config(student, ft, size)
    data_cfg = dict(cfg.get("data") or {})
    sd = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
    pre = preprocessing(student, data_cfg, ft, size)
    info = describe(name, ckpt, ckpt_path, student, space, state_dict_hash(sd), pre)
    out = Path(out_dir) if out_dir else ckpt_path.parent.parent / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise ConfigError(
            f"out_dir '{out}' cannot be written ({type(e).__name__}: {e.strerror or e}); set "
            f"out_dir to a directory you can write"
        ) from e
    paths = {k: out / f for k, f in FILES.items()}
    try:
        keep_license = bool(cfg["student"].get("pretrained")) and not cfg["student"].get("weights")
        save_hf(student, tmp, space.classes, info, data_config, keep_license)
        config = json.loads((tmp / CONFIG).read_text())
        if verify:
            chans = int(data_cfg.get("channels") or student.in_chans)
            check_loads(tmp, student, data_config, size, chans)
        (tmp / CARD).write_text(model_card(name, config, ckpt, results))
        # save_file makes the weights 0600: give them the mode the other files got (umask)
        os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode & 0o777)
        for f in FILES.values():  # each file old or new, never torn
            _fsync(tmp / f)
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the student to %s", out)
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    paths = export_student(
        cfg.get("ckpt_path"),
        cfg.get("out_dir"),
        cfg.get("name") or "student",
        cfg.verify,
        trust_list(OmegaConf.to_container(cfg.trust_targets) if cfg.get("trust_targets") else []),
    )
    for p in paths.values():
        print(p)


if __name__ == "__main__":
    main()
