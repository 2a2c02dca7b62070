"""The Python API (amalgam.compose, Amalgamation, amalgam.load) against the CLI, tiny models."""

import functools
import json

import pytest

import amalgam
from amalgam.data import synthetic
from amalgam.methods import CFL
from test_scaleout import cli

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]
FAST = ["experiment=tiny", "debug=fast_dev_run", *QUIET]
# every field of results.json but timings, paths and the variant (the CLI's override names)
SAME = (
    "tasks",
    "joint",
    "val",
    "params",
    "method",
    "uses_labels",
    "seed",
    "student_arch",
    "teacher_archs",
    "teacher_hashes",
    "epochs",
    "global_step",
    "world_size",
    "resumed_from",
)


def test_compose_sets_the_run_dir_outside_hydra(tiny_teachers, tmp_path):
    cfg = amalgam.compose(FAST, root=tiny_teachers)
    assert cfg.paths.output_dir.startswith(f"{tiny_teachers}/logs/tiny/runs/")
    assert "hydra" not in cfg and cfg.trainer.fast_dev_run is True
    cfg = amalgam.compose(FAST, root=tiny_teachers, output_dir=tmp_path / "x")
    assert cfg.paths.output_dir == str(tmp_path / "x")
    cfg.paths.output_dir = "${hydra:runtime.output_dir}"  # as composed by Hydra's own compose
    with pytest.raises(amalgam.ConfigError, match=r"amalgam.compose\(.*output_dir"):
        amalgam.Amalgamation.from_config(cfg)
    with pytest.raises(amalgam.ConfigError, match="choose one of"):
        amalgam.preset("method", "nope")


@pytest.mark.slow
def test_api_and_cli_give_identical_results(tiny_teachers, tmp_path):
    cfg = amalgam.compose(FAST, root=tiny_teachers, output_dir=tmp_path / "api")
    am = amalgam.Amalgamation.from_config(cfg)
    assert am.classes == ("c0", "c1", "c2", "c3", "c4", "c5")
    res = am.fit()
    api = json.loads((tmp_path / "api" / "results.json").read_text())
    assert api == json.loads(json.dumps(res))
    cli(tiny_teachers, *FAST, f"hydra.run.dir={tmp_path / 'cli'}")
    got = json.loads((tmp_path / "cli" / "results.json").read_text())
    for key in SAME:
        assert api[key] == got[key], key
    # validation figures of the last val epoch, and their task mean (the search objective)
    val = api["val"]
    assert {"task_mean_acc", "joint_acc", "acc_tiny_a", "acc_tiny_b"} <= set(val)
    assert val["task_mean_acc"] == pytest.approx((val["acc_tiny_a"] + val["acc_tiny_b"]) / 2)
    # evaluate() on the student in memory, and the reloaded checkpoint, give the same figures
    assert am.checkpoint_path == tmp_path / "api" / "checkpoints" / "final.ckpt"
    again = am.evaluate()
    assert (again["tasks"], again["joint"], again["val"]) == (res["tasks"], res["joint"], val)
    loaded = amalgam.load(am.checkpoint_path)
    ev = loaded.evaluate(tmp_path / "eval")
    assert (ev["tasks"], ev["joint"]) == (res["tasks"], res["joint"])
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"] == res["tasks"]
    with pytest.raises(amalgam.ConfigError, match="fitted already"):
        am.fit()
    with pytest.raises(amalgam.ConfigError, match="loaded from a checkpoint"):
        loaded.fit()


@pytest.mark.slow
def test_api_from_python_objects_trains_and_reports(tiny_teachers, tmp_path):
    teachers = {n: tiny_teachers / "teachers" / f"{n}.safetensors" for n in ("tiny_a", "tiny_b")}
    am = amalgam.Amalgamation(
        teachers=teachers,
        student={"arch": "test_convnext", "input_size": 32},
        data={"source": synthetic(num_classes=10), "image_size": 16, "batch_size": 32},
        method=functools.partial(CFL, weights={"kd": 1.0, "mmd": 10.0, "rec": 10.0}),
        optim=amalgam.preset("optim", "amalgam_adam", lr=2e-3),
        trainer={
            "max_epochs": 1,
            "limit_train_batches": 3,
            "limit_val_batches": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_checkpointing": False,
        },
        seed=0,
        output_dir=tmp_path / "run",
        loggers=[],
    )
    assert "cfl" in repr(am) and "not fitted" in repr(am)
    res = am.fit()
    assert res["global_step"] == 3 and res["epochs"] == 1 and res["method"] == "cfl"
    assert res["student_arch"] == "test_convnext" and res["seed"] == 0
    assert set(res["tasks"]) == {"tiny_a", "tiny_b"}
    for t in res["tasks"].values():
        assert 0 <= t["student_acc"] <= 1 and t["teacher_acc"] > 0.6 and t["n_test"] == 48
    assert 0 <= res["joint"]["student_acc"] <= 1
    assert 0 <= res["val"]["task_mean_acc"] <= 1
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["tasks"] == res["tasks"] and am.checkpoint_path.is_file()
    assert am.student(am.datamodule.test_dataloader().dataset[0][0][None]).logits.shape == (1, 6)
    # a run built from Python objects stores no method/data config: load() says what to pass
    with pytest.raises(amalgam.ConfigError, match=r"\['data', 'method'\].*overrides="):
        amalgam.load(am.checkpoint_path)
