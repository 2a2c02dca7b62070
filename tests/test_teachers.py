import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from amalgam.backbone import Backbone, check_arch
from amalgam.errors import ConfigError
from amalgam.teachers import (
    TeacherMeta,
    build_teacher,
    export_teacher,
    load_teacher_bank,
    module_hash,
    read_weights,
    resolve_meta,
)


def make(arch="test_resnet", k=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=k)


def exported(tmp_path, arch="test_resnet", k=3, name="t"):
    m = make(arch, k)
    meta = TeacherMeta(name=name, arch=arch, classes=[f"c{i}" for i in range(k)], input_size=32)
    return m, export_teacher(m, meta, tmp_path)


def test_export_and_load_back_identical_outputs(tmp_path):
    m, path = exported(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["arch"] == "test_resnet" and meta["classes"] == ["c0", "c1", "c2"]
    assert meta["sha256"] == module_hash(m)
    t = build_teacher(resolve_meta("t", path), path)
    x = torch.rand(4, 3, 32, 32)
    ref = Backbone(m.eval(), 3, 32, meta["mean"], meta["std"])
    out = t(x)
    assert torch.equal(out.logits, ref(x, features=False).logits)
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    assert out.features[0].shape == (4, 96, 1, 1)


def test_unknown_arch_names_close_matches():
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet181'.*resnet18"):
        check_arch("resnet181")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_weights(tmp_path / "nope.safetensors")


def test_truncated_file_is_refused(tmp_path):
    _, path = exported(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        build_teacher(resolve_meta("t", path), path)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(ConfigError, match="holds pickled Python code"):
        read_weights(p)


def test_head_size_must_match_class_list(tmp_path):
    _, path = exported(tmp_path, k=3)
    meta = resolve_meta("t", path, classes=["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="head 'fc' has 3 outputs but the class list has 4"):
        build_teacher(meta, path)


def test_wrong_architecture_for_weights(tmp_path):
    _, path = exported(tmp_path, arch="test_resnet")
    meta = resolve_meta("t", path, arch="test_convnext")
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        build_teacher(meta, path)


def test_torch_and_lightning_files_with_prefix_register(tmp_path):
    m = make(k=2)
    sd = {f"net.model.{k}": v for k, v in m.state_dict().items()}
    p = tmp_path / "lit.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, p)
    t = build_teacher(resolve_meta("x", p, arch="test_resnet", classes=["a", "b"]), p)
    assert module_hash(t.model) == module_hash(m)
    q = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in m.state_dict().items()}, q)
    t2 = build_teacher(resolve_meta("y", q, arch="test_resnet", classes=["a", "b"]), q)
    assert module_hash(t2.model) == module_hash(m)


def test_modified_file_fails_hash_check(tmp_path):
    m, path = exported(tmp_path)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["fc.bias"] += 1
    save_file(sd, str(path))
    with pytest.raises(ConfigError, match="differs from its metadata"):
        build_teacher(resolve_meta("t", path), path)


def test_metadata_needed_when_config_silent(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in make().state_dict().items()}, p)
    with pytest.raises(ConfigError, match="'arch' is unknown"):
        resolve_meta("w", p)


def test_bank_frozen_and_union_space(tmp_path):
    _, pa = exported(tmp_path, "test_resnet", 3, "a")
    mb = make("test_efficientnet", 2)
    pb = export_teacher(
        mb, TeacherMeta(name="b", arch="test_efficientnet", classes=["x", "y"]), tmp_path
    )
    bank = load_teacher_bank({"a": {"weights": str(pa)}, "b": {"weights": str(pb)}})
    assert bank.space.classes == ("c0", "c1", "c2", "x", "y")
    bank.train()
    assert not bank.training and all(not m.training for m in bank.modules())
    out = bank(torch.rand(2, 3, 24, 24))
    assert [o.shape[1] for o in out.logits] == [3, 2]
    assert not out.logits[0].requires_grad
    with pytest.raises(ConfigError, match="not found"):
        load_teacher_bank({"a": {"weights": str(tmp_path / "missing.safetensors")}})


def test_half_precision_bank_matches_float32_and_reports_file_hash(tmp_path):
    _, pa = exported(tmp_path, "test_resnet", 3, "a")
    entries = {"a": {"weights": str(pa)}}
    ref = load_teacher_bank(entries)
    half = load_teacher_bank(entries, dtype="bfloat16")
    assert next(half.teachers["a"].model.parameters()).dtype == torch.bfloat16
    assert half.teachers["a"].mean.dtype == torch.float32  # preprocessing stays float32
    x = torch.rand(8, 3, 24, 24)
    a, b = ref(x), half(x)
    assert b.logits[0].dtype == torch.float32 and b.features[0][0].dtype == torch.float32
    # bf16 keeps ~3 significant digits: logits agree to a few percent of their spread
    spread = a.logits[0].std()
    assert (a.logits[0] - b.logits[0]).abs().max() < 0.1 * spread
    assert half.hashes() == ref.hashes() == {"a": ref.metas["a"].sha256}
    with torch.no_grad():
        next(half.teachers["a"].model.parameters()).add_(1)
    assert half.hashes()["a"] != ref.metas["a"].sha256
    with pytest.raises(ConfigError, match="teacher_dtype"):
        load_teacher_bank(entries, dtype="half")


def test_channels_last_bank_same_outputs_and_hash(tmp_path):
    _, pa = exported(tmp_path, "test_resnet", 3, "a")
    entries = {"a": {"weights": str(pa)}}
    ref = load_teacher_bank(entries)
    nhwc = load_teacher_bank(entries, channels_last=True)
    conv = next(m for m in nhwc.teachers["a"].model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.rand(8, 3, 24, 24)
    a, b = ref(x), nhwc(x)
    torch.testing.assert_close(b.logits[0], a.logits[0], rtol=1e-4, atol=1e-5)
    for fa, fb in zip(a.features[0], b.features[0], strict=True):
        torch.testing.assert_close(fb, fa, rtol=1e-4, atol=1e-5)
    assert nhwc.hashes() == ref.hashes() == {"a": ref.metas["a"].sha256}
