"""End to end on generated images: train teachers, amalgamate, evaluate the checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from amalgam.amalgamate import amalgamate
from amalgam.evaluate import evaluate_checkpoint
from amalgam.provenance import provenance
from amalgam.report.run import code_line
from amalgam.teachers.io import meta_path, module_hash, read_weights
from conftest import make_cfg

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


def test_teacher_export_metadata_and_accuracy(tiny_teachers):
    for name, arch, classes in (
        ("tiny_a", "test_resnet", ["c0", "c1", "c2"]),
        ("tiny_b", "test_efficientnet", ["c3", "c4", "c5"]),
    ):
        path = tiny_teachers / "teachers" / f"{name}.safetensors"
        meta = json.loads(meta_path(path).read_text())
        assert meta["arch"] == arch and meta["classes"] == classes
        assert meta["in_chans"] == 3 and meta["input_size"] in (16, 24)
        assert len(meta["mean"]) == 3 and len(meta["sha256"]) == 64
        assert meta["test_acc"] > 0.6, f"{name} test accuracy {meta['test_acc']} not above chance"
        assert read_weights(path)
        # the code and packages that trained it (a later retrain that differs can be traced)
        assert meta["extra"]["provenance"] == json.loads(json.dumps(provenance()))


@pytest.mark.slow
def test_fast_dev_run_amalgamation_writes_full_results(tiny_teachers, tmp_path):
    teachers_dir = tiny_teachers / "teachers"
    before = {n: read_weights(teachers_dir / f"{n}.safetensors") for n in ("tiny_a", "tiny_b")}
    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", "debug=fast_dev_run", *QUIET],
        tiny_teachers,
        tmp_path / "run",
    )
    res = amalgamate(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert set(on_disk["tasks"]) == {"tiny_a", "tiny_b"}
    for t in on_disk["tasks"].values():
        assert set(t) >= {"teacher_acc", "student_acc", "classes", "n_test"}
        assert 0 <= t["student_acc"] <= 1 and t["teacher_acc"] > 0.6 and t["n_test"] == 48
    assert set(on_disk["joint"]) >= {"student_acc", "teacher_ensemble_acc"}
    assert on_disk["params"]["student"] > 0 and set(on_disk["params"]["teachers"]) == {
        "tiny_a",
        "tiny_b",
    }
    assert on_disk["throughput_img_s"]["student"] > 0
    assert (tmp_path / "run" / "results.md").read_text().count("|") > 20
    assert on_disk["provenance"] == json.loads(json.dumps(provenance()))
    assert f"Code: {code_line(provenance())}" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "results.png").stat().st_size > 1000
    # the teachers' files and hashes are untouched, and the results record the hashes
    for n, sd in before.items():
        after = read_weights(teachers_dir / f"{n}.safetensors")
        assert all(torch.equal(sd[k], after[k]) for k in sd)
    ckpt = torch.load(on_disk["checkpoint"], map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teachers.")]
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert any(k.startswith("method.blocks.0.extractor") for k in ckpt["state_dict"])
    rec = ckpt["amalgam"]["teachers"]
    assert rec["tiny_a"]["meta"]["sha256"] == on_disk["teacher_hashes"]["tiny_a"]

    # `python -m amalgam.evaluate` on the checkpoint reproduces the results exactly
    cmd = [
        sys.executable,
        "-m",
        "amalgam.evaluate",
        f"ckpt_path={on_disk['checkpoint']}",
        f"output_dir={tmp_path / 'eval'}",
        f"paths.root_dir={tmp_path}",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["tasks"] == on_disk["tasks"]
    assert again["joint"] == on_disk["joint"]
    # and so does the Python API
    assert evaluate_checkpoint(on_disk["checkpoint"], tmp_path / "eval2")["joint"] == again["joint"]


@pytest.mark.slow
def test_short_fit_keeps_teachers_frozen_and_resumes(tiny_teachers, tmp_path):
    from amalgam.build import build_amalgamation

    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", "trainer.max_epochs=1", *QUIET],
        tiny_teachers,
        tmp_path / "run",
    )
    _, module = build_amalgamation(cfg)
    hashes = {n: module_hash(t.model) for n, t in module.teachers.teachers.items()}
    res = amalgamate(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 1
    # the files the run loaded are unchanged (hash of the rebuilt bank)
    _, module2 = build_amalgamation(cfg)
    assert {n: module_hash(t.model) for n, t in module2.teachers.teachers.items()} == hashes
    assert res["teacher_hashes"] == hashes
    # resume from last.ckpt for one more epoch
    cfg2 = make_cfg(
        "amalgamate",
        # one more epoch than it was trained for: a change a resume must be told to allow
        [
            "experiment=tiny",
            "trainer.max_epochs=2",
            f"ckpt_path={last}",
            "+resume_changes=allow",
            *QUIET,
        ],
        tiny_teachers,
        tmp_path / "run2",
    )
    res2 = amalgamate(cfg2)
    assert res2["epochs"] == 2


@pytest.mark.slow
def test_training_step_never_sees_a_label(tiny_teachers, tmp_path, monkeypatch):
    from amalgam.module import AmalgamModule

    seen = []
    original = AmalgamModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(sorted(batch) if isinstance(batch, dict) else type(batch).__name__)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(AmalgamModule, "training_step", spy)
    cfg = make_cfg(
        "amalgamate", ["experiment=tiny", "debug=quick", *QUIET], tiny_teachers, tmp_path / "run"
    )
    amalgamate(cfg)
    assert len(seen) == 8 and all(s == ["image", "index"] for s in seen)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "scratch", "cfl_no_rec"])
def test_method_variants_run(tiny_teachers, tmp_path, method):
    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", "debug=fast_dev_run", f"method={method}", "optim=sgd", *QUIET],
        tiny_teachers,
        tmp_path / "run",
    )
    res = amalgamate(cfg)
    assert res["method"] == method and res["uses_labels"] == (method == "scratch")
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.slow
def test_student_initialised_from_weights_file(tiny_teachers, tmp_path):
    import timm
    from safetensors.torch import save_file

    from amalgam.build import build_amalgamation

    init = timm.create_model("test_convnext", num_classes=7)
    sd = {f"model.{k}": v.contiguous() for k, v in init.state_dict().items()}
    save_file(sd, str(tmp_path / "init.safetensors"))
    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", f"student.weights={tmp_path}/init.safetensors"],
        tiny_teachers,
        tmp_path / "run",
    )
    _, module = build_amalgamation(cfg)
    got = module.student.model.state_dict()
    body = [k for k in got if not k.startswith("head.fc")]
    assert all(torch.equal(got[k], init.state_dict()[k]) for k in body)
    assert got["head.fc.weight"].shape[0] == 6  # head over the union, not the file's 7


@pytest.mark.slow
def test_wandb_offline_run_is_finished(tiny_teachers, tmp_path):
    import wandb

    cfg = make_cfg(
        "amalgamate",
        [
            "experiment=tiny",
            "debug=fast_dev_run",
            "logger=wandb",
            "logger.wandb.offline=true",
            "~callbacks.progress",
            "+trainer.enable_progress_bar=false",
        ],
        tiny_teachers,
        tmp_path / "run",
    )
    amalgamate(cfg)
    assert wandb.run is None
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_gpu_switches_keep_checkpoint_keys(tiny_teachers, tmp_path):
    from amalgam.build import build_amalgamation

    plain = make_cfg("amalgamate", ["experiment=tiny"], tiny_teachers, tmp_path / "a")
    fast = make_cfg(
        "amalgamate",
        ["experiment=tiny", "student.compile=true", "student.channels_last=true"],
        tiny_teachers,
        tmp_path / "b",
    )
    keys = set(build_amalgamation(plain)[1].state_dict())
    _, module = build_amalgamation(fast)
    assert set(module.state_dict()) == keys
    assert not [k for k in keys if "_orig_mod" in k]
    # channels_last alone runs end to end on the CPU
    cl = make_cfg(
        "amalgamate",
        ["experiment=tiny", "debug=fast_dev_run", "student.channels_last=true", *QUIET],
        tiny_teachers,
        tmp_path / "c",
    )
    assert amalgamate(cl)["joint"]["n_test"] > 0
