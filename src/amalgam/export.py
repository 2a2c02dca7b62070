"""`python -m amalgam.export ckpt_path=...`: a student checkpoint as plain timm weights + card.

Writes `<name>.safetensors` (the bare timm state dict), `<name>.json` (architecture, classes,
preprocessing) and `<name>.md` (a model card) so the student runs with timm alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save

from amalgam.backbone import Backbone, offline_arch
from amalgam.build import build_student
from amalgam.evaluate import read_checkpoint
from amalgam.report.run import HEADER, atomic_write, md_table, rows
from amalgam.tasks import ConfigError, LabelSpace
from amalgam.teachers.io import load_into, state_dict_hash
from amalgam.trust import trust_list
from amalgam.utils import CONF_DIR, log, quiet_known_warnings

STUDENT_PREFIX = "student.model."
FORMAT = "amalgam-student/1"
CHANNEL_RULE = (
    "1-channel images are repeated to in_chans channels; with in_chans=1, multi-channel images "
    "are averaged over channels; any other mismatch is refused"
)
RESIZE = {"mode": "bilinear", "antialias": True, "align_corners": False}


def student_state(ckpt: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The bare timm state dict of the student (`student.model.*` keys, prefix dropped)."""
    sd = {
        k[len(STUDENT_PREFIX) :]: v.detach().cpu().contiguous()
        for k, v in ckpt["state_dict"].items()
        if k.startswith(STUDENT_PREFIX)
    }
    if not sd:
        raise ConfigError(
            f"checkpoint '{where}' holds no student weights ('{STUDENT_PREFIX}*' keys): "
            f"pass a checkpoint written by amalgam.amalgamate"
        )
    return sd


def rebuild_student(ckpt: dict[str, Any], where: str) -> tuple[Backbone, LabelSpace]:
    """The student Backbone (weights loaded strictly) and its label space; no teachers needed."""
    rec = ckpt["amalgam"]
    lacking = [k for k in ("config", "label_space", "teachers") if not rec.get(k)]
    if lacking or "student" not in rec["config"]:
        raise ConfigError(
            f"checkpoint '{where}': its amalgam record lacks {lacking or ['config.student']}; "
            f"re-run amalgam.amalgamate to write a complete checkpoint"
        )
    space = LabelSpace.from_mapping(rec["label_space"])
    # the init file and compile/channels_last only matter for training: every tensor is loaded
    scfg = {
        **rec["config"]["student"],
        "weights": None,
        "pretrained": False,
        "compile": False,
        "channels_last": False,
    }
    student = build_student(scfg, space.num_classes)
    load_into(student.model, student_state(ckpt, where), space.num_classes, f"student of '{where}'")
    return student.eval(), space


def preprocessing(student: Backbone, data_cfg: dict[str, Any]) -> dict[str, Any]:
    """What Backbone.preprocess does, as data: channels, then resize, then normalise."""
    mean, std = student.norm
    return {
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
            "image_size": data_cfg.get("image_size"),
            "channels": data_cfg.get("channels"),
        },
    }


def method_of(cfg: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, loss weights, other settings) from the record's `method` config."""
    m = dict(cfg.get("method") or {})
    name = str(m.get("name") or str(m.get("_target_", "?")).rsplit(".", 1)[-1])
    weights = dict(m.get("weights") or {})
    rest = {k: v for k, v in m.items() if k not in {"_target_", "_partial_", "name", "weights"}}
    return name, weights, rest


def find_results(ckpt_path: Path) -> dict[str, Any] | None:
    """The results.json of this very checkpoint in its run dir (or run dir/eval), if any."""
    run_dir = ckpt_path.parent.parent
    for p in (run_dir / "results.json", run_dir / "eval" / "results.json"):
        if not p.is_file():
            continue
        try:
            res = json.loads(p.read_text())
            same = os.path.samefile(res.get("checkpoint", ""), ckpt_path)
        except (OSError, ValueError):
            continue
        if same and "tasks" in res and "joint" in res:
            return res
    return None


def describe(
    name: str,
    ckpt: dict[str, Any],
    ckpt_path: Path,
    student: Backbone,
    space: LabelSpace,
    sha256: str,
) -> dict[str, Any]:
    """The `<name>.json` sidecar: how to build the model and feed it."""
    rec = ckpt["amalgam"]
    cfg = rec["config"]
    method, weights, _ = method_of(cfg)
    # a name timm rebuilds with no hub access (hf-hub:timm/<name> -> <name>, ...)
    arch, arch_kwargs = offline_arch(str(cfg["student"]["arch"]), student.model, "student.arch")
    pre = preprocessing(student, dict(cfg.get("data") or {}))
    if rec.get("preprocess"):  # timm mode: how files were turned into images before the model
        pre["file_transform"] = dict(rec["preprocess"])
    return {
        "format": FORMAT,
        "name": name,
        "weights": f"{name}.safetensors",
        "sha256": sha256,
        "arch": arch,
        "num_classes": space.num_classes,
        "in_chans": student.in_chans,
        "model_kwargs": {**arch_kwargs, **dict(cfg["student"].get("model_kwargs") or {})},
        "classes": list(space.classes),
        "tasks": {
            t.name: {"classes": list(t.classes), "indices": space.indices(t.name)}
            for t in space.tasks
        },
        "preprocessing": pre,
        "source": {
            "checkpoint": str(ckpt_path.resolve()),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "method": method,
            "loss_weights": weights,
            "seed": cfg.get("seed"),
            "wandb_id": rec.get("wandb_id"),
            "teachers": {
                n: {"arch": t["meta"]["arch"], "sha256": t["meta"]["sha256"], "path": t["path"]}
                for n, t in rec["teachers"].items()
            },
        },
    }


def file_transform_text(ft: dict[str, Any]) -> str:
    """timm mode's evaluation transform, in words and as timm code."""
    size, pct = ft["image_size"], ft["crop_pct"]
    return (
        f"resize the shorter side to {int(size / pct)} ({ft['interpolation']}), crop the centre "
        f"{size}x{size}, to [0, 1] (timm: `create_transform({size}, crop_pct={pct}, "
        f"interpolation='{ft['interpolation']}', crop_mode='{ft['crop_mode']}')` without its "
        "Normalize)"
    )


def model_card(info: dict[str, Any], ckpt: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The `<name>.md` model card."""
    rec = ckpt["amalgam"]
    name, arch, pre = info["name"], info["arch"], info["preprocessing"]
    method, weights, rest = method_of(rec["config"])
    src = info["source"]
    size = pre["input_size"]
    resize = (
        f"to {size}x{size}, bilinear with antialias, align_corners=False (only if the size differs)"
        if size
        else f"none (trained on {pre['trained_on']['image_size']}px images)"
    )
    lines = [
        f"# {name}: amalgamated `{arch}` student",
        "",
        f"A `{arch}` classifier over {info['num_classes']} classes, trained without labels by "
        f"knowledge amalgamation (method `{method}`) from {len(rec['teachers'])} teachers.",
        "",
        "## Use (timm alone)",
        "",
        "```python",
        "import json",
        "",
        "import timm",
        "",
        f'info = json.load(open("{name}.json"))',
        "model = timm.create_model(",
        '    info["arch"], num_classes=info["num_classes"], in_chans=info["in_chans"],',
        f'    checkpoint_path="{info["weights"]}", **info["model_kwargs"],',
        ").eval()",
        "```",
        "",
        "Inputs (`preprocessing` in the JSON; docs/EXPORT.md has the code), in this order:",
        "",
        *(
            [
                "0. image files: " + file_transform_text(pre["file_transform"]) + ";",
            ]
            if pre.get("file_transform")
            else []
        ),
        "1. float NCHW images in [0, 1];",
        f"2. channels ({pre['in_chans']}): {pre['channel_rule']};",
        f"3. resize: {resize};",
        f"4. normalise: (x - mean) / std, mean {pre['mean']}, std {pre['std']}.",
        "",
        "Logit `i` scores class `classes[i]`: " + ", ".join(info["classes"]) + ".",
        "",
        "## Teachers",
        "",
        *md_table(
            ("teacher", "arch", "classes", "test acc", "sha256"),
            [
                (
                    n,
                    f"`{t['meta']['arch']}`",
                    ", ".join(t["meta"]["classes"]),
                    "-"
                    if t["meta"].get("test_acc") is None
                    else f"{100 * t['meta']['test_acc']:.2f}",
                    f"`{t['meta']['sha256']}`",
                )
                for n, t in rec["teachers"].items()
            ],
        ),
        "",
        "## Training",
        "",
        f"- method: `{method}`; loss weights: "
        + (", ".join(f"{k} {v}" for k, v in weights.items()) or "-"),
        f"- method settings: {', '.join(f'{k}={v}' for k, v in rest.items()) or '-'}",
        f"- seed: {src['seed']}; epoch {src['epoch']}, global step {src['global_step']}",
        f"- source checkpoint: `{src['checkpoint']}`",
        f"- weights sha256 (amalgam state-dict hash): `{info['sha256']}`",
    ]
    if src.get("wandb_id"):
        lines.append(f"- wandb run id: `{src['wandb_id']}`")
    lines += ["", "## Results (test set)", ""]
    if results:
        lines += [*md_table(HEADER, rows(results))]
    else:
        lines.append(
            "No results.json of this checkpoint in its run dir; run "
            "`python -m amalgam.evaluate ckpt_path=...` and export again to include them."
        )
    return "\n".join(lines) + "\n"


def check_loads(path: Path, info: dict[str, Any], student: Backbone) -> None:
    """timm alone must load the file strictly and give the student's logits."""
    model = timm.create_model(
        info["arch"],
        num_classes=info["num_classes"],
        in_chans=info["in_chans"],
        checkpoint_path=str(path),
        **info["model_kwargs"],
    ).eval()
    size = info["preprocessing"]["trained_on"]["image_size"] or student.input_size or 224
    chans = info["preprocessing"]["trained_on"]["channels"] or student.in_chans
    x = torch.rand(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(x, features=False).logits
        got = model(student.preprocess(x))
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ConfigError(
            f"the exported '{path}' loads in timm but its logits differ from the student's "
            f"(max diff {(got - want).abs().max():.2e}); report this with the checkpoint"
        )


def export_student(
    ckpt_path: str | Path | None,
    out_dir: str | Path | None = None,
    name: str = "student",
    verify: bool = True,
    trust_targets: Sequence[str] = (),
) -> dict[str, Path]:
    """Write `<name>.safetensors`, `.json` and `.md` (default dir: `<run dir>/export`)."""
    quiet_known_warnings()
    if not ckpt_path:
        raise ConfigError(
            "ckpt_path is required: python -m amalgam.export "
            "ckpt_path=<run dir>/checkpoints/final.ckpt"
        )
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"name '{name}' must be a plain file name such as name=student")
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, trust_targets)
    student, space = rebuild_student(ckpt, str(ckpt_path))
    sd = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
    out = Path(out_dir) if out_dir else ckpt_path.parent.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("safetensors", "json", "md")}
    info = describe(name, ckpt, ckpt_path, student, space, state_dict_hash(sd))
    # temp name ends in .safetensors so timm reads it in the check; bytes written by hand so
    # the file gets the usual umask mode (save_file makes it 0600)
    tmp = out / f".{name}.tmp.safetensors"
    try:
        tmp.write_bytes(save(sd, metadata={"format": FORMAT, "amalgam": json.dumps(info)}))
        if verify:
            check_loads(tmp, info, student)
        os.replace(tmp, paths["safetensors"])
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(paths["json"], json.dumps(info, indent=2))
    atomic_write(paths["md"], model_card(info, ckpt, find_results(ckpt_path)))
    log.info("exported the student to %s", paths["safetensors"])
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
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
