import pytest
import timm
import torch

from amalgam.backbone import Backbone, ModelOutput
from amalgam.errors import ConfigError
from amalgam.evaluation import AmalgamAccuracy
from amalgam.methods import CFL, KD, CommonFeatureBlock, Scratch
from amalgam.module import AmalgamModule, images_of
from amalgam.tasks import LabelSpace
from amalgam.teachers import TeacherMeta, export_teacher, load_teacher_bank


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    torch.manual_seed(0)
    specs = {
        "a": ("test_resnet", ["a0", "a1", "a2"], None),
        "b": ("test_efficientnet", ["b0", "b1"], 24),
    }
    entries = {}
    for name, (arch, classes, size) in specs.items():
        m = timm.create_model(arch, num_classes=len(classes))
        p = export_teacher(
            m, TeacherMeta(name=name, arch=arch, classes=classes, input_size=size), d
        )
        entries[name] = {"weights": str(p)}
    return load_teacher_bank(entries)


def student(k=5):
    torch.manual_seed(1)
    return Backbone(timm.create_model("test_convnext", num_classes=k), input_size=32)


def shapes(bank, s, size=16):
    return (
        s.feature_shapes(size, 3),
        {n: t.feature_shapes(size, 3) for n, t in bank.teachers.items()},
    )


@pytest.mark.parametrize("method", ["cfl", "cfl_pooled", "cfl_bn_interp", "kd"])
def test_terms_finite_with_gradient_on_student_and_block_not_teachers(bank, method):
    s = student()
    ss, ts = shapes(bank, s)
    if method == "kd":
        m = KD(bank.space)
    else:
        kw = {
            "cfl_pooled": {"pooled": True},
            "cfl_bn_interp": {"batchnorm": True, "resize": "interpolate", "spatial_size": 2},
        }
        m = CFL(bank.space, ss, ts, hidden=8, **kw.get(method, {}))
    module = AmalgamModule(bank, s, m, {"lr": 1e-3})
    x = torch.rand(6, 3, 16, 16)
    terms = module.losses(x)
    want = {"kd"} if method == "kd" else {"kd", "mmd", "rec"}
    assert set(terms) == want
    for name, v in terms.items():
        assert torch.isfinite(v) and v.dtype == torch.float32, name
    # each term separately reaches what it should
    for name, v in terms.items():
        module.zero_grad(set_to_none=True)
        v.backward(retain_graph=True)
        if name in ("kd", "mmd"):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters()), name
        if name in ("mmd", "rec"):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), name
        assert all(p.grad is None for p in bank.parameters()), name
    if method != "kd":
        # the MMD gradient also reaches the teacher-side align layers of the block
        module.zero_grad(set_to_none=True)
        terms["mmd"].backward(retain_graph=True)
        assert m.blocks[0].align_t[0][0].weight.grad.abs().sum() > 0
        assert m.blocks[0].extractor[0].body[0].weight.grad.abs().sum() > 0


def test_optimizer_excludes_teachers(bank):
    s = student()
    ss, ts = shapes(bank, s)
    module = AmalgamModule(bank, s, CFL(bank.space, ss, ts, hidden=8), {"lr": 1e-3})

    class T:  # the two trainer attributes configure_optimizers reads
        estimated_stepping_batches = 10
        max_epochs = 1

    module._trainer = T()
    opt = module.configure_optimizers()["optimizer"]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in bank.parameters()}
    assert ids == {id(p) for p in list(s.parameters()) + list(module.method.parameters())}
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"body": 1e-3, "head": 1e-3, "method": 1e-3}
    sd = module.state_dict()
    assert sd and not [k for k in sd if k.startswith("teachers.")]
    module.train()
    assert module.student.training and not any(t.training for t in bank.modules())


def test_block_brings_heterogeneous_maps_to_one_size():
    blk = CommonFeatureBlock((8, 4, 4), [(6, 2, 2), (5, 7, 7)], hidden=4)
    hs, hts, recs, tg = blk(
        torch.rand(3, 8, 4, 4), [torch.rand(3, 6, 2, 2), torch.rand(3, 5, 7, 7)]
    )
    assert hs.shape == (3, 4, 2, 2) and [h.shape for h in hts] == [(3, 4, 2, 2)] * 2
    assert [r.shape for r in recs] == [(3, 6, 2, 2), (3, 5, 2, 2)]
    assert [t.shape for t in tg] == [(3, 6, 2, 2), (3, 5, 2, 2)]
    # the extractor is one module shared by every network
    assert (
        sum(isinstance(m, torch.nn.Sequential) and m is blk.extractor for m in blk.modules()) == 1
    )
    # one extractor pass over all networks' rows equals one pass per network
    fs, fts = torch.rand(3, 8, 4, 4), [torch.rand(3, 6, 2, 2), torch.rand(3, 5, 7, 7)]
    hs, hts, _, tg = blk(fs, fts)
    torch.testing.assert_close(hs, blk.extractor(blk.align_s(blk.to_common_size(fs))))
    for h, a, t in zip(hts, blk.align_t, tg, strict=True):
        torch.testing.assert_close(h, blk.extractor(a(t)))
    blk3 = CommonFeatureBlock(
        (8, 4, 4), [(6, 2, 2)], hidden=4, spatial_size=3, resize_rule="interpolate"
    )
    assert blk3(torch.rand(2, 8, 4, 4), [torch.rand(2, 6, 2, 2)])[0].shape == (2, 4, 3, 3)
    with pytest.raises(ConfigError, match="resize"):
        CommonFeatureBlock((8, 4, 4), [(6, 2, 2)], resize_rule="nearest-ish")


def test_kd_loss_is_the_reference_loss_on_concatenated_logits(bank):
    from amalgam.backbone import ModelOutput
    from amalgam.losses import soft_target_loss
    from amalgam.teachers.bank import TeacherOutputs

    la, lb, s = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 5)
    kd = KD(bank.space, temperature=2.0)
    got = kd(ModelOutput(s, []), TeacherOutputs([la, lb], [[], []]))["kd"]
    want = soft_target_loss(s, torch.cat([la, lb], 1), 2.0)
    torch.testing.assert_close(got, want)


def test_scratch_is_marked_as_using_labels():
    sp = LabelSpace.from_mapping({"a": ["x", "y"]})
    m = Scratch(sp)
    assert m.uses_labels and not m.uses_teachers and not KD(sp).uses_labels
    assert not CFL.uses_labels


def test_scratch_loss_is_cross_entropy_whatever_the_temperature():
    sp = LabelSpace.from_mapping({"a": ["x", "y"], "b": ["z"]})
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    want = torch.nn.functional.cross_entropy(logits, labels)
    for m in (Scratch(sp), Scratch(sp, temperature=4.0)):  # a sweep-wide T is ignored here
        torch.testing.assert_close(m(ModelOutput(logits, []), None, labels)["ce"], want)


def test_amalgamation_batches_refuse_labels():
    x = torch.rand(2, 3, 8, 8)
    assert images_of({"image": x, "index": torch.arange(2)}) is x
    with pytest.raises(ValueError, match="images, ids and view ids only"):
        images_of({"image": x, "label": torch.zeros(2)})
    with pytest.raises(TypeError, match="unlabeled batches"):
        images_of((x, torch.zeros(2)))


def test_amalgam_accuracy_matches_brute_force():
    space = LabelSpace.from_mapping({"a": ["p", "q", "r"], "b": ["s", "t"]})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    m = AmalgamAccuracy(space)
    m.update(logits[:70], labels[:70])
    m.update(logits[70:], labels[70:])
    got = m.compute()
    for name, idx in (("a", [0, 1, 2]), ("b", [3, 4])):
        rows = [i for i in range(200) if int(labels[i]) in idx]
        ok = sum(idx[int(logits[i, idx].argmax())] == int(labels[i]) for i in rows)
        assert float(got[name]) == pytest.approx(ok / len(rows))
    assert float(got["joint"]) == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    # class ids beyond 255 do not wrap (the reference's uint8 defect)
    big = LabelSpace.from_mapping({"t": [f"c{i}" for i in range(300)]})
    mb = AmalgamAccuracy(big)
    lg = torch.zeros(1, 300)
    lg[0, 290] = 1
    mb.update(lg, torch.tensor([290]))
    assert float(mb.compute()["joint"]) == 1.0


@pytest.mark.parametrize("k", [1, 3])
def test_map_conv_on_1x1_maps_equals_padded_conv(k):
    from amalgam.methods.cfl import MapConv

    torch.manual_seed(0)
    fast = MapConv(6, 4, k)
    ref = torch.nn.Conv2d(6, 4, k, padding=k // 2)
    ref.load_state_dict(fast.state_dict())
    for shape in ((5, 6, 1, 1), (5, 6, 3, 3)):
        x = torch.randn(*shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        a, b = fast(x), ref(x2)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)
        fast.zero_grad()
        ref.zero_grad()


def test_map_conv_point_holds_the_centre_tap_and_trains_as_the_full_kernel():
    from amalgam.methods.cfl import MapConv

    torch.manual_seed(0)
    full = MapConv(6, 4, 3)
    torch.manual_seed(0)
    point = MapConv(6, 4, 3, point=True)
    assert point.weight.shape == (4, 6, 1, 1)  # 9x fewer parameters
    # the same draw: the centre tap of the full kernel, the same bias
    assert torch.equal(point.weight[:, :, 0, 0], full.weight[:, :, 1, 1])
    assert torch.equal(point.bias, full.bias)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in (full, point)]
    x = torch.randn(5, 6, 1, 1)
    # Adam with L2 decay moves the full kernel's dead taps, never the output (equal to rounding:
    # the matrix product reads a strided centre tap there, a contiguous one here)
    for _ in range(3):
        for m, o in zip((full, point), opts, strict=True):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    torch.testing.assert_close(point(x), full(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        point.weight[:, :, 0, 0], full.weight[:, :, 1, 1], rtol=1e-6, atol=1e-7
    )
    # a checkpoint of the full layer loads as its centre tap
    fresh = MapConv(6, 4, 3, point=True)
    fresh.load_state_dict(full.state_dict())
    assert torch.equal(fresh.weight[:, :, 0, 0], full.weight[:, :, 1, 1])
    with pytest.raises(ValueError, match="1x1 maps"):
        point(torch.randn(2, 6, 3, 3))


def test_block_on_1x1_maps_equals_the_block_with_full_kernels(monkeypatch):
    """The common-feature block on 1x1 maps keeps only centre taps: same outputs, same
    training, about 2.6x fewer parameters (the demo's shapes)."""
    import amalgam.methods.cfl as cfl

    shapes = ((512, 1, 1), [(512, 1, 1), (320, 1, 1)])
    torch.manual_seed(0)
    lean = CommonFeatureBlock(*shapes)

    class FullKernels(cfl.MapConv):
        def __init__(self, cin, cout, k=1, bias=True, point=False):
            super().__init__(cin, cout, k, bias)

    monkeypatch.setattr(cfl, "MapConv", FullKernels)
    torch.manual_seed(0)
    full = CommonFeatureBlock(*shapes)
    n_lean = sum(p.numel() for p in lean.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    # the 3x3 layers: extractor 256->128, three 128->128, decoders 128->512 and 128->320
    k3 = 256 * 128 + 3 * 128 * 128 + 128 * 512 + 128 * 320
    assert n_full == 2_440_192 and n_full - n_lean == 8 * k3  # 932,864 left
    fs, fts = torch.randn(8, 512, 1, 1), [torch.randn(8, 512, 1, 1), torch.randn(8, 320, 1, 1)]
    opts = [torch.optim.Adam(b.parameters(), lr=1e-3, weight_decay=1e-4) for b in (lean, full)]
    for _ in range(3):
        outs = []
        for b, o in zip((lean, full), opts, strict=True):
            hs, hts, recs, _ = b(fs, fts)
            loss = sum(h.square().mean() for h in (hs, *hts)) + sum(r.mean() for r in recs)
            o.zero_grad()
            loss.backward()
            o.step()
            outs.append(torch.cat([t.flatten() for t in (hs, *hts, *recs)]))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    # the full block's checkpoint loads into the lean one
    monkeypatch.undo()
    fresh = CommonFeatureBlock(*shapes)
    fresh.load_state_dict(full.state_dict())
    torch.testing.assert_close(fresh(fs, fts)[0], full(fs, fts)[0], rtol=1e-6, atol=1e-7)


def test_loss_terms_logged_only_on_logger_steps(bank, monkeypatch):
    """No per-step logging (each logged value is read back with .item(): a GPU sync)."""
    s = student()
    ss, ts = shapes(bank, s)
    module = AmalgamModule(bank, s, KD(bank.space, ss, ts), {"lr": 1e-3})

    class T:
        log_every_n_steps = 4
        global_step = 0

    module._trainer = T()
    logged = []
    monkeypatch.setattr(module, "log_dict", lambda d, **kw: logged.append(T.global_step))
    monkeypatch.setattr(module, "log", lambda *a, **kw: None)
    batch = {"image": torch.rand(4, 3, 16, 16), "index": torch.arange(4)}
    for step in range(10):
        T.global_step = step
        loss = module.training_step(batch, step)
        assert loss.requires_grad and torch.isfinite(loss)
    assert logged == [0, 3, 7]  # the first step, then Lightning's logger steps (n + 1) % 4 == 0


def test_per_teacher_weights_scale_that_teachers_mmd_and_reconstruction(bank):
    from amalgam.losses import mmd, reconstruction_loss

    s = student()
    ss, ts = shapes(bank, s)
    torch.manual_seed(3)
    m = CFL(bank.space, ss, ts, hidden=8, teacher_weights={"a": 0.0, "b": 3.0})
    module = AmalgamModule(bank, s, m, {"lr": 1e-3})
    x = torch.rand(6, 3, 16, 16)
    terms = module.losses(x)
    so, to = s(x), bank(x)
    hs, hts, recs, tg = m.blocks[0](so.features[0], [f[0] for f in to.features])
    w = m.weights
    torch.testing.assert_close(terms["mmd"], w["mmd"] * 3.0 * mmd(hs, hts[1], m.sigmas))
    torch.testing.assert_close(terms["rec"], w["rec"] * 3.0 * reconstruction_loss(recs[1], tg[1]))
    with pytest.raises(ConfigError, match="unknown teachers"):
        CFL(bank.space, ss, ts, teacher_weights={"zz": 1.0})


def test_without_mmd_the_student_gets_exactly_kds_gradient(bank):
    # cfl_no_mmd = KD + reconstruction: the decoders see only teacher-side features, so nothing
    # of the common-feature block reaches the student; its gradient is KD's, bit for bit (which
    # is why cfl_no_mmd equals kd to the last digit in every seed of docs/RESULTS.md)
    x = torch.rand(6, 3, 16, 16)
    grads = {}
    for name in ("kd", "cfl_no_mmd", "cfl"):
        s = student()
        ss, ts = shapes(bank, s)
        torch.manual_seed(3)
        if name == "kd":
            m = KD(bank.space)
        else:
            w = {"kd": 1.0, "mmd": 0.0 if name == "cfl_no_mmd" else 10.0, "rec": 10.0}
            m = CFL(bank.space, ss, ts, hidden=8, weights=w)
        module = AmalgamModule(bank, s, m, {"lr": 1e-3})
        terms = module.losses(x)
        sum(terms.values()).backward()
        grads[name] = [p.grad.clone() for p in s.parameters()]
        if name == "cfl_no_mmd":
            assert "mmd" not in terms and terms["rec"] > 0
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    for g_kd, g_no_mmd in zip(grads["kd"], grads["cfl_no_mmd"], strict=True):
        torch.testing.assert_close(g_no_mmd, g_kd, rtol=0, atol=0)
    # and the test can tell: with MMD the student's gradient differs
    assert any(not torch.equal(a, b) for a, b in zip(grads["kd"], grads["cfl"], strict=True))
