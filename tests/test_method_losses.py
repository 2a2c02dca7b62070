"""The loss of each feature/label-space method against a brute-force computation written here
(explicit loops and einsums, none of the methods' helpers), and the stage matching and config
composition that decide which maps the methods read."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from amalgam.backbone import Backbone, ModelOutput, match_stages
from amalgam.errors import ConfigError
from amalgam.methods import CFL, LKA, UHC, Hint
from amalgam.tasks import LabelSpace
from amalgam.teachers.bank import Teacher, TeacherOutputs, align_stages, load_teacher_bank

# ------------------------------------------------------------------------------ brute force


def bf_softmax(v):
    """Softmax of a 1-D tensor, written out."""
    e = torch.exp(v - v.max())
    return e / e.sum()


def bf_kd_concat(s, teacher_logits, t):
    """T^2 * mean_x CE(softmax(cat(z)/T), softmax(s/T)), sample by sample (disjoint tasks)."""
    z = torch.cat([zi.double() for zi in teacher_logits], 1)
    s = s.double()
    total = 0.0
    for b in range(s.shape[0]):
        q = bf_softmax(z[b] / t)
        p = bf_softmax(s[b] / t)
        total = total - (q * torch.log(p)).sum()
    return total / s.shape[0] * t * t


def bf_block_mean(x, size):
    """Adaptive average pooling to `size` when it divides the map: means of equal blocks."""
    b, c, h, w = x.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return x.double()
    assert h % oh == 0 and w % ow == 0, "brute force needs blocks of equal size"
    return x.double().reshape(b, c, oh, h // oh, ow, w // ow).mean(dim=(3, 5))


def bf_conv1x1(conv, x):
    """A 1x1 convolution as an einsum over the channels, plus the bias."""
    w = conv.weight.detach().double()[:, :, 0, 0]
    out = torch.einsum("oc,bchw->bohw", w, x.double())
    return out + conv.bias.detach().double()[None, :, None, None]


def bf_mse(a, b):
    return ((a.double() - b.double()) ** 2).sum() / a.numel()


def close(got, want, **kw):
    kw = {"rtol": 1e-5, "atol": 1e-6, **kw}
    torch.testing.assert_close(got.double(), torch.as_tensor(want).double(), **kw)


# ------------------------------------------------------------------------------------- UHC

OVERLAP = {"a": ["x", "y", "z"], "b": ["z", "w"], "c": ["w", "x"]}


def bf_uhc(s, teacher_logits, tasks, t, union=None):
    """T^2 * sum_i mean_x -sum q_i log p_i, with p_i the union softmax renormalised over C_i
    (union: the order of first appearance of the tasks' classes, unless given)."""
    if union is None:
        union = []
        for cs in tasks.values():
            for c in cs:
                if c not in union:
                    union.append(c)
    s = s.double()
    total = 0.0
    for cs, z in zip(tasks.values(), teacher_logits, strict=True):
        pos = [union.index(c) for c in cs]
        per_teacher = 0.0
        for b in range(s.shape[0]):
            p = bf_softmax(s[b] / t)  # over the whole union
            p_i = p[pos] / p[pos].sum()
            q_i = bf_softmax(z[b].double() / t)
            per_teacher = per_teacher - (q_i * torch.log(p_i)).sum()
        total = total + per_teacher / s.shape[0]
    return total * t * t


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_uhc_matches_brute_force_on_overlapping_classes_with_its_gradient(t):
    space = LabelSpace.from_mapping(OVERLAP)
    assert space.classes == ("x", "y", "z", "w") and not space.disjoint
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(7, 4, generator=g)).requires_grad_()
    zs = [2 * torch.randn(7, len(cs), generator=g) for cs in OVERLAP.values()]
    m = UHC(space, weights={"uhc": 1.0}, temperature=t)
    got = m(ModelOutput(s, []), TeacherOutputs(zs, [[], [], []]))
    assert set(got) == {"uhc"} and got["uhc"].dtype == torch.float32
    s2 = s.detach().clone().requires_grad_()
    want = bf_uhc(s2, zs, OVERLAP, t)
    close(got["uhc"], want)
    # the gradient w.r.t. the student's logits is that of the brute force
    got["uhc"].backward()
    want.backward()
    close(s.grad, s2.grad)
    # the weight scales the term
    m2 = UHC(space, weights={"uhc": 2.5}, temperature=t)
    close(m2(ModelOutput(s, []), TeacherOutputs(zs, [[], [], []]))["uhc"], 2.5 * want)


def test_uhc_is_not_the_concat_target_on_overlapping_classes():
    """The test above can tell UHC from KD on the union target: on shared classes they differ."""
    space = LabelSpace.from_mapping(OVERLAP)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g)
    zs = [torch.randn(5, len(cs), generator=g) for cs in OVERLAP.values()]
    uhc = UHC(space)(ModelOutput(s, []), TeacherOutputs(zs, [[], [], []]))["uhc"]
    q = UHC(space).targets(zs, 1.0)  # the Concat rule's union target (not used by UHC)
    kd = -(q * F.log_softmax(s, 1)).sum(1).mean()
    assert not torch.allclose(uhc, kd)


def test_uhc_shared_class_gets_gradient_from_every_teacher_that_knows_it():
    """A class known by two teachers is pulled by both terms: its gradient is the sum of the
    two teachers' separate gradients (each teacher alone as a one-teacher UHC on the union)."""
    space = LabelSpace.from_mapping({"a": ["x", "z"], "b": ["z", "w"]})
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 3, generator=g, requires_grad=True)
    za, zb = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    UHC(space)(ModelOutput(s, []), TeacherOutputs([za, zb], [[], []]))["uhc"].backward()
    both = s.grad.clone()
    parts = []
    for name, z in (("a", za), ("b", zb)):
        s1 = s.detach().clone().requires_grad_()
        bf_uhc(s1, [z], {name: space.as_dict()[name]}, 1.0, list(space.classes)).backward()
        parts.append(s1.grad)
    close(both, parts[0] + parts[1])
    # a teacher does not pull a class it does not know (float64 rounding of the brute force)
    assert parts[0][:, 2].abs().max() < 1e-12 and parts[1][:, 0].abs().max() < 1e-12
    assert parts[0][:, 1].abs().min() > 0 and parts[1][:, 1].abs().min() > 0  # the shared z


# ------------------------------------------------------------------------------------ Hint

SPACE2 = LabelSpace.from_mapping({"a": ["a0", "a1", "a2"], "b": ["b0", "b1"]})
# three levels: block means of 2x2 and 4x4 (at factor 4 bilinear resizing is not a block mean;
# at factor 2 it is), identical sizes, and the 1x1 fast path of MapConv
S_SHAPES = [(6, 4, 4), (8, 2, 2), (4, 1, 1)]
T_SHAPES = {"a": [(5, 8, 8), (7, 8, 8), (2, 2, 2)], "b": [(3, 4, 4), (9, 2, 2), (5, 1, 1)]}


def random_maps(shapes, batch, g):
    return [torch.randn(batch, *sh, generator=g) for sh in shapes]


def random_outputs(s_shapes, t_shapes, batch=3, seed=0, k=5):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(batch, k, generator=g)
    feats = random_maps(s_shapes, batch, g)
    t_logits = [torch.randn(batch, 3, generator=g), torch.randn(batch, 2, generator=g)]
    t_feats = [random_maps(t_shapes[n], batch, g) for n in t_shapes]
    return s_logits, feats, t_logits, t_feats


def bf_hint(m, feats, t_feats, resize_fn):
    total = 0.0
    for lvl, fs in enumerate(feats):
        size = tuple(fs.shape[-2:])
        for i, ft in enumerate(t_feats):
            r = bf_conv1x1(m.regressors[lvl][i], fs)
            total = total + bf_mse(r, resize_fn(ft[lvl], size))
    return total


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_hint_matches_brute_force(t):
    torch.manual_seed(0)
    w = {"kd": 0.7, "hint": 1.9}
    m = Hint(SPACE2, S_SHAPES, T_SHAPES, weights=w, temperature=t)
    s_logits, feats, t_logits, t_feats = random_outputs(S_SHAPES, T_SHAPES)
    got = m(ModelOutput(s_logits, feats), TeacherOutputs(t_logits, t_feats))
    assert set(got) == {"kd", "hint"}
    close(got["kd"], w["kd"] * bf_kd_concat(s_logits, t_logits, t))
    hint = bf_hint(m, feats, t_feats, bf_block_mean)
    close(got["hint"], w["hint"] * hint)
    # each (level, teacher) pair is in the sum: the last level's alone is not the total
    assert got["hint"] > 0 and hint > bf_mse(
        bf_conv1x1(m.regressors[2][1], feats[2]), t_feats[1][2]
    )
    # the regressors have the teachers' widths, one per teacher and level
    assert [[r.weight.shape[:2] for r in regs] for regs in m.regressors] == [
        [(5, 6), (3, 6)],
        [(7, 8), (9, 8)],
        [(2, 4), (5, 4)],
    ]


def test_hint_interpolate_is_bilinear_not_pooling():
    s_shapes = [(6, 4, 4), (8, 2, 2)]
    # factor 1.5 and 4: bilinear (align_corners=False, no antialias) is not a block mean there
    t_shapes = {"a": [(5, 8, 8), (7, 8, 8)], "b": [(3, 6, 6), (9, 2, 2)]}
    torch.manual_seed(0)
    m = Hint(SPACE2, s_shapes, t_shapes, weights={"kd": 0.0, "hint": 1.0}, resize="interpolate")
    s_logits, feats, t_logits, t_feats = random_outputs(s_shapes, t_shapes, seed=4)
    got = m(ModelOutput(s_logits, feats), TeacherOutputs(t_logits, t_feats))["hint"]

    def bilinear(x, size):
        if tuple(x.shape[-2:]) == size:
            return x.double()
        return F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False)

    def adaptive_pool(x, size):
        return F.adaptive_avg_pool2d(x.double(), size)

    close(got, bf_hint(m, feats, t_feats, bilinear))
    pooled = bf_hint(m, feats, t_feats, adaptive_pool)
    assert not math.isclose(float(got.detach()), float(pooled), rel_tol=1e-3)
    with pytest.raises(ConfigError, match="resize"):
        Hint(SPACE2, s_shapes, t_shapes, resize="nearest")


@pytest.mark.parametrize("cls", [Hint, LKA])
def test_level_count_mismatch_is_refused(cls):
    s_shapes = [(6, 4, 4), (8, 2, 2)]
    with pytest.raises(ConfigError, match="as many feature levels"):
        cls(SPACE2, s_shapes, {"a": [(5, 8, 8), (7, 4, 4)], "b": [(3, 4, 4)]})
    with pytest.raises(ConfigError, match="at least one"):
        cls(SPACE2, [], {"a": [], "b": []})


# ------------------------------------------------------------------------------------- LKA


def bf_lka(m, feats, t_feats):
    amal, rec = 0.0, 0.0
    for lvl, fs in enumerate(feats):
        size = tuple(fs.shape[-2:])
        fts = [bf_block_mean(ft[lvl], size) for ft in t_feats]
        stacked = torch.cat(fts, 1)
        blk = m.blocks[lvl]
        a = bf_conv1x1(blk.encoder, stacked)
        amal = amal + bf_mse(fs, a)
        for dec, ft in zip(blk.decoders, fts, strict=True):
            rec = rec + bf_mse(bf_conv1x1(dec, a), ft)
    return amal, rec


def test_lka_matches_brute_force():
    torch.manual_seed(0)
    w = {"kd": 0.5, "amal": 2.0, "rec": 3.0}
    m = LKA(SPACE2, S_SHAPES, T_SHAPES, weights=w, temperature=2.0)
    # encoder: all teachers' channels -> the student's; one decoder per teacher back
    assert [b.encoder.weight.shape[:2] for b in m.blocks] == [(6, 8), (8, 16), (4, 7)]
    assert [[d.weight.shape[:2] for d in b.decoders] for b in m.blocks] == [
        [(5, 6), (3, 6)],
        [(7, 8), (9, 8)],
        [(2, 4), (5, 4)],
    ]
    s_logits, feats, t_logits, t_feats = random_outputs(S_SHAPES, T_SHAPES, seed=1)
    got = m(ModelOutput(s_logits, feats), TeacherOutputs(t_logits, t_feats))
    assert set(got) == {"kd", "amal", "rec"}
    amal, rec = bf_lka(m, feats, t_feats)
    close(got["kd"], w["kd"] * bf_kd_concat(s_logits, t_logits, 2.0))
    close(got["amal"], w["amal"] * amal)
    close(got["rec"], w["rec"] * rec)


def test_lka_student_term_does_not_train_the_encoder():
    torch.manual_seed(0)
    m = LKA(SPACE2, S_SHAPES, T_SHAPES)
    s_logits, feats, t_logits, t_feats = random_outputs(S_SHAPES, T_SHAPES, seed=2)
    feats = [f.requires_grad_() for f in feats]
    terms = m(ModelOutput(s_logits, feats), TeacherOutputs(t_logits, t_feats))
    terms["amal"].backward(retain_graph=True)
    for b in m.blocks:  # stop-gradient: nothing of the block is reached
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in b.parameters())
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    for f in feats:
        f.grad = None
    terms["rec"].backward()
    for b in m.blocks:
        assert b.encoder.weight.grad is not None and b.encoder.weight.grad.abs().sum() > 0
        assert all(d.weight.grad.abs().sum() > 0 for d in b.decoders)
    assert all(f.grad is None for f in feats)  # reconstruction does not reach the student


# ------------------------------------------------------------------------------------- CFL


def test_multi_level_cfl_is_the_sum_of_single_level_cfls():
    s_shapes = [(6, 4, 4), (8, 2, 2)]
    t_shapes = {"a": [(5, 8, 8), (7, 4, 4)], "b": [(3, 4, 4), (9, 1, 1)]}
    kw = {"hidden": 4, "weights": {"kd": 1.0, "mmd": 2.0, "rec": 3.0}, "temperature": 2.0}
    torch.manual_seed(0)
    multi = CFL(SPACE2, s_shapes, t_shapes, teacher_weights={"b": 0.5}, **kw)
    assert [b.size for b in multi.blocks] == [(4, 4), (1, 1)]  # one common size per stage
    s_logits, feats, t_logits, t_feats = random_outputs(s_shapes, t_shapes, batch=6, seed=3)
    got = multi(ModelOutput(s_logits, feats), TeacherOutputs(t_logits, t_feats))
    singles = []
    for lvl in range(2):
        torch.manual_seed(100 + lvl)  # a different draw: the weights come from the state dict
        one = CFL(
            SPACE2,
            [s_shapes[lvl]],
            {n: [sh[lvl]] for n, sh in t_shapes.items()},
            teacher_weights={"b": 0.5},
            **kw,
        )
        one.blocks[0].load_state_dict(multi.blocks[lvl].state_dict())
        out = one(
            ModelOutput(s_logits, [feats[lvl]]),
            TeacherOutputs(t_logits, [[f[lvl]] for f in t_feats]),
        )
        singles.append(out)
    assert set(got) == {"kd", "mmd", "rec"}
    close(got["kd"], singles[0]["kd"])
    close(got["kd"], bf_kd_concat(s_logits, t_logits, 2.0))
    for term in ("mmd", "rec"):
        close(got[term], singles[0][term] + singles[1][term])
        assert singles[0][term] > 0 and singles[1][term] > 0  # both stages count


# -------------------------------------------------------------------------- stage matching


def test_match_stages_by_stride():
    student, teacher = [2, 4, 8, 16, 32], [4, 8, 16, 32]
    assert match_stages(student, [2], teacher, "teacher 't'") == [-3]
    assert match_stages(student, [-1], teacher, "teacher 't'") == [-1]
    assert match_stages(student, [-3, -2, -1], teacher, "teacher 't'") == [-3, -2, -1]
    assert match_stages(student, [1, 4], teacher, "teacher 't'") == [-4, -1]
    # several maps at one stride: the deepest (the stage's output)
    assert match_stages([8, 16], [0], [4, 8, 8, 16], "teacher 't'") == [-2]
    # the last map always meets the last map: a ViT (stride 16 throughout) for a stride-32 CNN
    assert match_stages(student, [-1], [16] * 12, "teacher 't'") == [-1]
    with pytest.raises(ConfigError, match="the student has 5 feature maps"):
        match_stages(student, [-6], teacher, "teacher 't'")
    with pytest.raises(ConfigError) as e:
        match_stages(student, [0], teacher, "teacher 't'")
    msg = str(e.value)
    assert "teacher 't'" in msg and "stride 2" in msg and "[4, 8, 16, 32]" in msg


def tiny(arch, k):
    return timm.create_model(arch, num_classes=k)


def test_align_stages_on_tiny_timm_backbones():
    torch.manual_seed(0)
    res = Backbone(tiny("test_resnet", 3))
    conv = Backbone(tiny("test_convnext", 3))
    assert res.stage_strides(32, 3) == [2, 4, 8, 16, 32]
    assert conv.stage_strides(32, 3) == [4, 8, 16, 32]
    bank = load_teacher_bank(
        {
            "r": Teacher(tiny("test_resnet", 2), ["p", "q"]),
            "c": Teacher(tiny("test_convnext", 2), ["u", "v"]),
            "fixed": Teacher(tiny("test_convnext", 2), ["s", "t"], feature_indices=[0]),
        }
    )
    student = Backbone(tiny("test_resnet", 6), feature_indices=[2])  # stride 8, a positive index
    align_stages(bank.teachers, student, 32, 3)
    got = {n: t.feature_indices for n, t in bank.teachers.items()}
    assert got == {"r": [-3], "c": [-3], "fixed": [0]}
    # the map picked is the stride-8 one: 4x4 at 32 px, like the student's
    assert student.feature_shapes(32, 3)[0][1:] == (4, 4)
    assert [s[1:] for s in bank.teachers["c"].feature_shapes(32, 3)] == [(4, 4)]
    align_stages(bank.teachers, student, 32, 3, keep_last=True)
    assert bank.teachers["c"].feature_indices == [-3, -1]
    assert bank.teachers["r"].feature_indices == [-3, -1]
    assert bank.teachers["fixed"].feature_indices == [0]
    student.feature_indices = [-1]
    align_stages(bank.teachers, student, 32, 3, keep_last=True)  # no second -1
    assert {n: t.feature_indices for n, t in bank.teachers.items()} == {
        "r": [-1],
        "c": [-1],
        "fixed": [0],
    }
    student.feature_indices = [0]  # stride 2: the ConvNeXt has no such map
    with pytest.raises(ConfigError, match=r"teacher 'c' has no feature map at stride 2"):
        align_stages(bank.teachers, student, 32, 3)


# ----------------------------------------------------------------------- config composition


def composed_indices(tmp_path, *overrides):
    from conftest import make_cfg

    cfg = make_cfg("amalgamate", ["experiment=tiny", *overrides], tmp_path)
    return OmegaConf.to_container(cfg.student, resolve=True)["feature_indices"]


def test_student_stages_follow_the_method(tmp_path):
    assert composed_indices(tmp_path, "method=cfl_spatial") == [-3]
    assert composed_indices(tmp_path, "method=hint") == [-3, -2, -1]
    assert composed_indices(tmp_path, "method=lka") == [-3, -2, -1]
    assert composed_indices(tmp_path, "method=kd") == [-1]
    assert composed_indices(tmp_path, "method=hint", "student.feature_indices=[-2]") == [-2]


def test_check_method_refuses_bad_feature_indices():
    from amalgam.utils import CONF_DIR
    from amalgam.validate import check_method

    base = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/method/cfl_spatial.yaml"))
    assert check_method(dict(base)) is CFL  # the file itself passes
    for bad in ("x", [], [True], [1.5], 3):
        with pytest.raises(ConfigError, match=r"method\.feature_indices="):
            check_method({**base, "feature_indices": bad})
