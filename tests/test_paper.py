"""The paper's experiment end to end through the real CLI, offline: miniature CUB-200-2011 and
Stanford Dogs archives in their official layouts, 224 px, ImageNet-style weights from a local
Hugging Face cache, both teachers fine-tuned from them, then `experiment=cub_dogs` with the
teacher cache replaying RandomResizedCrop views, to a results.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from archives import write_cub, write_dogs

REV = "89abcdef0123456789abcdef0123456789abcdef"
TESTS = Path(__file__).parent
# tiny step limits, the CPU, no loader workers; everything else is the experiment's own
CPU = [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "channels_last=false",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.pin_memory=false",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "~callbacks.progress",
    "+trainer.enable_progress_bar=false",
]


def write_hub(home: Path, name: str) -> dict[str, torch.Tensor]:
    """`timm/<name>` (timm's own random init) in the hub cache of HF_HOME=`home`."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    snap = home / "hub" / f"models--timm--{name}" / "snapshots" / REV
    snap.mkdir(parents=True)
    timm.models.save_for_hf(model, snap, safe_serialization=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(REV)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run(module: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
@pytest.mark.long  # 108 s of the 10-minute make-test budget: make test-long runs it
def test_cub_dogs_end_to_end_on_miniature_archives_with_hub_weights(tmp_path: Path) -> None:
    data, teachers, home = tmp_path / "data", tmp_path / "teachers", tmp_path / "hf"
    birds = write_cub(data, classes=3, train_per_class=3, test_per_class=2)
    dogs = write_dogs(data, classes=3, train_per_class=3, test_per_class=2)
    saved = {n: write_hub(home, n) for n in ("resnet18.tv_in1k", "resnet34.tv_in1k")}
    env = {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    paths = [
        f"paths.data_dir={data}",
        f"paths.teachers_dir={teachers}",
        f"paths.root_dir={tmp_path}",
    ]

    # the data check a user runs before a GPU job
    check = run("amalgam.data.check", "data=cub_dogs", *paths[:1], env=env, cwd=tmp_path)
    assert "6 classes" in check.stdout and "18 train" in check.stdout and "12 test" in check.stdout

    for data_cfg, teacher in (("cub200", "cub200_resnet18"), ("stanford_dogs", "dogs_resnet34")):
        run(
            "amalgam.train_teacher",
            "experiment=finetune_teacher",
            f"data={data_cfg}",
            f"teacher={teacher}",
            *paths,
            *CPU,
            "+trainer.max_steps=1",
            "data.val_fraction=0",
            f"hydra.run.dir={tmp_path / 'runs' / teacher}",
            env=env,
            cwd=tmp_path,
        )
    cub = json.loads((teachers / "cub200_resnet18.json").read_text())
    assert cub["arch"] == "resnet18.tv_in1k" and cub["classes"] == birds  # every class, in order
    assert cub["extra"]["init"] == "hf-hub:timm/resnet18.tv_in1k"
    assert cub["extra"]["data_config"]["crop_pct"] == 0.875
    # fine-tuned from the cached weights: one SGD step moves the body a little, not to random
    tuned = load_file(str(teachers / "dogs_resnet34.safetensors"))
    start = saved["resnet34.tv_in1k"]
    diff = max(
        (tuned[k].float() - start[k].float()).abs().max().item()
        for k in start
        if not k.startswith("fc.") and start[k].is_floating_point() and "running" not in k
    )
    assert 0 < diff < 0.05

    out = tmp_path / "runs" / "cub_dogs"
    run(
        "amalgam.amalgamate",
        "experiment=cub_dogs",
        *paths,
        *CPU,
        "+trainer.max_steps=3",
        "trainer.max_epochs=1",
        "teacher_cache.enabled=true",
        "teacher_cache.views=2",
        f"hydra.run.dir={out}",
        env=env,
        cwd=tmp_path,
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"cub200_resnet18", "dogs_resnet34"}
    assert res["global_step"] == 3
    for task in res["tasks"].values():
        assert 0 <= task["student_acc"] <= 1 and 0 <= task["teacher_acc"] <= 1
    assert 0 <= res["joint"]["student_acc"] <= 1
    # the student started from the cached ImageNet-style weights, over the 6-class union
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    rec = ckpt["amalgam"]
    assert rec["label_space"] == {"cub200_resnet18": birds, "dogs_resnet34": dogs}
    assert rec["preprocess"]["mode"] == "timm" and rec["preprocess"]["image_size"] == 224
    assert rec["preprocess"]["crop_pct"] == 0.875  # from the student's timm data config
    # the teacher cache held 2 replayed views of each of the 18 pool images
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 2
    for m in manifests:
        assert json.loads(m.read_text())["views"] == 2
        assert json.loads(m.read_text())["key"]["data"]["view"]["views"] == 2

    # the export names an arch timm rebuilds offline and the file transform of timm mode
    run("amalgam.export", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", env=env, cwd=tmp_path)
    config = json.loads((out / "export" / "config.json").read_text())
    info = config["amalgam"]
    assert info["arch"] == "resnet34.tv_in1k" and config["num_classes"] == 6
    ft = info["preprocessing"]["file_transform"]
    assert (ft["image_size"], ft["crop_pct"], ft["interpolation"]) == (224, 0.875, "bilinear")
    pc = config["pretrained_cfg"]
    assert (pc["input_size"], pc["crop_pct"], pc["interpolation"]) == (
        [3, 224, 224],
        0.875,
        "bilinear",
    )
    card = (out / "export" / "README.md").read_text()
    assert "resize the shorter side to 256 (bilinear), crop the centre 224x224" in card
