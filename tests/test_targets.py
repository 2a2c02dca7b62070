"""Target rules (the reference concatenation, shared classes, priors, the fitted rules)
against hand computations; the task confusion of evaluate."""

import math
from pathlib import Path

import hydra
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from amalgam.backbone import ModelOutput
from amalgam.build import build_amalgamation
from amalgam.errors import ConfigError
from amalgam.evaluation import evaluate, task_confusion, task_owner
from amalgam.report.run import markdown
from amalgam.targets import (
    Calibrated,
    Concat,
    DensityRatio,
    OODGate,
    TargetRule,
    fit_domain_classifier,
    fit_log_temperature,
    gaussian_fit,
    union_log_targets,
)
from amalgam.tasks import LabelSpace
from amalgam.utils import CONF_DIR, to_dict
from amalgam.validate import check_targets
from conftest import make_cfg


def test_concat_rule_is_softmax_of_concatenated_logits_for_disjoint_tasks():
    space = LabelSpace.from_mapping({"a": ["x", "y", "z"], "b": ["u", "v"]})
    rule = Concat(space)
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(6, 3, generator=g) * 3, torch.randn(6, 2, generator=g) * 3 + 1
    for t in (0.5, 1.0, 4.0):
        want = torch.softmax(torch.cat([za, zb], 1) / t, dim=1)
        torch.testing.assert_close(rule([za, zb], t), want)


def test_shared_class_gets_the_gated_sum_of_the_teachers_probabilities():
    """Teachers a: [x, y], b: [y, z] share y; the union is [x, y, z], each class once."""
    space = LabelSpace.from_mapping({"a": ["x", "y"], "b": ["y", "z"]})
    assert space.classes == ("x", "y", "z") and not space.disjoint
    za, zb = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    q = Concat(space)([za, zb])[0]
    e = math.exp
    s = e(1) + e(2) + e(0.5) + e(3)
    want = [e(1) / s, (e(2) + e(0.5)) / s, e(3) / s]
    assert q.tolist() == pytest.approx(want, rel=1e-6)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    # at T = 2: the same rule on z / 2
    q2 = Concat(space)([za, zb], 2.0)[0]
    s2 = e(0.5) + e(1) + e(0.25) + e(1.5)
    assert q2.tolist() == pytest.approx([e(0.5) / s2, (e(1) + e(0.25)) / s2, e(1.5) / s2])
    # the teachers' joint prediction is the argmax of q: z (e^3) beats y (e^2 + e^0.5) ...
    assert union_log_targets([za, zb], space).argmax(1).item() == 2
    # ... but y wins once its two teachers' mass together exceeds z's, alone neither would
    za, zb = torch.tensor([[0.0, 2.6]]), torch.tensor([[2.6, 3.0]])
    assert union_log_targets([za, zb], space).argmax(1).item() == 1


def test_prior_scales_a_teachers_gate_and_bad_priors_are_refused():
    space = LabelSpace.from_mapping({"a": ["x"], "b": ["y"]})
    za, zb = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    assert Concat(space)([za, zb])[0].tolist() == pytest.approx([0.5, 0.5])
    assert Concat(space, prior={"a": 3.0})([za, zb])[0].tolist() == pytest.approx([0.75, 0.25])
    with pytest.raises(ConfigError, match="unknown teachers"):
        Concat(space, prior={"c": 1.0})
    for bad in ({"a": -1.0}, {"a": float("nan")}, {"a": 0.0, "b": 0.0}):
        with pytest.raises(ConfigError, match=r"targets\.prior"):
            Concat(space, prior=bad)


def test_rows_sum_to_one_with_many_overlapping_teachers():
    space = LabelSpace.from_mapping(
        {"a": ["p", "q", "r"], "b": ["q", "r", "s"], "c": ["r", "t"], "d": ["u"]}
    )
    logits = [torch.randn(16, len(t.classes)) * 4 for t in space.tasks]
    q = Concat(space)(logits)
    assert q.shape == (16, 6) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16))


# ------------------------------------------------------------------ rules with statistics

AB = {"a": ["x", "y"], "b": ["u", "v", "w"]}


def softmax_list(v):
    m = max(v)
    e = [math.exp(t - m) for t in v]
    return [t / sum(e) for t in e]


def test_calibrated_rule_is_concat_over_temperature_scaled_logits():
    rule = Calibrated(LabelSpace.from_mapping(AB))
    rule.log_temperature.copy_(torch.tensor([2.0, 0.5]).log())
    rule.is_fit = True
    za, zb = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    # T = 1: softmax over [1/2, 3/2, 0/0.5, 1/0.5, 2/0.5]
    assert rule([za, zb])[0].tolist() == pytest.approx(softmax_list([0.5, 1.5, 0, 2, 4]))
    # T = 2: every teacher temperature multiplies T
    assert rule([za, zb], 2.0)[0].tolist() == pytest.approx(
        softmax_list([0.25, 0.75, 0, 1, 2]), rel=1e-6
    )


def test_temperature_scaling_recovers_the_temperature_of_the_labels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / 2.0, 1), 1, generator=g)[:, 0]
    assert math.exp(fit_log_temperature(z, y)) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("score", ["msp", "energy"])
def test_ood_gate_standardises_each_teachers_score_by_hand(score):
    rule = OODGate(LabelSpace.from_mapping(AB), score=score, beta=2.0, prior={"b": 0.5})
    rule.loc.copy_(torch.tensor([-0.9, -0.5]))
    rule.scale.copy_(torch.tensor([0.1, 0.2]))
    rule.is_fit = True
    za, zb = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    e = math.exp
    msp, energy = [-e(2) / (e(2) + 1), -1 / 3], [-math.log(e(2) + 1), -math.log(3)]
    s = msp if score == "msp" else energy
    g = [-2.0 * (s[0] + 0.9) / 0.1, -2.0 * (s[1] + 0.5) / 0.2 + math.log(0.5)]
    pi = softmax_list(g)
    assert rule.gates([za, zb])[0].tolist() == pytest.approx(pi, rel=1e-5)
    pa, pb = softmax_list([2.0, 0.0]), [1 / 3] * 3
    want = [pi[0] * p for p in pa] + [pi[1] * p for p in pb]
    assert rule([za, zb])[0].tolist() == pytest.approx(want, rel=1e-5)


def test_mahalanobis_distance_with_a_shared_covariance_by_hand():
    """Class 0 around (1, 1), class 1 around (11, 11), residuals +-1: S = diag(8, 8) / (8 - 2)."""
    f = torch.tensor(
        [[0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12], [12, 12]],
        dtype=torch.float,
    )
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for shrink in (0.0, 0.5):  # S is isotropic: shrinking it to (tr S / D) I changes nothing
        w, c = gaussian_fit(f, y, shrink)
        d = torch.cdist(torch.tensor([[1.0, 3.0], [12.0, 11.0]]) @ w, c).square()
        # (1, 3): (0, 2) from mu_0 -> 4 / (4/3) = 3; (12, 11): (1, 0) from mu_1 -> 3/4
        assert d.min(1).values.tolist() == pytest.approx([3.0, 0.75], rel=1e-5)
    # the gate: s = log min distance, standardised
    rule = OODGate(LabelSpace.from_mapping({"a": ["x", "y"], "b": ["u"]}), beta=1.0)
    assert rule.needs_features
    w, c = gaussian_fit(f, y, 0.0)
    for i in (0, 1):
        rule._stat(f"whiten_{i}", w)
        rule._stat(f"centers_{i}", c)
    rule.loc.copy_(torch.tensor([0.0, 1.0]))
    rule.scale.copy_(torch.tensor([1.0, 2.0]))
    rule.is_fit = True
    feats = [torch.tensor([[1.0, 3.0]]), torch.tensor([[12.0, 11.0]])]
    logits = [torch.zeros(1, 2), torch.zeros(1, 1)]
    g = [-(math.log(3.0) - 0.0) / 1.0, -(math.log(0.75) - 1.0) / 2.0]
    assert rule.gates(logits, 1.0, feats)[0].tolist() == pytest.approx(softmax_list(g), rel=1e-5)
    with pytest.raises(ValueError, match="features"):
        rule.gates(logits)


def test_density_ratio_gate_by_hand():
    rule = DensityRatio(LabelSpace.from_mapping(AB), beta=0.5, prior={"a": 3.0})
    rule._stat("center_0", torch.tensor([0.0, 1.0]))
    rule._stat("weight_0", torch.tensor([0.5, -1.0]))
    rule._stat("center_1", torch.tensor([1.0]))
    rule._stat("weight_1", torch.tensor([2.0]))
    rule._stat("bias", torch.tensor([0.2, -1.0]))
    rule.is_fit = True
    feats = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])]
    za, zb = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    # h_a = 0.5 * 1 - 1 * 1 + 0.2 = -0.3, h_b = 2 * 2 - 1 = 3; pi ∝ prior * exp(0.5 h)
    pa, pb = 3.0 * math.exp(-0.15), math.exp(1.5)
    pi = [pa / (pa + pb), pb / (pa + pb)]
    q = rule([za, zb], 1.0, feats)[0].tolist()
    want = [pi[0] * p for p in softmax_list([0.0, 1.0])]
    want += [pi[1] * p for p in softmax_list([1.0, 0.0, 0.0])]
    assert q == pytest.approx(want, rel=1e-5)
    # T changes p_i, never the gate
    assert rule.gates([za, zb], 4.0, feats)[0].tolist() == pytest.approx(pi, rel=1e-5)


def test_domain_classifier_estimates_the_log_density_ratio():
    """pos ~ N(1, 1), unl ~ N(-1, 1): log p_pos / p_unl = 2x, whatever the two sample sizes."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(5000, 1, generator=g) + 1
    unl = torch.randn(20000, 1, generator=g) - 1
    center, weight, bias = fit_domain_classifier(pos, unl, l2=0.0)
    h = (torch.tensor([[0.0], [1.0], [-2.0]]) - center) @ weight + bias
    assert h.tolist() == pytest.approx([0.0, 2.0, -4.0], abs=0.12)


# --- fit(bank, dm) on a fake bank and data module: what it reads, buffers, checkpoints


class FakeTeacher(nn.Module):
    """Logits = x[:, cols] @ M, features = x[:, cols] as a 1x1 map."""

    def __init__(self, cols, n_classes, seed):
        super().__init__()
        self.cols = cols
        g = torch.Generator().manual_seed(seed)
        self.m = nn.Parameter(torch.randn(len(cols), n_classes, generator=g), requires_grad=False)

    def forward(self, x, features=True):
        f = x[:, self.cols]
        return ModelOutput(f @ self.m, [f[:, :, None, None]] if features else [])


class FakeBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.teachers = nn.ModuleDict({"a": FakeTeacher([0, 1], 2, 0), "b": FakeTeacher([2], 3, 1)})

    @property
    def names(self):
        return list(self.teachers)


class Pool(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "index": i}


class FakeDM:
    """Own-task labeled loaders per teacher and an unlabeled pool; union labels are refused."""

    seed = 0

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = {n: torch.randn(300, 3, generator=g) + (2.0 if n == "a" else -2.0) for n in "ab"}
        self.calls = []

    def task_dataloader(self, task, split="train"):
        self.calls.append((task, split))
        y = torch.arange(300) % (2 if task == "a" else 3)
        return DataLoader(TensorDataset(self.x[task], y), batch_size=64)

    def pool_dataloader(self):
        self.calls.append(("pool", None))
        return DataLoader(Pool(torch.cat([self.x["a"], self.x["b"]])), batch_size=64)

    def test_dataloader(self):
        raise AssertionError("a rule's fit must not read labeled amalgamation data")

    labeled_train_dataloader = val_dataloader = test_dataloader


@pytest.mark.parametrize(
    "make",
    [
        lambda s: Calibrated(s),
        lambda s: OODGate(s, score="msp"),
        lambda s: OODGate(s, score="mahalanobis"),
        lambda s: DensityRatio(s, pool_limit=200),
        lambda s: DensityRatio(s, representation="logits"),
    ],
    ids=["calibrated", "msp", "mahalanobis", "density_ratio", "density_ratio_logits"],
)
def test_fit_reads_own_images_and_the_pool_and_round_trips_through_a_state_dict(make):
    space = LabelSpace.from_mapping(AB)
    bank, dm = FakeBank(), FakeDM()
    rule = make(space)
    assert rule.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        rule([torch.zeros(1, 2), torch.zeros(1, 3)], 1.0, [torch.zeros(1, 2), torch.zeros(1, 1)])
    rule.fit(bank, dm)
    assert {c[0] for c in dm.calls} <= {"a", "b", "pool"}  # own tasks and the unlabeled pool
    assert all(s in ("train", "val", None) for _, s in dm.calls)
    x = torch.randn(7, 3)
    out = [bank.teachers[n](x) for n in bank.names]
    logits, feats = [o.logits for o in out], [o.features for o in out]
    q = rule(logits, 1.0, feats)
    torch.testing.assert_close(q.sum(1), torch.ones(7))
    # a fresh, unfit rule takes the statistics (and their shapes) from a state dict
    sd = rule.state_dict()
    assert bool(sd["fitted"]) and all(k in sd for k in ("fitted",))
    fresh = make(space)
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh(logits, 1.0, feats), q)


def test_density_ratio_routes_each_teachers_own_images_to_it():
    """Teacher a's features sit around +2, b's around -2: the gate sends each to its owner."""
    space = LabelSpace.from_mapping(AB)
    bank, dm = FakeBank(), FakeDM()
    rule = DensityRatio(space)
    rule.fit(bank, dm)
    for n, want in (("a", 0), ("b", 1)):
        x = dm.x[n][:50]
        out = [bank.teachers[t](x) for t in bank.names]
        pi = rule.gates([o.logits for o in out], 1.0, [o.features for o in out])
        assert (pi.argmax(1) == want).float().mean() > 0.95


# --- the config group


RULES = sorted(p.stem for p in (Path(CONF_DIR) / "targets").glob("*.yaml"))


@pytest.mark.parametrize("name", RULES)
def test_every_targets_config_instantiates_and_validates(name, tmp_path):
    cfg = make_cfg("amalgamate", [f"targets={name}"], tmp_path)
    space = LabelSpace.from_mapping(AB)
    targets = to_dict(cfg.targets)
    check_targets(targets, space)
    rule = hydra.utils.instantiate(targets)(space=space)
    assert isinstance(rule, TargetRule) and rule.needs_fit == (name != "concat")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"score": "entropy"}, "targets.score"),
        ({"beta": -1.0}, "targets.beta"),
        ({"shrinkage": 2.0}, "targets.shrinkage"),
        ({"fit_limit": 0}, "targets.fit_limit"),
        ({"representation": "pixels"}, "targets.representation"),
        ({"l2": float("nan")}, "targets.l2"),
    ],
)
def test_bad_rule_settings_are_config_errors_naming_the_key(override, key):
    space = LabelSpace.from_mapping(AB)
    cls = DensityRatio if key.split(".")[1] in ("representation", "l2") else OODGate
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls(space, **override)


def test_held_out_images_are_required():
    class NoVal(FakeDM):
        def task_dataloader(self, task, split="train"):
            loader = super().task_dataloader(task, split)
            return (
                DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=4)
                if split == "val"
                else loader
            )

    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        DensityRatio(LabelSpace.from_mapping(AB)).fit(FakeBank(), NoVal())


# --- task confusion


class LogitsAsImages(nn.Module):
    """A 'student' whose logits are its input times `sign` (the loader yields logits)."""

    def __init__(self, sign):
        super().__init__()
        self.sign = sign

    def forward(self, x, features=False):
        return ModelOutput(self.sign * x, [])


class SliceBank(nn.Module):
    """Teachers whose logits are column slices of the input."""

    def __init__(self, space):
        super().__init__()
        self.cols = [space.indices(t.name) for t in space.tasks]

    def forward(self, x, features=True):
        z = [x[:, c] for c in self.cols]
        return type("Out", (), {"logits": z, "features": [[t[:, :, None, None]] for t in z]})


def test_task_confusion_rows_sum_to_task_counts_and_diagonal_matches():
    space = LabelSpace.from_mapping(AB)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = torch.randint(0, 5, (200,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    res = evaluate(LogitsAsImages(-1.0), SliceBank(space), loader, space)
    c = res["task_confusion"]
    assert c["tasks"] == ["a", "b"]
    task = (y >= 2).long()  # union order x y | u v w
    for who, pred in (("student", (-x).argmax(1)), ("teachers", x.argmax(1))):
        m = torch.tensor(c[who])
        assert m.sum(1).tolist() == [res["tasks"]["a"]["n_test"], res["tasks"]["b"]["n_test"]]
        assert m.sum(1).tolist() == [int((task == 0).sum()), int((task == 1).sum())]
        ptask = (pred >= 2).long()
        diag = [int(((task == k) & (ptask == k)).sum()) for k in (0, 1)]
        assert torch.diagonal(m).tolist() == diag
        assert int(m[0, 1]) == int(((task == 0) & (ptask == 1)).sum())
    assert res["joint"]["target_rule"] == "Concat"
    md = markdown({"method": "kd", "seed": 0, **res})
    row = " | ".join(str(v) for v in c["teachers"][0])
    assert f"| a | {row} |" in md and "teacher ensemble (Concat)" in md


def test_task_confusion_counts_a_shared_class_for_its_first_task():
    space = LabelSpace.from_mapping({"a": ["x", "y"], "b": ["y", "z"]})  # union x y z
    owner = task_owner(space)
    assert owner.tolist() == [0, 0, 1]
    y = torch.tensor([0, 1, 1, 2, 2])
    pred = torch.tensor([1, 2, 1, 1, 2])
    # true tasks a a a b b, predicted a b a a b
    assert task_confusion(pred, y, owner, 2).tolist() == [[2, 1], [1, 1]]


def test_evaluate_passes_features_to_a_feature_rule():
    space = LabelSpace.from_mapping(AB)
    rule = DensityRatio(space, beta=1.0)
    rule._stat("center_0", torch.zeros(2))
    rule._stat("weight_0", torch.zeros(2))
    rule._stat("center_1", torch.zeros(3))
    rule._stat("weight_1", torch.tensor([0.0, 0.0, 50.0]))  # teacher b wins when x_w > 0
    rule._stat("bias", torch.zeros(2))
    rule.is_fit = True
    x = torch.tensor([[5.0, 0.0, 0.0, 0.0, 1.0], [5.0, 0.0, 0.0, 0.0, -1.0]])
    loader = DataLoader(TensorDataset(x, torch.tensor([4, 0])), batch_size=2)
    res = evaluate(LogitsAsImages(1.0), SliceBank(space), loader, space, targets=rule)
    assert res["joint"]["teacher_ensemble_acc"] == 1.0  # concat would say x for both
    assert res["task_confusion"]["teachers"] == [[1, 0], [0, 1]]
    assert res["joint"]["target_rule"] == "DensityRatio"


def test_build_fits_the_rule_and_its_statistics_travel_in_the_state_dict(tiny_teachers, tmp_path):
    overrides = ["experiment=tiny", "targets=density_ratio", "targets.pool_limit=200"]
    cfg = make_cfg("amalgamate", overrides, tiny_teachers, tmp_path / "run")
    dm, module = build_amalgamation(cfg)
    rule = module.method.targets
    assert isinstance(rule, DensityRatio) and rule.is_fit
    sd = {k: v for k, v in module.state_dict().items() if k.startswith("method.targets.")}
    assert {"method.targets.fitted", "method.targets.weight_0", "method.targets.bias"} <= set(sd)
    res = evaluate(module.student, module.teachers, dm.test_dataloader(), module.space, "cpu", rule)
    assert res["joint"]["target_rule"] == "DensityRatio"
    n = sum(t["n_test"] for t in res["tasks"].values())
    assert sum(map(sum, res["task_confusion"]["teachers"])) == n == res["joint"]["n_test"]
    # an unfit rule (as rebuilt from a checkpoint) takes the statistics and gives the same q
    fresh = hydra.utils.instantiate(to_dict(cfg.targets))(space=module.space)
    fresh.load_state_dict({k.removeprefix("method.targets."): v for k, v in sd.items()})
    x = next(iter(dm.test_dataloader()))[0]
    out = module.teachers(x)
    torch.testing.assert_close(
        fresh(out.logits, 2.0, out.features), rule(out.logits, 2.0, out.features)
    )


def test_rules_eval_scores_rules_on_the_teacher_ensemble(tiny_teachers, tmp_path):
    from amalgam.rules_eval import main, score_rule

    # by hand: two test images, concat on slices of known logits
    space = LabelSpace.from_mapping(AB)
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0]])
    outs = {"logits": [z[:, :2], z[:, 2:]], "features": [z[:, :2], z[:, 2:]]}
    outs["labels"] = torch.tensor([0, 2])  # x (task a), u (task b): predicted x and v
    r = score_rule(Concat(space), outs, space)
    assert r["joint"] == 0.5 and r["task_aware"] == {"a": 1.0, "b": 0.0}
    assert r["task_confusion"] == [[1, 0], [0, 1]]
    e = math.exp
    gate_a = (e(3) + 1) / (e(3) + 1 + 3)  # image 1: partition functions e^3 + 1 and 3
    gate_b = (2 + e(2)) / (2 + 2 + e(2))
    assert r["gate_on_true_task"] == pytest.approx((gate_a + gate_b) / 2, rel=1e-5)
    # the CLI on the tiny teachers: every rule named, the oracle bound, a JSON file
    out = tmp_path / "rules.json"
    res = main(
        [
            f"paths.root_dir={tiny_teachers}",
            "experiment=tiny",
            "targets=concat,ood_msp",
            "--out",
            str(out),
        ]
    )
    assert {"concat", "ood_msp", "oracle_gate"} <= set(res) and out.is_file()
    assert res["oracle_gate"]["joint"] >= res["concat"]["joint"] - 1e-9
    n = res["_info"]["n_test"]
    assert sum(map(sum, res["ood_msp"]["task_confusion"])) == n


@pytest.mark.slow
def test_a_resume_takes_the_rules_statistics_from_the_checkpoint_without_refitting(
    tiny_teachers, tmp_path, monkeypatch
):
    from amalgam.api import Amalgamation
    from amalgam.launch import rule_fitted_in

    run = tmp_path / "run"
    overrides = [
        "experiment=tiny",
        "debug=quick",
        "targets=density_ratio",
        "targets.pool_limit=200",
    ]
    first = Amalgamation.from_config(make_cfg("amalgamate", overrides, tiny_teachers, run))
    res = first.fit()
    ckpt = run / "checkpoints" / "final.ckpt"
    assert rule_fitted_in(ckpt) and not rule_fitted_in(
        _concat_checkpoint(tiny_teachers, tmp_path / "concat")
    )
    fitted = {k: v for k, v in first.module.state_dict().items() if ".targets." in k}

    def refit(*args, **kwargs):
        raise AssertionError("the resumed run refit its target rule")

    monkeypatch.setattr(DensityRatio, "_fit", refit)
    cfg = make_cfg("amalgamate", [*overrides, f"ckpt_path={ckpt}"], tiny_teachers, run)
    again = Amalgamation.from_config(cfg)
    # not refit (_fit raises): the resume check already loaded the checkpoint's statistics
    assert again.module.method.targets.is_fit
    res2 = again.fit()  # and Lightning restores them again before any step
    assert again.module.method.targets.is_fit
    for k, v in fitted.items():
        torch.testing.assert_close(again.module.state_dict()[k], v)
    assert res2["joint"]["teacher_ensemble_acc"] == res["joint"]["teacher_ensemble_acc"]


def _concat_checkpoint(root: Path, out: Path) -> Path:
    cfg = make_cfg("amalgamate", ["experiment=tiny"], root, out)
    _, module = build_amalgamation(cfg)
    path = out / "m.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(ckpt)  # the amalgam record, as Lightning's save writes it
    torch.save(ckpt, path)
    return path
