"""Every config composes; bad input fails early with a message that names the fix."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from amalgam.build import build_amalgamation
from amalgam.errors import ConfigError
from amalgam.train_teacher import train_teacher
from amalgam.utils import CONF_DIR
from conftest import make_cfg

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


AMALGAM_EXPERIMENTS = [
    "cars_aircraft",
    "cub_dogs",
    "demo",
    "fashion2",
    "fine_grained4",
    "lite0_fashion2",
    "mnist_fashion4",
    "overlap2",
    "tiny",
]
TEACHER_EXPERIMENTS = [
    "demo_teachers",
    "finetune_teacher",
    "lite0_fashion2_teachers",
    "mnist_fashion4_teachers",
    "tiny_teachers",
]


def test_experiment_lists_are_complete():
    assert sorted(AMALGAM_EXPERIMENTS + TEACHER_EXPERIMENTS) == options("experiment")


@pytest.mark.parametrize(
    "group",
    [
        "data",
        "teacher_set",
        "student",
        "method",
        "optim",
        "trainer",
        "logger",
        "callbacks",
        "debug",
        "sweep",
    ],
)
def test_every_amalgamate_option_composes(group, tmp_path):
    for opt in options(group):
        cfg = make_cfg("amalgamate", [f"{group}={opt}"], tmp_path)
        OmegaConf.resolve(cfg)
        assert cfg.seed == 1337


@pytest.mark.parametrize("exp", AMALGAM_EXPERIMENTS)
def test_amalgamate_experiments_compose(exp, tmp_path):
    cfg = make_cfg("amalgamate", [f"experiment={exp}"], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.teacher_set and cfg.student.arch and cfg.method._target_


@pytest.mark.parametrize("method", ["scratch", "kd", "cfl", "cfl_no_mmd", "cfl_no_rec"])
def test_fashion2_is_the_demo_with_the_density_ratio_rule_cache_and_t4(method, tmp_path):
    demo = make_cfg("amalgamate", ["experiment=demo", f"method={method}"], tmp_path)
    cfg = make_cfg(
        "amalgamate", ["experiment=fashion2", "sweep=evidence", f"method={method}"], tmp_path
    )
    assert cfg.targets._target_ == "amalgam.targets.DensityRatio" and cfg.teacher_cache.enabled
    assert cfg.method.temperature == 4.0 and cfg.task_name == "fashion2"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.student.channels_last is True
    # the CPU-speed preset is all that differs from the demo's data, teachers, student and trainer
    demo.trainer.precision, demo.student.channels_last = "bf16-mixed", True
    for key in ("data", "teacher_set", "student", "trainer", "optim"):
        assert cfg[key] == demo[key], key
    sweep = OmegaConf.load(Path(CONF_DIR) / "sweep" / "evidence.yaml")
    assert sweep.hydra.sweeper.params == {
        "method": "scratch,kd,cfl,cfl_no_rec,cfl_no_mmd",
        "seed": "0,1,2",
    }


def test_overlap2_is_fashion2_with_two_teachers_sharing_two_classes(tmp_path):
    cfg = make_cfg("amalgamate", ["experiment=overlap2", "sweep=methods"], tmp_path)
    base = make_cfg("amalgamate", ["experiment=fashion2"], tmp_path)
    a, b = (list(cfg.teacher_set[n].classes) for n in ("overlap_a", "overlap_b"))
    assert sorted(set(a) & set(b)) == [4, 5] and sorted(set(a) | set(b)) == list(range(10))
    for key in ("data", "student", "trainer", "optim", "targets", "teacher_cache", "method"):
        assert cfg[key] == base[key], key
    assert cfg.task_name == "overlap2"
    sweep = OmegaConf.load(Path(CONF_DIR) / "sweep" / "methods.yaml").hydra.sweeper.params
    assert sweep.method.split(",") == [
        "kd",
        "cfl",
        "cfl_spatial",
        "cfl_multi",
        "uhc",
        "lka",
        "hint",
    ]


@pytest.mark.parametrize("method", ["scratch", "kd", "cfl", "cfl_no_mmd", "cfl_no_rec"])
def test_mnist_fashion4_runs_each_method_at_its_recipe_chosen_on_validation(method, tmp_path):
    plain = make_cfg("amalgamate", [f"method={method}"], tmp_path)
    cfg = make_cfg(
        "amalgamate", ["experiment=mnist_fashion4", "sweep=evidence", f"method={method}"], tmp_path
    )
    assert cfg.targets._target_ == "amalgam.targets.DensityRatio" and cfg.teacher_cache.enabled
    assert cfg.trainer.precision == "bf16-mixed" and cfg.student.channels_last is True
    expected = dict(plain.method.weights or {})
    if method in ("cfl", "cfl_no_rec"):  # conf/tuned/mnist_fashion4/<method>.yaml
        expected["mmd"] = 1.0
    assert dict(cfg.method.weights or {}) == expected
    assert cfg.method.get("temperature") == plain.method.get("temperature")
    # the tuned recipe is a default: the command line still wins over it
    if "mmd" in expected:
        cli = make_cfg(
            "amalgamate",
            ["experiment=mnist_fashion4", f"method={method}", "method.weights.mmd=10.0"],
            tmp_path,
        )
        assert cli.method.weights.mmd == 10.0


def test_every_tuned_recipe_names_an_experiment_and_a_method_and_changes_them(tmp_path):
    # tuned/<experiment>/<method>.yaml is an optional default: a misspelt name would be skipped
    # silently, so every file must name a real pair and change that pair's composed config
    files = sorted((CONF / "tuned").glob("*/*.yaml"))
    assert files
    for f in files:
        exp, method = f.parent.name, f.stem
        assert exp in options("experiment") and method in options("method"), f
        over = [f"experiment={exp}", f"method={method}"]
        cfg = make_cfg("amalgamate", over, tmp_path)
        bare = make_cfg("amalgamate", [*over, "~tuned@_global_"], tmp_path)  # the opt-out
        tuned = OmegaConf.load(f)
        assert cfg != bare, f
        for key in tuned:
            assert cfg[key] == OmegaConf.merge(bare[key], tuned[key]), (f, key)
    # without an experiment nothing is tuned: the method's own file (reference weights)
    assert make_cfg("amalgamate", ["method=cfl"], tmp_path).method.weights.mmd == 10.0


@pytest.mark.parametrize("exp", ["fashion2", "mnist_fashion4"])
def test_rules_sweep_covers_every_target_rule_on_both_benchmarks(exp, tmp_path):
    sweep = OmegaConf.load(Path(CONF_DIR) / "sweep" / "rules.yaml")
    params = sweep.hydra.sweeper.params
    assert sorted(params.targets.split(",")) == sorted(options("targets"))
    assert params.seed == "0,1,2"
    for rule in params.targets.split(","):
        # a command-line rule wins over the experiment's own (fashion2 sets density_ratio)
        cfg = make_cfg(
            "amalgamate", [f"experiment={exp}", "sweep=rules", f"targets={rule}"], tmp_path
        )
        expected = OmegaConf.load(Path(CONF_DIR) / "targets" / f"{rule}.yaml")
        assert cfg.targets == expected, rule
        assert cfg.method._target_ == "amalgam.methods.CFL" and cfg.task_name == exp


@pytest.mark.parametrize("teacher", options("teacher"))
def test_every_teacher_composes_for_training(teacher, tmp_path):
    for exp in TEACHER_EXPERIMENTS:
        cfg = make_cfg("train_teacher", [f"teacher={teacher}", f"experiment={exp}"], tmp_path)
        OmegaConf.resolve(cfg)
        if teacher == "lite0_imagenet":  # a public file shipped in a package
            assert cfg.teacher.weights.endswith(".pth") and len(cfg.teacher.classes) == 1000
        else:
            assert cfg.teacher.weights.endswith(f"{cfg.teacher.name}.safetensors")


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm", "submitit_local", "joblib"])
def test_launchers_compose(launcher, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "amalgamate", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
        )
    assert "_target_" in cfg.hydra.launcher
    if launcher == "slurm":
        assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.tasks_per_node == 1


def test_evaluate_config_composes(tmp_path):
    cfg = make_cfg("evaluate", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.ckpt_path == "x.ckpt"


def test_method_variants_have_reference_weights(tmp_path):
    w = {
        m: make_cfg("amalgamate", [f"method={m}"], tmp_path).method.weights
        for m in ("cfl", "cfl_no_mmd", "cfl_no_rec", "kd")
    }
    assert dict(w["cfl"]) == {"kd": 1.0, "mmd": 10.0, "rec": 10.0}
    assert w["cfl_no_mmd"].mmd == 0 and w["cfl_no_mmd"].rec == 10
    assert w["cfl_no_rec"].rec == 0 and w["cfl_no_rec"].mmd == 10
    assert dict(w["kd"]) == {"kd": 1.0}


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"optim\.lrr"):
        make_cfg("amalgamate", ["optim.lrr=0.1"], tmp_path)
    msg = r"Could not override 'method\.tempreature'"
    with pytest.raises(ConfigCompositionException, match=msg):
        make_cfg("amalgamate", ["method.tempreature=2"], tmp_path)


def teacher_cfg(tmp_path, *overrides):
    return make_cfg(
        "train_teacher",
        ["teacher=tiny_a", "experiment=tiny_teachers", "logger=none", "callbacks=none", *overrides],
        tmp_path,
    )


def test_unknown_arch_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown architecture 'resnet181'"):
        train_teacher(teacher_cfg(tmp_path, "teacher.arch=resnet181"))


def test_class_absent_from_data_set(tmp_path):
    with pytest.raises(ConfigError, match="class 'zebra' is not in the data set"):
        train_teacher(teacher_cfg(tmp_path, "teacher.classes=[c0,zebra]"))


def test_empty_task(tmp_path):
    with pytest.raises(ConfigError, match="empty class list"):
        train_teacher(teacher_cfg(tmp_path, "teacher.classes=[]"))


def test_missing_teacher_weights_names_the_fix(tmp_path):
    cfg = make_cfg("amalgamate", ["experiment=tiny"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"teacher 'tiny_a'.*not found.*train_teacher teacher=tiny_a"
    ):
        build_amalgamation(cfg)


def test_unknown_student_arch(tiny_teachers):
    cfg = make_cfg("amalgamate", ["experiment=tiny", "student.arch=convnext_tinyy"], tiny_teachers)
    with pytest.raises(ConfigError, match=r"student\.arch.*convnext_tiny"):
        build_amalgamation(cfg)


def test_teacher_classes_must_match_its_file(tiny_teachers):
    cfg = make_cfg(
        "amalgamate", ["experiment=tiny", "teacher_set.tiny_a.classes=[0,1,3]"], tiny_teachers
    )
    with pytest.raises(ConfigError, match="differ from the classes its file was trained on"):
        build_amalgamation(cfg)


def test_head_size_differs_from_class_list(tiny_teachers, tmp_path):
    import shutil

    w = tmp_path / "nometa.safetensors"
    shutil.copy(tiny_teachers / "teachers" / "tiny_a.safetensors", w)  # no sidecar metadata
    cfg = make_cfg(
        "amalgamate",
        [
            "experiment=tiny",
            f"teacher_set.tiny_a.weights={w}",
            "teacher_set.tiny_a.classes=[0,1,2,3]",
        ],
        tiny_teachers,
    )
    with pytest.raises(ConfigError, match="head 'fc' has 3 outputs but the class list has 4"):
        build_amalgamation(cfg)


def test_dir_name_is_one_safe_directory_name():
    from amalgam.utils import dir_name

    assert dir_name("method=kd,seed=1") == "method=kd,seed=1"
    assert dir_name("paths.teachers_dir=/x/y,method=cfl") == "paths.teachers_dir=_x_y,method=cfl"
    long = ",".join(f"method.weights.w{i}={i}.5" for i in range(40))
    a, b = dir_name(long), dir_name(long.replace("39=39", "39=38"))
    assert len(a) == 120 and a != b and a.startswith("method.weights.w0=0.5")
    assert dir_name("") == ""
