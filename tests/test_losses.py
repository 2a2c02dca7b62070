import math

import pytest
import torch
import torch.nn.functional as F

from amalgam.losses import EXP_FLOOR, REFERENCE_SIGMAS, mmd, reconstruction_loss, soft_target_loss


def brute_mmd(x, y, sigmas):
    x = [v / v.norm() for v in x.flatten(1).double()]
    y = [v / v.norm() for v in y.flatten(1).double()]

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return max(kxx + kyy - 2 * kxy, 0.0)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 8), (7, 2, 1, 1)])
def test_mmd_matches_double_loop(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    y = torch.randn(shape[0] + 2, *shape[1:], generator=g) * 0.7 + 0.3
    sigmas = (0.05, 0.1, 0.2, 1.0, 2.0)
    got = float(mmd(x, y, sigmas))
    want = brute_mmd(x, y, sigmas)
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_mmd_reference_bandwidths_match_double_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    assert float(mmd(x, y, REFERENCE_SIGMAS)) == pytest.approx(
        brute_mmd(x, y, REFERENCE_SIGMAS), rel=1e-4, abs=1e-5
    )


def test_mmd_small_bandwidths_exact_on_near_duplicates():
    """sigma = 0.001 resolves distances of ~1e-3: y is x moved by that much per row."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 128, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    y = x + 7e-4 * torch.randn(6, 128, generator=g)
    want = brute_mmd(x, y, REFERENCE_SIGMAS)
    assert want > 0.1  # the small-bandwidth kernels do see the difference
    assert float(mmd(x, y, REFERENCE_SIGMAS)) == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_mmd_exp_floor_changes_neither_value_nor_gradient():
    """The clamp of exp's argument (EXP_FLOOR, for speed) against the unclamped formula in float64,
    on a training-sized batch where most pairs underflow at sigma = 0.001."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 128, 1, 1, generator=g, requires_grad=True)
    y = (torch.randn(128, 128, 1, 1, generator=g) * 0.5 + 0.2).requires_grad_(True)
    got = mmd(x, y, REFERENCE_SIGMAS)
    gx, gy = torch.autograd.grad(got, (x, y))

    def unclamped(a, b):
        a = F.normalize(a.flatten(1).double(), dim=1)
        b = F.normalize(b.flatten(1).double(), dim=1)
        z = torch.cat([a, b])
        d2 = torch.cdist(z, z).square()
        gam = torch.tensor([1 / (2 * s * s) for s in REFERENCE_SIGMAS], dtype=torch.float64)
        assert (d2[None] * gam[:, None, None] > -EXP_FLOOR).float().mean() > 0.5
        k = torch.exp(-d2[None] * gam[:, None, None]).sum(0)
        n = len(a)
        return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()

    want = unclamped(x, y)
    wx, wy = torch.autograd.grad(want, (x, y))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gy, wy, rtol=1e-4, atol=1e-9)


def test_mmd_zero_for_identical_batches_and_positive_otherwise():
    x = torch.randn(8, 16, 2, 2)
    assert float(mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-5)
    # scaling a row does not change it after L2 normalisation
    assert float(mmd(x, 3 * x)) == pytest.approx(0.0, abs=1e-5)
    assert float(mmd(x, torch.randn(8, 16, 2, 2))) > 1e-2


def test_mmd_gradient_reaches_both_sides():
    x = torch.randn(5, 6, requires_grad=True)
    y = torch.randn(5, 6, requires_grad=True)
    mmd(x, y, (0.5, 1.0)).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_soft_target_loss_equals_kl_plus_entropy():
    s, t = torch.randn(9, 7), torch.randn(9, 7)
    for temp in (1.0, 4.0):
        p = F.softmax(t / temp, 1)
        kl = F.kl_div(F.log_softmax(s / temp, 1), p, reduction="batchmean")
        ent = -(p * p.log()).sum(1).mean()
        assert float(soft_target_loss(s, t, temp)) == pytest.approx(
            float((kl + ent) * temp * temp), rel=1e-5
        )


def test_soft_target_loss_minimised_by_teacher_logits():
    t = torch.randn(4, 5)
    best = soft_target_loss(t, t)
    assert float(soft_target_loss(t + torch.randn(4, 5), t)) > float(best)
    assert float(soft_target_loss(t + 3.0, t)) == pytest.approx(float(best), rel=1e-6)


def test_soft_target_loss_float32_under_bf16_inputs():
    s, t = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    assert soft_target_loss(s, t).dtype == torch.float32


def test_reconstruction_is_mse():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert float(reconstruction_loss(a, b)) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)


def test_losses_are_float32_exact_inside_a_bf16_autocast_region():
    # Lightning's bf16-mixed (the CPU preset) runs the method's losses inside autocast: the MMD's
    # float64 Gram matrix and the float32 kernel sum must not drop to bfloat16 there
    torch.manual_seed(0)
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    logits, target = torch.randn(32, 10), torch.randn(32, 10)
    plain = (mmd(x, y), soft_target_loss(logits, target, 4.0), reconstruction_loss(x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (mmd(x, y), soft_target_loss(logits, target, 4.0), reconstruction_loss(x, y))
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        assert torch.equal(a, b)


def test_mmd_to_each_equals_separate_pairs_in_value_and_gradient():
    from amalgam.losses import mmd_to_each

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, 1, 1, generator=g, requires_grad=True)
    ys = [torch.randn(16, 8, 1, 1, generator=g, requires_grad=True) for _ in range(3)]
    fused = mmd_to_each(x, ys, REFERENCE_SIGMAS)
    assert len(fused) == 3
    for y, d in zip(ys, fused, strict=True):
        assert float(d) == pytest.approx(
            brute_mmd(x.detach(), y.detach(), REFERENCE_SIGMAS), rel=1e-4, abs=1e-6
        )
    gf = torch.autograd.grad(sum(w * d for w, d in zip((1.0, 2.0, 0.5), fused)), [x, *ys])
    # the same weighted sum from three separate pairs
    gs = torch.autograd.grad(
        sum(w * mmd(x, y, REFERENCE_SIGMAS) for w, y in zip((1.0, 2.0, 0.5), ys)), [x, *ys]
    )
    for a, b in zip(gf, gs, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
