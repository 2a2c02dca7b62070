"""Bad input is refused before any heavy work, with a message naming the key and the fix.

Cases already tested elsewhere are listed in docs/RELIABILITY.md; these are the others.
Teachers here are random-init exports (no training), so every test takes well under a second.
"""

import os
import pathlib
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import open_dict
from safetensors.torch import save_file

import amalgam.build
from amalgam.amalgamate import amalgamate
from amalgam.build import build_amalgamation
from amalgam.errors import ConfigError
from amalgam.launch import check_launch, resume_checkpoint
from amalgam.teachers.io import TeacherMeta, export_teacher, read_meta, read_weights
from amalgam.train_teacher import train_teacher
from amalgam.utils import to_dict
from amalgam.validate import (
    DataFacts,
    check_batch_size,
    data_facts,
    training_pool,
    validate_amalgamation,
    validate_teacher_training,
)
from conftest import make_cfg

TINY = {
    "tiny_a": ("test_resnet", ["c0", "c1", "c2"], 16),
    "tiny_b": ("test_efficientnet", ["c3", "c4", "c5"], 24),
}


def export(directory: Path, name: str, arch: str, classes: list[str], size: int | None) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=len(classes))
    meta = TeacherMeta(name=name, arch=arch, classes=classes, input_size=size)
    return export_teacher(model, meta, directory)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A root dir with random-init exports of the tiny teachers under teachers/."""
    r = tmp_path_factory.mktemp("fake")
    for name, (arch, classes, size) in TINY.items():
        export(r / "teachers", name, arch, classes, size)
    return r


def tiny(root: Path, *overrides: str, out: Path | None = None):
    return make_cfg("amalgamate", ["experiment=tiny", *overrides], root, out)


def teacher_cfg(root: Path, *overrides: str, out: Path | None = None):
    return make_cfg(
        "train_teacher",
        [
            "teacher=tiny_a",
            "experiment=tiny_teachers",
            "logger=none",
            "callbacks=none",
            "overwrite=true",  # root/teachers holds random exports of these teachers
            *overrides,
        ],
        root,
        out,
    )


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail loudly if the data module or the teachers were built (images read, forwards run)."""

    def boom(*args, **kwargs):
        raise AssertionError("heavy work started before the config was validated")

    monkeypatch.setattr(amalgam.build, "build_datamodule", boom)
    monkeypatch.setattr(amalgam.build, "load_teacher_bank", boom)
    monkeypatch.setattr("amalgam.train_teacher.build_datamodule", boom)


def test_tiny_and_demo_configs_pass(root):
    validate_amalgamation(tiny(root))
    validate_teacher_training(teacher_cfg(root))
    validate_teacher_training(teacher_cfg(root, "teacher=tiny_b"))
    for t in ("demo_a", "demo_b"):  # Fashion-MNIST: classes known without the data
        validate_teacher_training(
            make_cfg("train_teacher", [f"teacher={t}", "experiment=demo_teachers"], root)
        )


# ------------------------------------------------------------------------------ method


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
def test_loss_weight_negative_or_not_finite(root, no_heavy_work, value):
    with pytest.raises(ConfigError, match=r"method\.weights\.mmd=.*finite number >= 0"):
        build_amalgamation(tiny(root, f"method.weights.mmd={value}"))


def test_all_loss_weights_zero(root, no_heavy_work):
    zero = ["method.weights.kd=0", "method.weights.mmd=0", "method.weights.rec=0"]
    with pytest.raises(ConfigError, match=r"method\.weights are all zero.*method\.weights\.kd=1"):
        build_amalgamation(tiny(root, *zero))


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_temperature_not_positive(root, no_heavy_work, value):
    with pytest.raises(ConfigError, match=r"method\.temperature=.*> 0.*method\.temperature=1\.0"):
        build_amalgamation(tiny(root, f"method.temperature={value}"))


def test_kd_temperature_checked_too(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"method\.temperature=0"):
        build_amalgamation(tiny(root, "method=kd", "method.temperature=0"))


def test_empty_mmd_bandwidths(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"method\.sigmas=\[\].*non-empty list"):
        build_amalgamation(tiny(root, "method.sigmas=[]"))


@pytest.mark.parametrize("value", ["0", "-0.1", "nan"])
def test_non_positive_mmd_bandwidth(root, no_heavy_work, value):
    with pytest.raises(ConfigError, match=r"method\.sigmas\[1\]=.*finite number > 0"):
        build_amalgamation(tiny(root, f"method.sigmas=[0.1,{value}]"))


# ------------------------------------------------------------------------------ config keys


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+method.tempreature=2", r"'method\.tempreature'.*Did you mean 'method\.temperature'"),
        ("+method.weights.kdd=1", r"'method\.weights\.kdd'.*loss terms \['kd', 'mmd', 'rec'\]"),
        ("+data.imagesize=8", r"'data\.imagesize'.*Did you mean 'data\.image_size'"),
        ("+data.source.chanels=1", r"'data\.source\.chanels'.*'data\.source\.channels'"),
        ("+student.input_sise=8", r"'student\.input_sise'.*'student\.input_size'"),
        ("+teacher_set.tiny_a.clases=[0]", r"'teacher_set\.tiny_a\.clases'.*classes"),
    ],
)
def test_unknown_key_hydra_lets_through(root, no_heavy_work, override, message):
    """`+key=` and keys in yaml files pass Hydra's struct check; validation names them."""
    with pytest.raises(ConfigError, match=rf"unknown config key {message}"):
        build_amalgamation(tiny(root, override))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.in_chans=three", r"student\.in_chans='three': must be an integer"),
        ("student.pretrained=maybe", r"student\.pretrained='maybe': must be true or false"),
        ("student.input_size=[8,8]", r"student\.input_size=\[8, 8\]: must be an integer or null"),
        ("student.model_kwargs=7", r"student\.model_kwargs=7: must be a mapping"),
        ("teacher_cache.views=many", r"teacher_cache\.views='many': must be an integer"),
        (
            "+teacher_cache.view=2",
            r"unknown config key 'teacher_cache\.view'.*'teacher_cache\.views'",
        ),
        ("teacher_set.tiny_a.input_size=big", r"teacher_set\.tiny_a\.input_size='big': must be an"),
    ],
)
def test_schema_refuses_wrong_types_and_keys(root, no_heavy_work, override, message):
    """The schemas (amalgam.schemas) refuse a value of the wrong type, as one line that names
    the key, before any image is read."""
    with pytest.raises(ConfigError, match=message):
        build_amalgamation(tiny(root, override))


def test_schemas_are_the_keys_the_builders_read():
    """Every key of a shipped student and teacher preset is in its schema, and the schemas are
    in Hydra's ConfigStore for configs of one's own."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from amalgam.schemas import StudentConfig, TeacherConfig, conform
    from amalgam.utils import CONF_DIR

    for group, schema in (("student", StudentConfig), ("teacher", TeacherConfig)):
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(path))
            raw = {k: v for k, v in raw.items() if k != "defaults"}
            raw = {k: None if isinstance(v, str) and "${" in v else v for k, v in raw.items()}
            conform(raw, schema, group)  # raises on a key or type the schema does not take
    stored = ConfigStore.instance().repo["schema"]
    assert {"student.yaml", "teacher.yaml", "teacher_cache.yaml"} <= set(stored)


def test_unknown_teacher_key_in_teacher_training(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"unknown config key 'teacher\.input_sizee'"):
        train_teacher(teacher_cfg(root, "+teacher.input_sizee=8"))


# ------------------------------------------------------------------------------ teachers


def test_zero_teachers(root, no_heavy_work):
    cfg = tiny(root)
    with open_dict(cfg):
        cfg.teacher_set = {}
    with pytest.raises(ConfigError, match=r"teacher_set is empty.*teacher_set=fashion2"):
        build_amalgamation(cfg)


def test_union_of_one_class(root, tmp_path, no_heavy_work):
    w = export(tmp_path, "one", "test_resnet", ["c0"], 16)
    cfg = tiny(root, f"teacher_set.tiny_a.weights={w}", "teacher_set.tiny_a.classes=[c0]")
    with open_dict(cfg):
        del cfg.teacher_set["tiny_b"]
    with pytest.raises(ConfigError, match=r"one class \['c0'\].*at least 2"):
        build_amalgamation(cfg)


def test_teacher_with_one_class_is_not_trained(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"task 'tiny_a' has one class \['c0'\]"):
        train_teacher(teacher_cfg(root, "teacher.classes=[c0]"))


def test_duplicate_class_in_teacher_config(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"task 'tiny_a': duplicate classes \['c1'\]"):
        train_teacher(teacher_cfg(root, "teacher.classes=[c0,c1,1]"))


def test_teacher_weights_of_unknown_or_negative(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"method\.teacher_weights\.tiny_c: there is no teacher"):
        build_amalgamation(tiny(root, "+method.teacher_weights.tiny_c=2"))
    with pytest.raises(
        ConfigError, match=r"method\.teacher_weights\.tiny_a=-1.*finite number >= 0"
    ):
        build_amalgamation(tiny(root, "+method.teacher_weights.tiny_a=-1"))


def test_target_rule_checked_against_the_teachers(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"targets\.prior names unknown teachers \['tiny_c'\]"):
        build_amalgamation(tiny(root, "+targets.prior.tiny_c=2"))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_teacher_file_found_from_its_header(root, tmp_path, no_heavy_work, how):
    w = export(tmp_path, "tiny_a", "test_resnet", TINY["tiny_a"][1], 16)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ConfigError, match=r"teacher 'tiny_a' weights file .* truncated or corrupt"):
        build_amalgamation(tiny(root, f"teacher_set.tiny_a.weights={w}"))


def test_weights_of_another_architecture_found_from_the_header(root, no_heavy_work):
    cfg = tiny(root, "teacher_set.tiny_a.arch=test_efficientnet")
    with pytest.raises(ConfigError, match=r"teacher 'tiny_a'.*do not fit the architecture"):
        build_amalgamation(cfg)


def test_weights_with_other_shapes(root, tmp_path, no_heavy_work):
    w = tmp_path / "wide.safetensors"
    sd = timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, w)
    cfg = tiny(root, f"teacher_set.tiny_a.weights={w}")
    shapes = r"shape mismatches \['conv1\.0\.weight: file \(16, 1, 3, 3\) vs model \(16, 3, 3, 3\)"
    with pytest.raises(ConfigError, match=shapes):
        build_amalgamation(cfg)


# ------------------------------------------------------------------------------ student


def test_student_num_classes_differs_from_union(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"student\.num_classes=5 but the union .* has 6"):
        build_amalgamation(tiny(root, "+student.num_classes=5"))


def test_student_model_kwargs_num_classes(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"remove student\.model_kwargs\.num_classes"):
        build_amalgamation(tiny(root, "+student.model_kwargs.num_classes=6"))


# ------------------------------------------------------------------------------ image size


def test_student_input_below_its_stride(root, no_heavy_work):
    with pytest.raises(
        ConfigError,
        match=r"student \(test_convnext\) cannot take 8 px images \(student\.input_size=8\): "
        r"its total stride is 32.*set student\.input_size >= 32",
    ):
        build_amalgamation(tiny(root, "student.input_size=8"))


def test_data_image_size_below_student_stride(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"8 px images \(data\.image_size=8\).*>= 32"):
        build_amalgamation(tiny(root, "student.input_size=null", "data.image_size=8"))


def test_teacher_input_below_its_stride(root, tmp_path, no_heavy_work):
    w = export(tmp_path, "tiny_a", "test_convnext", TINY["tiny_a"][1], None)
    a = [f"teacher_set.tiny_a.weights={w}", "teacher_set.tiny_a.arch=test_convnext"]
    validate_amalgamation(tiny(root, *a, "teacher_set.tiny_a.input_size=32"))  # resized: fine
    with pytest.raises(
        ConfigError,
        match=r"teacher 'tiny_a' \(test_convnext\) cannot take 16 px images "
        r"\(data\.image_size=16\): its total stride is 32",
    ):
        build_amalgamation(tiny(root, *a))


def test_teacher_training_input_below_stride(root, no_heavy_work):
    cfg = teacher_cfg(root, "teacher.arch=test_convnext", "data.image_size=8")
    with pytest.raises(ConfigError, match=r"test_convnext\) cannot take 8 px.*data\.image_size"):
        train_teacher(cfg)


# ------------------------------------------------------------------------------ channels


def test_gray_data_for_rgb_networks_is_converted(root):
    validate_amalgamation(tiny(root, "data.source.channels=1", "data.channels=1"))
    validate_amalgamation(tiny(root, "data.source.channels=1"))  # grey source, 3-channel data


def test_student_channels_without_a_rule(root, no_heavy_work):
    with pytest.raises(
        ConfigError, match=r"student.*student\.in_chans.*data\.channels=3: no rule turns 3"
    ):
        build_amalgamation(tiny(root, "student.in_chans=2"))


def test_teacher_channels_without_a_rule(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"teacher 'tiny_a'.*4-channel.*no rule turns 3 channels"):
        build_amalgamation(tiny(root, "teacher_set.tiny_a.in_chans=4"))


def test_source_channels_without_a_rule(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"data source 'synthetic' gives 2-channel images"):
        build_amalgamation(tiny(root, "data.source.channels=2"))
    with pytest.raises(ConfigError, match=r"no rule turns 2 channels into 3"):
        train_teacher(teacher_cfg(root, "data.source.channels=2"))


# ------------------------------------------------------------------------------ batch size


def test_training_pool_counted_without_images(root):
    data = to_dict(tiny(root).data)
    facts = data_facts(data["source"])
    assert facts.classes == [f"c{i}" for i in range(10)] and facts.channels == 3
    # 64 images per class, val_fraction 0.1 -> round(6.4) = 6 to val, 58 train; 6 union classes
    assert training_pool(data, facts, TINY["tiny_a"][1] + TINY["tiny_b"][1]) == (348, True)
    assert training_pool({**data, "train_limit": 100}, facts, None) == (100, True)
    assert training_pool({**data, "train_limit": 100}, DataFacts(), None) == (100, False)


def test_batch_larger_than_data_with_drop_last(root):
    data = to_dict(teacher_cfg(root, "data.train_limit=20").data)
    facts = data_facts(data["source"])
    pool = training_pool(data, facts, ["c0", "c1", "c2"])
    check_batch_size(data, *pool)  # AmalgamDataModule keeps the last batch: one short batch
    with pytest.raises(
        ConfigError, match=r"data\.batch_size=32 is larger than the 20 training images.*drop_last"
    ):
        check_batch_size({**data, "drop_last": True}, *pool)


def test_drop_last_is_not_a_data_key_today(root, no_heavy_work):
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.drop_last'"):
        train_teacher(teacher_cfg(root, "+data.drop_last=true"))


# ------------------------------------------------------------------------------ directories


def test_output_dir_under_a_file(root, tmp_path, no_heavy_work):
    f = tmp_path / "file.txt"
    f.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"paths\.output_dir=.*file\.txt/sub' is not writable"):
        amalgamate(tiny(root, out=f / "sub"))


def test_output_dir_write_refused(root, tmp_path, monkeypatch, no_heavy_work):
    """As root a chmod does not deny writes: simulate the refusal of the probe file."""
    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(ConfigError, match=r"paths\.output_dir=.* not writable \(PermissionError"):
        amalgamate(tiny(root, out=out))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_output_dir_read_only_for_a_user(root, tmp_path):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_launch(tiny(root, out=out))


def test_teacher_export_dir_not_writable(root, tmp_path, no_heavy_work):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(
        ConfigError, match=r"teacher\.weights=.*file\.txt/tiny_a\.safetensors' is not writable"
    ):
        train_teacher(teacher_cfg(root, f"teacher.weights={f}/tiny_a.safetensors"))


def folders(tmp_path: Path) -> tuple[Path, Path]:
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
    return tmp_path / "train", tmp_path / "test"


def test_data_dir_under_a_file(root, tmp_path, no_heavy_work):
    _, test = folders(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    cfg = tiny(
        root, "data=image_folder", f"data.source.train_dir={f}/sub", f"data.source.test_dir={test}"
    )
    with pytest.raises(ConfigError, match=r"data\.source\.train_dir=.*cannot be a directory"):
        build_amalgamation(cfg)


def test_data_dir_without_read_permission(root, tmp_path, monkeypatch, no_heavy_work):
    """As root chmod 000 does not deny reads: simulate the refusal of the directory listing."""
    train, test = folders(tmp_path)
    real = os.scandir

    def scandir(path="."):
        if Path(path) == test:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    cfg = tiny(
        root, "data=image_folder", f"data.source.train_dir={train}", f"data.source.test_dir={test}"
    )
    with pytest.raises(ConfigError, match=r"data\.source\.test_dir=.*cannot be read.*chmod"):
        build_amalgamation(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 directory anyway")
def test_data_dir_chmod_000_for_a_user(root, tmp_path):
    train, test = folders(tmp_path)
    test.chmod(0)
    try:
        cfg = tiny(
            root,
            "data=image_folder",
            f"data.source.train_dir={train}",
            f"data.source.test_dir={test}",
        )
        with pytest.raises(ConfigError, match="cannot be read"):
            validate_amalgamation(cfg)
    finally:
        test.chmod(0o700)


# ------------------------------------------------------------------------------ ckpt_path


def fake_checkpoint(path: Path, teachers: dict) -> Path:
    torch.save({"state_dict": {}, "amalgam": {"teachers": teachers}}, path)
    return path


def record(root: Path) -> dict:
    out = {}
    for name in TINY:
        w = root / "teachers" / f"{name}.safetensors"
        out[name] = {"path": str(w), "meta": read_meta(w)}
    return out


def test_ckpt_path_missing(root, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path '.*nope\.ckpt' not found: give a checkpoint"):
        resume_checkpoint(tiny(root, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_ckpt_path_of_the_same_teacher_set_is_accepted(root, tmp_path):
    p = fake_checkpoint(tmp_path / "ok.ckpt", record(root))
    assert resume_checkpoint(tiny(root, f"ckpt_path={p}")) == p


def test_ckpt_path_of_other_teachers(root, tmp_path):
    p = fake_checkpoint(tmp_path / "other.ckpt", {"fashion_a": {}, "fashion_b": {}})
    with pytest.raises(
        ConfigError,
        match=r"belongs to another teacher set: it was trained with teachers "
        r"\['fashion_a', 'fashion_b'\], this run's teacher_set has \['tiny_a', 'tiny_b'\]",
    ):
        resume_checkpoint(tiny(root, f"ckpt_path={p}"))


def test_ckpt_path_of_retrained_teacher(root, tmp_path):
    rec = record(root)
    rec["tiny_b"]["meta"] = {**rec["tiny_b"]["meta"], "sha256": "0" * 64}
    p = fake_checkpoint(tmp_path / "stale.ckpt", rec)
    with pytest.raises(ConfigError, match=r"its teacher 'tiny_b' had weights 000000000000"):
        resume_checkpoint(tiny(root, f"ckpt_path={p}"))


def test_ckpt_path_last_is_checked_too(root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    fake_checkpoint(out / "checkpoints" / "last.ckpt", {"x": {}})
    with pytest.raises(ConfigError, match="belongs to another teacher set"):
        resume_checkpoint(tiny(root, "ckpt_path=last", out=out))
    assert resume_checkpoint(tiny(root, "ckpt_path=last", out=tmp_path / "fresh")) is None


# ------------------------------------------------------------------------------ safe loading


class Payload:
    """Unpickling this creates `marker`: stands for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: a full unpickle of such a file does run the code."""
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # never done by amalgam
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_code_in_teacher_weights_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    p = tmp_path / f"evil{suffix}"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, p)
    with pytest.raises(
        ConfigError, match=r"holds pickled Python code, not only tensors.*refused for safety"
    ):
        read_weights(p, "teacher 'evil' weights")
    assert not marker.exists()


def test_code_in_teacher_weights_refused_by_validation(root, tmp_path, no_heavy_work):
    marker = tmp_path / "pwned"
    p = tmp_path / "tiny_a.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 1)}, "x": Payload(marker)}, p)
    cfg = tiny(root, f"teacher_set.tiny_a.weights={p}")
    with pytest.raises(
        ConfigError, match=r"teacher 'tiny_a' weights file .* holds pickled Python code"
    ):
        build_amalgamation(cfg)
    assert not marker.exists()


def test_code_in_ckpt_path_never_runs(root, tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "amalgam": {"teachers": Payload(marker)}}, p)
    with pytest.raises(
        ConfigError, match=r"ckpt_path file '.*evil\.ckpt' holds pickled Python code"
    ):
        resume_checkpoint(tiny(root, f"ckpt_path={p}"))
    assert not marker.exists()


def test_bf16_on_a_cpu_without_native_bf16_warns_and_names_the_fix(monkeypatch, caplog):
    import logging

    import amalgam.validate as v

    caplog.set_level(logging.WARNING, logger="amalgam")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(v, "cpu_has_native_bf16", lambda: False)
    v.check_precision({"precision": "bf16-mixed", "accelerator": "auto"})
    assert "trainer.precision=32-true" in caplog.text
    caplog.clear()
    v.check_precision({"precision": "32-true", "accelerator": "cpu"})
    monkeypatch.setattr(v, "cpu_has_native_bf16", lambda: True)
    v.check_precision({"precision": "bf16-mixed", "accelerator": "cpu"})
    assert caplog.text == ""


# ------------------------------------------------------------------------------ run values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", r"optim\.lr=nan: must be a finite number > 0; set e\.g\. optim\.lr=1e-3"),
        ("optim.lr=0", r"optim\.lr=0: must be a finite number > 0"),
        ("optim.lr=-1e-3", r"optim\.lr=-0\.001: must be a finite number > 0"),
        ("optim.weight_decay=inf", r"optim\.weight_decay=inf: must be a finite number >= 0"),
        ("optim.lr_mult.head=nan", r"optim\.lr_mult\.head=nan: must be a finite number >= 0"),
        ("optim.betas=[0.9,1.5]", r"optim\.betas\[1\]=1\.5: must be < 1"),
        ("trainer.max_epochs=0", r"trainer\.max_epochs=0: the network would not train"),
        ("trainer.max_epochs=-5", r"trainer\.max_epochs=-5: the network would not train"),
        ("trainer.max_epochs=-1", r"max_epochs=-1 without trainer\.max_steps would train forever"),
        ("+trainer.max_steps=0", r"trainer\.max_steps=0: give -1 \(no limit\)"),
        ("student.std=[0.5,0.0,0.5]", r"student\.std\[1\]=0\.0: must be a finite number > 0"),
        ("teacher_set.tiny_a.std=0", r"teacher_set\.tiny_a\.std=0: must be a finite number > 0"),
        ("teacher_set.tiny_b.mean=nan", r"teacher_set\.tiny_b\.mean=nan: must be a finite"),
        ("seed=abc", r"seed='abc' is not an integer: set seed to an integer, e\.g\. seed=0"),
    ],
)
def test_values_that_slip_through_up_front(root, no_heavy_work, override, message):
    with pytest.raises(ConfigError, match=message):
        build_amalgamation(tiny(root, override))


def test_seed_is_checked_before_anything_seeds_with_it(root):
    with pytest.raises(ConfigError, match="seed='abc' is not an integer"):
        check_launch(tiny(root, "seed=abc"))


def test_teacher_std_of_zero_in_its_metadata_file(root, tmp_path, no_heavy_work):
    import json

    src = root / "teachers" / "tiny_a.safetensors"
    dst = tmp_path / "tiny_a.safetensors"
    dst.write_bytes(src.read_bytes())
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["std"] = [0.0, 0.2, 0.2]
    dst.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"teacher_set\.tiny_a\.std\[0\]=0\.0: must be"):
        build_amalgamation(tiny(root, f"teacher_set.tiny_a.weights={dst}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", r"optim\.lr=nan: must be a finite number > 0"),
        ("trainer.max_epochs=0", r"trainer\.max_epochs=0: the network would not train"),
        ("teacher.std=0", r"teacher\.std=0: must be a finite number > 0"),
        ("seed=abc", r"seed='abc' is not an integer"),
    ],
)
def test_values_checked_in_teacher_training(root, no_heavy_work, override, message):
    with pytest.raises(ConfigError, match=message):
        train_teacher(teacher_cfg(root, override))
