"""`amalgam.flops`: counted FLOPs against known figures, the estimate arithmetic, the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from amalgam.backbone import Backbone, create_timm
from amalgam.flops import estimate_times, flops_report, forward_flops, train_flops
from amalgam.utils import CONF_DIR
from conftest import make_cfg


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    return Backbone(create_timm("resnet18.tv_in1k", 1000))


@pytest.fixture(scope="module")
def x224() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224)


def test_resnet18_forward_is_its_known_flops(resnet18, x224):
    # timm / torchvision: ResNet-18 at 224 px is 1.82 GMACs = 3.64 GFLOPs
    assert forward_flops(resnet18, x224) / 1e9 == pytest.approx(3.64, rel=0.02)


def test_forward_backward_is_about_three_forwards(resnet18, x224):
    fwd = forward_flops(resnet18, x224)
    ratio = train_flops(resnet18, x224, 1000, features=False) / fwd
    assert 2.5 < ratio < 3.5


def test_estimate_arithmetic_is_exact():
    est = estimate_times(10.0, 4.0, 1000, 500, peak_tflops=100.0, mfu=0.5)
    assert est["train_compute_s"] == 10.0e9 * 1000 / (100.0e12 * 0.5)
    assert est["eval_compute_s"] == 4.0e9 * 500 / (100.0e12 * 0.5)
    assert est["train_compute_s"] == pytest.approx(0.2, rel=1e-12)
    # the input bound: images / (rate x workers), and per phase the slower of the two
    decode = {"train_img_per_s_core": 10.0, "eval_img_per_s_core": 20.0}
    est = estimate_times(10.0, 4.0, 1000, 500, 100.0, 0.5, decode, workers=(8, 16))
    assert est["input_s"][8] == 1000 / (10.0 * 8) + 500 / (20.0 * 8)
    assert est["epoch_s"][16] == max(0.2, 1000 / 160) + max(0.04, 500 / 320)


def test_report_of_a_tiny_config_uses_its_counted_flops(tmp_path):
    cfg = make_cfg(
        "flops",
        ["experiment=tiny", "flops.train_images=1000", "flops.test_images=300"],
        tmp_path,
    )
    with open_dict(cfg):
        cfg.flops.decode_images = 0
    r = flops_report(cfg, "tiny")
    f = r["flops"]
    assert f["method"] == "cfl" and f["method_train_gflops"] > 0
    parts = sum(f["teacher_fwd_gflops"].values()) + f["student_train_gflops"]
    assert f["train_gflops"] == pytest.approx(parts + f["method_train_gflops"], rel=1e-12)
    for gpu, peak in cfg.flops.gpus.items():
        e = r["gpus"][gpu]
        per_s = peak * 1e12 * cfg.flops.mfu
        assert e["train_compute_s"] == f["train_gflops"] * 1e9 * 1000 / per_s
        assert e["eval_compute_s"] == f["eval_gflops"] * 1e9 * 300 / per_s
        assert e["run_s"][16] == e["epoch_s"][16] * cfg.trainer.max_epochs
    assert not any(tmp_path.iterdir())  # nothing written: no run dir, cache or checkpoint


def test_cli_cub_dogs(tmp_path):
    args = ["experiment=cub_dogs", "trainer.max_epochs=1", "flops.decode_images=4"]
    if not (Path(CONF_DIR) / "data" / "cub_dogs.yaml").is_file():
        args += ["data=synthetic", "data.image_size=224"]  # its data config is not there yet
    args += [f"flops.write={tmp_path / 'flops.md'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "amalgam.flops", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "teacher cub200_resnet18 (resnet18.tv_in1k, 200 classes) forward: 3.6" in out
    assert "teacher dogs_resnet34 (resnet34.tv_in1k, 120 classes) forward: 7.3" in out
    assert "student (resnet34.tv_in1k, 320 classes) forward: 7.3" in out
    assert "GFLOPs (measured)" in out and "images/s train transform" in out
    assert "H200" in out and "estimate" in out
    md = (tmp_path / "flops.md").read_text()
    assert "| H200 | 989 |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flops.md"]  # no run dir
