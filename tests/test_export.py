"""Student export: timm alone, with the JSON's preprocessing, reproduces the student's logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from amalgam.amalgamate import amalgamate
from amalgam.evaluate import load_amalgamation
from amalgam.export import export_student
from amalgam.tasks import ConfigError
from conftest import make_cfg

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


def preprocess(x: torch.Tensor, pre: dict) -> torch.Tensor:
    """The JSON's preprocessing with plain torch (the code shown in docs/EXPORT.md)."""
    c = pre["in_chans"]
    if x.shape[1] != c:
        x = x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    size = pre["input_size"]
    if size and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def run_amalgamation(tiny_teachers: Path, out: Path, extra: list[str]) -> Path:
    cfg = make_cfg(
        "amalgamate", ["experiment=tiny", "debug=fast_dev_run", *QUIET, *extra], tiny_teachers, out
    )
    amalgamate(cfg)
    return out / "checkpoints" / "final.ckpt"


@pytest.mark.parametrize(
    "extra",
    [[], ["student.in_chans=1", "+student.model_kwargs.conv_mlp=true"]],
    ids=["default", "gray_kwargs"],
)
def test_export_loads_in_timm_alone(tiny_teachers, tmp_path, extra):
    ckpt = run_amalgamation(tiny_teachers, tmp_path / "run", extra)
    if extra:
        paths = export_student(ckpt, tmp_path / "exp", name="tiny")
    else:  # the Hydra entry point with its default out_dir
        cmd = [
            sys.executable,
            "-m",
            "amalgam.export",
            f"ckpt_path={ckpt}",
            f"paths.root_dir={tmp_path}",
        ]
        subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
        out = tmp_path / "run" / "export"
        paths = {e: out / f"student.{e}" for e in ("safetensors", "json", "md")}
    assert all(p.is_file() for p in paths.values())
    # exactly the three files: no temp file left behind
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == sorted(
        p.name for p in paths.values()
    )
    info = json.loads(paths["json"].read_text())

    # the reference: the student as amalgam.evaluate rebuilds it, on test images
    _, dm, module = load_amalgamation(ckpt)
    x, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        want = module(x)
    assert list(info["classes"]) == list(module.space.classes)
    assert info["num_classes"] == want.shape[1]

    # timm alone: strict load, preprocessing by hand from the JSON
    model = timm.create_model(
        info["arch"],
        num_classes=info["num_classes"],
        in_chans=info["in_chans"],
        checkpoint_path=str(paths["safetensors"]),
        **info["model_kwargs"],
    ).eval()
    pre = info["preprocessing"]
    assert pre["input_range"] == [0.0, 1.0]
    with torch.no_grad():
        got = model(preprocess(x, pre))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    if extra:
        assert info["in_chans"] == 1 and info["model_kwargs"] == {"conv_mlp": True}

    card = paths["md"].read_text()
    for name, t in module.teachers.metas.items():
        assert t.sha256 and t.sha256 in card and name in card
    assert "cfl" in card and "mmd 10.0" in card
    if not extra:  # results.json of this checkpoint sits in the run dir
        assert "| joint (ensemble for teachers) |" in card


def test_export_refuses_what_is_not_a_student_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        export_student(None)
    with pytest.raises(ConfigError, match="not found"):
        export_student(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 0}, other)
    with pytest.raises(ConfigError, match=r"not written by amalgam\.amalgamate"):
        export_student(other)
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "amalgam": {}}, other)
    with pytest.raises(ConfigError, match="record lacks"):
        export_student(other)
    with pytest.raises(ConfigError, match="plain file name"):
        export_student(other, name="../x")
    assert not (tmp_path / "export").exists()
