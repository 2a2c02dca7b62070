"""Target rules: the reference concatenation, shared classes, priors (against hand computations)."""

import math

import pytest
import torch

from amalgam.targets import Concat, union_log_targets
from amalgam.tasks import ConfigError, LabelSpace


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
