"""Student export in the timm / Hugging Face format: `timm.create_model("local-dir:...")` gives
the student's logits, `resolve_model_data_config` its training preprocessing, and timm's
transform of an image file the run's own evaluation input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from amalgam.amalgamate import amalgamate
from amalgam.api import load_amalgamation
from amalgam.data import ImageFormat
from amalgam.errors import ConfigError
from amalgam.export import (
    GREY_LEVEL,
    card_metadata,
    data_sources,
    export_pretrained_cfg,
    export_student,
)
from conftest import make_cfg

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]
FILES = ["README.md", "config.json", "model.safetensors"]
# default: square mode, 16 px data that the student resizes to 32 (the CLI entry point);
# grey: 1-channel data and student, 32 px, model_kwargs; timm: timm mode's resize + crop
VARIANTS = {
    "default": [],
    "grey": [
        "data.channels=1",
        "data.image_size=32",
        "student.in_chans=1",
        "+student.model_kwargs.conv_mlp=true",
    ],
    "timm": ["+data.preprocess.mode=timm", "+data.preprocess.crop_pct=0.875", "data.image_size=32"],
}


def run_amalgamation(tiny_teachers: Path, out: Path, extra: list[str]) -> Path:
    cfg = make_cfg(
        "amalgamate", ["experiment=tiny", "debug=fast_dev_run", *QUIET, *extra], tiny_teachers, out
    )
    amalgamate(cfg)
    return out / "checkpoints" / "final.ckpt"


@pytest.fixture(scope="module")
def exported(tiny_teachers, tmp_path_factory):
    """variant -> (checkpoint, export dir): one amalgamation and export per variant."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in done:
            root = tmp_path_factory.mktemp(variant)
            ckpt = run_amalgamation(tiny_teachers, root / "run", VARIANTS[variant])
            if variant == "default":  # the Hydra entry point with its default out_dir
                cmd = [sys.executable, "-m", "amalgam.export", f"ckpt_path={ckpt}"]
                cmd.append(f"paths.root_dir={root}")
                subprocess.run(cmd, check=True, cwd=root, capture_output=True)
                out = root / "run" / "export"
            else:
                out = root / "exp"
                paths = export_student(ckpt, out, name=f"tiny_{variant}")
                assert sorted(p.name for p in paths.values()) == FILES
            done[variant] = ckpt, out
        return done[variant]

    return get


def expected_data_config(dm, student) -> dict:
    """The training preprocessing of the run, as a timm data config."""
    side = student.input_size or dm.image_size
    p = dm.preprocess.resolved
    timm_mode = p.mode == "timm"
    mean, std = student.norm
    return {
        "input_size": (student.in_chans, side, side),
        "interpolation": p.interpolation if timm_mode else "bilinear",
        "crop_pct": p.crop_pct if timm_mode else 1.0,
        "crop_mode": p.crop_mode if timm_mode else "squash",
        "mean": pytest.approx(mean),
        "std": pytest.approx(std),
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_timm_alone(exported, variant):
    ckpt, out = exported(variant)
    # what timm.models.save_for_hf writes, and the model card; no temp dir left behind
    assert sorted(p.name for p in out.iterdir()) == FILES
    config = json.loads((out / "config.json").read_text())
    am = config["amalgam"]
    _, dm, module = load_amalgamation(ckpt)
    student = module.student
    assert config["architecture"] == "test_convnext"
    assert config["num_classes"] == module.space.num_classes
    assert config["label_names"] == list(module.space.classes)
    for task in module.space.tasks:
        idx = am["tasks"][task.name]["indices"]
        assert [config["label_names"][i] for i in idx] == list(task.classes)
    # timm's default for the arch (160 px bicubic, crop 0.95) gave way to the training one
    want = expected_data_config(dm, student)
    pc = config["pretrained_cfg"]
    assert {k: tuple(pc[k]) if k == "input_size" else pc[k] for k in want} == want
    assert "tag" not in pc and "license" not in pc  # a random-init student: no source weights

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(model)
    assert {k: tuple(v) if k == "input_size" else v for k, v in data_config.items()} == want
    assert model.pretrained_cfg["label_names"] == list(module.space.classes)

    # the student's logits: on test images, and on a random batch normalised as timm says
    x, _ = next(iter(dm.test_dataloader()))
    xr = torch.rand(4, *data_config["input_size"], generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        got, want_logits = model(student.preprocess(x)), module(x)
        got_r, want_r = model((xr - mean) / std), student(xr, features=False).logits
    assert torch.allclose(got, want_logits, rtol=1e-5, atol=1e-6), (got - want_logits).abs().max()
    assert torch.allclose(got_r, want_r, rtol=1e-5, atol=1e-6), (got_r - want_r).abs().max()

    # the arch and kwargs of config.json's amalgam entry rebuild it without the folder
    plain = timm.create_model(
        am["arch"],
        num_classes=config["num_classes"],
        in_chans=am["in_chans"],
        checkpoint_path=str(out / "model.safetensors"),
        **am["model_kwargs"],
    ).eval()
    with torch.no_grad():
        assert torch.allclose(plain((xr - mean) / std), want_r, rtol=1e-5, atol=1e-6)
    if variant == "grey":
        assert len(pc["mean"]) == len(pc["std"]) == 1 and pc["input_size"][0] == 1
        assert config["model_args"]["in_chans"] == 1 and config["model_args"]["conv_mlp"]
        assert am["model_kwargs"] == {"conv_mlp": True}
    if variant == "timm":
        ft = am["preprocessing"]["file_transform"]
        assert (ft["image_size"], ft["crop_pct"], ft["crop_mode"]) == (32, 0.875, "center")
        assert ft["interpolation"] == pc["interpolation"] == "bicubic"  # the student's


def write_images(d: Path, mode: str, sizes: list[tuple[int, int]]) -> list[Path]:
    """Smooth random PNG files of these (width, height)."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for w, h in sizes:
        c = 1 if mode == "L" else 3
        x = torch.rand(1, c, 6, 6, generator=g)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear")
        x = (x + 0.05 * torch.rand(1, c, h, w, generator=g)).clamp(0, 1)
        arr = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
        p = d / f"{mode}_{w}x{h}.png"
        Image.fromarray(arr, mode).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_transform_reproduces_the_run_eval_transform(exported, variant, tmp_path):
    ckpt, out = exported(variant)
    _, dm, module = load_amalgamation(ckpt)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_config)
    # the run's evaluation input: its data module's file format, then the student's own
    # channels, resize and normalisation
    fmt = ImageFormat(dm.channels, dm.image_size, preprocess=dm.preprocess)
    size, side = dm.image_size, data_config["input_size"][-1]
    exact = size == side
    note = json.loads((out / "config.json").read_text())["amalgam"]["preprocessing"]
    assert note["timm_transform"].startswith("reproduces" if exact else "approximates")
    # square images of the data's size; other shapes where the student takes that size (the
    # default student resizes 16 px data to 32 px: timm resizes once, not twice)
    sizes = [(size, size), (40, 24), (20, 52)] if exact else [(size, size)]
    mode = "L" if variant == "grey" else "RGB"
    # PIL resizes in 8 bits (one grey level apart from amalgam's float resize); timm mode
    # resizes with timm's transform in both
    atol = 1e-5 if variant == "timm" else 1.01 * GREY_LEVEL / min(data_config["std"])
    for path in write_images(tmp_path, mode, sizes):
        with torch.no_grad():
            want = module.student.preprocess(fmt.files([str(path)]))
        image = Image.open(path)
        assert image.mode == mode
        got = transform(image)[None]
        assert got.shape == want.shape == (1, *data_config["input_size"])
        assert torch.allclose(got, want, rtol=0, atol=atol), (path.name, (got - want).abs().max())


def test_model_card(exported):
    ckpt, out = exported("default")
    _, _, module = load_amalgamation(ckpt)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm"
    assert meta["tags"] == ["image-classification", "timm", "knowledge-amalgamation"]
    assert "license" not in meta and "datasets" not in meta  # scratch student, synthetic data
    results = json.loads((ckpt.parent.parent / "results.json").read_text())
    (index,) = meta["model-index"]
    assert index["name"] == "student"
    metrics = {m["name"]: m["value"] for m in index["results"][0]["metrics"]}
    n = module.space.num_classes
    assert metrics[f"joint accuracy ({n} classes)"] == round(
        100 * results["joint"]["student_acc"], 2
    )
    for task, t in results["tasks"].items():
        assert metrics[f"{task} accuracy"] == round(100 * t["student_acc"], 2)
    # the results table, the teachers with their hashes, the method and rule, the inputs
    assert "| joint (ensemble for teachers) |" in card
    for name, t in module.teachers.metas.items():
        assert t.sha256 and t.sha256 in card and f"| {name} | `{t.arch}` |" in card
    assert "cfl" in card and "mmd 10.0" in card and "target rule" in card and "`Concat`" in card
    assert "squash the whole image to 16x16" in card and "resize to 32x32" in card
    assert 'timm.create_model("local-dir:<this folder>", pretrained=True)' in card


def test_export_refuses_a_malformed_results_json(exported, tmp_path):
    ckpt, _ = exported("default")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    copy = run / "checkpoints" / "final.ckpt"
    shutil.copy(ckpt, copy)
    results = json.loads((ckpt.parent.parent / "results.json").read_text())
    results["checkpoint"] = str(copy)
    results["joint"]["student_acc"] = "high"
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError, match=r"results\.json of its tasks .* or delete it"):
        export_student(copy)
    assert not (run / "export").exists() or not any((run / "export").iterdir())
    # one for another checkpoint is ignored
    results["checkpoint"] = str(ckpt)
    (run / "results.json").write_text(json.dumps(results))
    paths = export_student(copy, verify=False)
    assert "No results.json of this checkpoint" in paths["card"].read_text()


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
    for bad in ("../x", "", "a b"):
        with pytest.raises(ConfigError, match="plain model name"):
            export_student(other, name=bad)
    assert not (tmp_path / "export").exists()


def test_export_refuses_an_out_dir_it_cannot_write(exported, tmp_path):
    ckpt, _ = exported("default")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir '.*file\.txt/sub' cannot be written"):
        export_student(ckpt, tmp_path / "file.txt" / "sub")


def test_card_metadata_names_known_data_sets_and_the_init_license():
    cfg = {
        "data": {
            "source": {
                "_target_": "amalgam.data.sources.concat",
                "sources": [
                    {"_target_": "amalgam.data.sources.mnist"},
                    {"_target_": "amalgam.data.sources.fashion_mnist"},
                ],
            }
        }
    }
    assert data_sources(cfg) == ["mnist", "fashion_mnist"]
    config = {
        "amalgam": {"source": {"data": data_sources(cfg)}},
        "pretrained_cfg": export_pretrained_cfg(
            {"tag": "a1_in1k", "license": "apache-2.0", "crop_pct": 1.0}, keep_license=True
        ),
    }
    assert config["pretrained_cfg"] == {"license": "apache-2.0", "crop_pct": 1.0}
    meta = card_metadata("m", config, None)
    assert meta["license"] == "apache-2.0" and "model-index" not in meta
    assert meta["datasets"] == ["ylecun/mnist", "zalando-datasets/fashion_mnist"]
    scratch = export_pretrained_cfg({"tag": "a1_in1k", "license": "apache-2.0"}, False)
    assert scratch == {}
