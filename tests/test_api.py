"""The Python API (amalgam.compose, Amalgamation, amalgam.load) against the CLI, tiny models."""

import functools
import json
import logging

import pytest
import timm
import torch
from torch import nn

import amalgam
from amalgam.backbone import Backbone, head_outputs
from amalgam.data import synthetic
from amalgam.methods import CFL
from amalgam.teachers import TeacherMeta, export_teacher, module_hash
from amalgam.teachers.bank import Teacher
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
        trainer=STEPS3,
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


# ------------------------------------------------------------------ timm modules in memory

# stored as config (a `_target_`), so amalgam.load rebuilds it from the checkpoint alone
SYNTH6 = {
    "_target_": "amalgam.data.AmalgamDataModule",
    "source": {
        "_target_": "amalgam.data.sources.synthetic",
        "_partial_": True,
        "num_classes": 6,
        "train_per_class": 16,
        "test_per_class": 8,
        "size": 16,
    },
    "image_size": 16,
    "batch_size": 16,
}
STEPS3 = {
    "max_epochs": 1,
    "limit_train_batches": 3,
    "limit_val_batches": 1,
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_checkpointing": False,
}


def net(arch: str, k: int, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=k, **kwargs)


def objects_run(tmp_path, teachers, student, **kwargs) -> amalgam.Amalgamation:
    return amalgam.Amalgamation(
        teachers=teachers,
        student=student,
        data=SYNTH6,
        trainer=STEPS3,
        output_dir=tmp_path / "run",
        loggers=[],
        **kwargs,
    )


def test_api_takes_timm_modules_in_memory(tmp_path):
    ta, tb = net("test_resnet", 3), net("test_efficientnet", 2, seed=1)
    tc = net("test_convnext", 2, seed=2)  # a teacher file, mixed with the modules
    file_c = export_teacher(
        tc,
        TeacherMeta(name="c", arch="test_convnext", classes=["c4", "c5"], input_size=32),
        tmp_path / "files",
    )
    before = {"a": module_hash(ta), "b": module_hash(tb)}
    student = net("test_efficientnet", 10)  # the wrong head size: reset to the 7 union classes
    am = objects_run(
        tmp_path,
        {
            "a": (ta, ["c0", "c1", "c2"]),
            "b": {"model": tb, "classes": ["c3", "c4"]},
            "c": file_c,
        },
        student,
    )
    assert am.classes == ("c0", "c1", "c2", "c3", "c4", "c5")
    # the student is the module given, its head reset; the teachers are frozen in place
    assert am.student.model is student and head_outputs(student) == 6
    assert am.teachers.teachers["a"].model is ta
    for t in (ta, tb):
        assert not t.training and not any(p.requires_grad for p in t.parameters())
    # normalisation from the model's timm pretrained_cfg (test_resnet: 0.5, efficientnet: imagenet)
    assert am.teachers.teachers["a"].norm == ([0.5] * 3, [0.5] * 3)
    assert am.teachers.metas["b"].mean == pytest.approx(list(timm.data.IMAGENET_DEFAULT_MEAN))
    s_before = module_hash(student)

    res = am.fit()

    assert {"a": module_hash(ta), "b": module_hash(tb)} == before  # teachers never trained
    assert {k: res["teacher_hashes"][k] for k in before} == before
    assert module_hash(student) != s_before  # the student module itself was trained
    assert res["global_step"] == 3 and res["student_arch"] == "test_efficientnet"
    assert res["teacher_archs"] == {
        "a": "test_resnet",
        "b": "test_efficientnet",
        "c": "test_convnext",
    }
    assert set(res["tasks"]) == {"a", "b", "c"}
    assert {k: t["n_test"] for k, t in res["tasks"].items()} == {"a": 24, "b": 16, "c": 16}
    for t in res["tasks"].values():
        assert 0 <= t["student_acc"] <= 1 and 0 <= t["teacher_acc"] <= 1
    assert 0 <= res["joint"]["student_acc"] <= 1 and 0 <= res["val"]["task_mean_acc"] <= 1
    # each in-memory teacher was saved with the run, named by its hash: the checkpoint
    # loads back from files alone, teachers hash-checked, with the same figures
    saved = am.teachers.paths
    assert saved["a"] == str(tmp_path / "run" / "teachers" / f"a-{before['a'][:12]}.safetensors")
    assert saved["c"] == str(file_c)
    loaded = amalgam.load(am.checkpoint_path)
    assert loaded.teachers.hashes() == am.teachers.hashes()
    ev = loaded.evaluate()
    assert (ev["tasks"], ev["joint"]) == (res["tasks"], res["joint"])
    assert torch.equal(loaded.student.model.classifier.weight, student.classifier.weight)


def test_api_module_student_without_head_and_teacher_dataclass(tmp_path, caplog):
    ta = net("test_resnet", 3)
    teacher = Teacher(ta, [0, 1, 2], mean=[0.2] * 3, std=[0.3] * 3, input_size=24)
    student = net("test_efficientnet", 0)  # a feature extractor: gets a head over the union
    with caplog.at_level(logging.INFO, logger="amalgam"):
        am = objects_run(tmp_path, {"a": teacher, "b": (net("test_vit", 3), [3, 4, 5])}, student)
    assert head_outputs(student) == 6 and "reset_classifier(6)" in caplog.text
    a = am.teachers.teachers["a"]
    assert a.norm == (pytest.approx([0.2] * 3), pytest.approx([0.3] * 3)) and a.input_size == 24
    assert am.teachers.metas["a"].classes == ["c0", "c1", "c2"]  # indices: the data's names
    assert am.student(torch.rand(2, 3, 16, 16)).logits.shape == (2, 6)
    # a Backbone sets the student's own preprocessing; its config is stored for amalgam.load
    wrapped = Backbone(net("test_convnext", 6), input_size=32)
    am = objects_run(
        tmp_path, {"a": (ta, [0, 1, 2]), "b": (net("test_vit", 3), [3, 4, 5])}, wrapped
    )
    stored = am.module.record.config["student"]
    assert am.student is wrapped and (stored["arch"], stored["input_size"]) == ("test_convnext", 32)


def test_api_refuses_bad_in_memory_models(tmp_path):
    def refused(match, teachers=None, student=None):
        teachers = teachers or {"a": (net("test_resnet", 3), ["c0", "c1", "c2"])}
        with pytest.raises(amalgam.ConfigError, match=match) as e:
            objects_run(tmp_path, teachers, student or net("test_resnet", 3))
        assert "\n" not in str(e.value)  # one line

    refused(
        r"teacher 'a': its head has 3 outputs but its class list has 2 classes: give one class",
        {"a": (net("test_resnet", 3), ["c0", "c1"])},
    )
    refused(
        r"no classification head \(built with num_classes=0\)",
        {"a": (net("test_resnet", 0), ["c0", "c1"])},
    )
    refused(
        r"teacher 'a': a Linear is not a timm model \(it has no forward_features"
        r".*timm.create_model",
        {"a": (nn.Linear(4, 2), ["c0", "c1"])},
    )
    refused(r"does not say which class.*\(model, \[class names", {"a": net("test_resnet", 3)})
    refused(
        r"takes the keys.*got \['classes', 'model', 'norm'\]",
        {"a": {"model": net("test_resnet", 2), "classes": ["c0", "c1"], "norm": 1}},
    )
    refused(r"class names \['c0'\] repeat", {"a": (net("test_resnet", 2), ["c0", "c0"])})
    refused(
        r"bfloat16; give it in float32 \(model.float\(\)\)",
        {"a": (net("test_resnet", 2).bfloat16(), ["c0", "c1"])},
    )
    refused(
        r"student: a Sequential is not a timm model \(it has no forward_features, forward_head, "
        r"get_classifier, reset_classifier\); give a timm.create_model",
        student=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
    )
    shared = net("test_resnet", 3)
    refused(r"it is the module of teacher 'a'", {"a": (shared, ["c0", "c1", "c2"])}, shared)


def test_api_load_needs_files_of_models_timm_cannot_rebuild(tmp_path, caplog):
    # built with a constructor argument that timm's arch name alone does not rebuild
    ta = net("test_resnet", 3, act_layer="silu")
    student = net("test_resnet", 6, act_layer="silu")
    with caplog.at_level(logging.WARNING, logger="amalgam"):
        am = objects_run(
            tmp_path,
            {"a": (ta, ["c0", "c1", "c2"]), "b": (net("test_resnet", 3), ["c3", "c4", "c5"])},
            student,
            method="kd",
        )
    assert "no copy is saved" in caplog.text and "store no student config" in caplog.text
    assert am.teachers.paths["a"] == "" and am.teachers.paths["b"].endswith(".safetensors")
    res = am.fit()
    with pytest.raises(
        amalgam.ConfigError,
        match=r"teachers \['a'\] were given in memory.*"
        r"overrides=\{'teacher_set': \{'a': \{'weights': <file>\}\}\}",
    ):
        amalgam.load(am.checkpoint_path)
    meta = TeacherMeta(
        name="a", arch="test_resnet", classes=["c0", "c1", "c2"], model_kwargs={"act_layer": "silu"}
    )
    file_a = export_teacher(ta, meta, tmp_path / "files")
    over = {"teacher_set": {"a": {"weights": str(file_a)}}}
    with pytest.raises(amalgam.ConfigError, match=r"\['student'\]"):
        amalgam.load(am.checkpoint_path, over)
    student_cfg = {"arch": "test_resnet", "model_kwargs": {"act_layer": "silu"}}
    loaded = amalgam.load(am.checkpoint_path, {**over, "student": student_cfg})
    ev = loaded.evaluate()
    assert (ev["tasks"], ev["joint"]) == (res["tasks"], res["joint"])


def test_api_verbose_false_is_quiet(tmp_path, capsys):
    """verbose=False: no progress bar, no log lines, no table; the files are written."""
    from amalgam.console import ConsoleLog

    seen = []

    class Spy(ConsoleLog):
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.progress_bar_callback)

    def run(name, verbose):
        am = amalgam.Amalgamation(
            teachers={
                "a": (net("test_resnet", 3), [0, 1, 2]),
                "b": (net("test_resnet", 3), [3, 4, 5]),
            },
            student=net("test_efficientnet", 6),
            data=SYNTH6,
            method="kd",
            trainer={k: v for k, v in STEPS3.items() if k != "enable_progress_bar"},
            output_dir=tmp_path / name,
            loggers=[],
            callbacks=[Spy()],
            verbose=verbose,
        )
        return am.fit()

    results = run("quiet", False)
    out = capsys.readouterr()
    assert seen == [None]  # the trainer had no progress bar
    assert "student acc" not in out.out and "CONFIG" not in out.out
    assert (tmp_path / "quiet" / "results.json").is_file()
    assert (tmp_path / "quiet" / "config_tree.log").is_file()
    assert 0.0 <= results["joint"]["student_acc"] <= 1.0
    run("loud", True)  # the same run, verbose: the bar and the table are there
    assert seen[1] is not None and "student acc" in capsys.readouterr().out


def test_api_student_follows_the_methods_stages(tiny_teachers, tmp_path):
    """method='cfl_spatial' from Python puts the student (and the teachers, by stride) on the
    method's stage, as `method=cfl_spatial` does on the command line."""
    from amalgam.build import feature_indices, preset

    assert "feature_indices" not in preset("student", "resnet10t")
    assert preset("student", "resnet10t", feature_indices=[-2])["feature_indices"] == [-2]
    assert feature_indices({"arch": "resnet10t"}, "cfl_spatial") == [-3]
    assert feature_indices({"arch": "resnet10t"}, "hint") == [-3, -2, -1]
    assert feature_indices({"arch": "resnet10t", "feature_indices": [-2]}, "hint") == [-2]
    assert feature_indices("resnet10t", "kd") == [-1]
    teachers = {n: tiny_teachers / "teachers" / f"{n}.safetensors" for n in ("tiny_a", "tiny_b")}
    am = amalgam.Amalgamation(
        teachers=teachers,
        student={"arch": "test_convnext", "input_size": 32},
        data={"source": synthetic(num_classes=10), "image_size": 16, "batch_size": 32},
        method="cfl_spatial",
        trainer=STEPS3,
        output_dir=tmp_path / "run",
        loggers=[],
    )
    module = am.module
    assert module.student.feature_indices == [-3]  # stride 8 of test_convnext's [4, 8, 16, 32]
    # each teacher at stride 8 too: test_resnet and test_efficientnet have [2, 4, 8, 16, 32]
    assert all(t.feature_indices == [-3] for t in module.teachers.teachers.values())
    (block,) = module.method.blocks
    assert block.size == (2, 2)  # 16 px data: 32 px student input / 8 = 4; teachers 16 / 8 = 2


@pytest.mark.parametrize(
    "part, bad, match",
    [
        ("method", {"weights": {"kd": -1.0}}, r"method.weights.kd=-1.0: a loss weight must be"),
        ("method", {"weights": {"nope": 1.0}}, r"unknown config key 'method.weights.nope'"),
        ("method", {"temperature": 0.0}, r"method.temperature=0.0: the softmax temperature"),
        ("optim", {"lr": -1.0}, r"optim.lr=-1.0: must be a finite number > 0"),
        ("student", {"colour": 1}, r"unknown config key 'student.colour'"),
        ("student", {"arch": "no_such_net"}, r"student.arch"),
        ("seed", "zero", r"seed='zero' is not an integer"),
    ],
)
def test_api_objects_get_the_config_checks(tiny_teachers, tmp_path, part, bad, match):
    """A part given from Python as config is refused with the same one-line error as on the
    command line, before any image is read (the data source is never called)."""
    calls = []

    def source(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the data was read before the config checks")

    parts = {
        "method": amalgam.preset("method", "kd"),
        "optim": amalgam.preset("optim", "amalgam_adam"),
        "student": {"arch": "test_convnext", "input_size": 32},
        "seed": 0,
    }
    parts[part] = bad if part == "seed" else {**parts[part], **bad}
    teachers = {n: tiny_teachers / "teachers" / f"{n}.safetensors" for n in ("tiny_a", "tiny_b")}
    with pytest.raises(amalgam.ConfigError, match=match):
        amalgam.Amalgamation(
            teachers=teachers, data=source, output_dir=tmp_path / "run", loggers=[], **parts
        )
    assert calls == []
    # the command line refuses the same value with the same words
    if part in ("method", "optim", "student"):
        key, value = _flat(part, bad)
        cfg = amalgam.compose([*FAST, f"++{key}={value}"], root=tiny_teachers, output_dir=tmp_path)
        with pytest.raises(amalgam.ConfigError, match=match):
            amalgam.Amalgamation.from_config(cfg)


def _flat(prefix, d):
    """('method.weights.kd', -1.0) from ('method', {'weights': {'kd': -1.0}})."""
    ((k, v),) = d.items()
    return _flat(f"{prefix}.{k}", v) if isinstance(v, dict) else (f"{prefix}.{k}", v)
