"""Loss functions of amalgamation, as pure functions (float32 inside)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

REFERENCE_SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)


def soft_cross_entropy(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Cross entropy between a target distribution and the student's softmax(./T), times T^2."""
    t = temperature
    logp = F.log_softmax(student_logits.float() / t, dim=1)
    return -(target_probs.float() * logp).sum(1).mean() * t * t


def soft_target_loss(
    student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Cross entropy between softmax(target/T) and the student's softmax(./T), times T^2."""
    target = F.softmax(target_logits.float() / temperature, dim=1)
    return soft_cross_entropy(student_logits, target, temperature)


# exp's argument is clamped here: below it the kernel value (< 1.8e-35) and its gradient are far
# under float32's resolution of the kernel sum (the bandwidths 1 and 2 alone give >= exp(-2) on
# L2-normalised rows), while float32 exp on the CPU runs 10-20x slower for arguments whose result
# underflows (< -87.3). At sigma = 0.001 most of a batch's pairs are there.
EXP_FLOOR = -80.0


def multi_kernel(d2: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Sum over bandwidths of exp(-d2 / (2 sigma^2)), all bandwidths in one fused op."""
    gammas = torch.tensor([1.0 / (2.0 * s * s) for s in sigmas], device=d2.device)
    return torch.exp((-d2.unsqueeze(0) * gammas.view(-1, 1, 1)).clamp_min(EXP_FLOOR)).sum(0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Flattened, L2-normalised rows in float64 (see `mmd` for why float64)."""
    return F.normalize(x.flatten(1).float(), dim=1).double()


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Mean of the multi-bandwidth kernel over all pairs of rows of a and b (float64 rows)."""
    sa = a.square().sum(1)
    sb = sa if b is a else b.square().sum(1)
    d2 = (sa[:, None] + sb[None, :] - 2 * (a @ b.T)).clamp_min(0).float()
    return multi_kernel(d2, sigmas).mean()


def mmd(
    x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float] = REFERENCE_SIGMAS
) -> torch.Tensor:
    """Biased multi-kernel MMD^2 between two batches of maps (rows flattened, L2-normalised).

    Kernel blocks xx, yy and xy (yx is xy transposed: never computed), all bandwidths in one
    fused exp per block. Squared distances come from a float64 Gram matrix: in float32 the Gram
    trick's rounding (~1e-7) times 1 / (2 sigma^2) = 5e5 at sigma = 0.001 would dominate the
    small-bandwidth kernels; in float64 it is ~1e-16, exact for all purposes and cheaper than
    cdist's difference loop.
    """
    return mmd_to_each(x, [y], sigmas)[0]


def mmd_to_each(
    x: torch.Tensor, ys: Sequence[torch.Tensor], sigmas: Sequence[float] = REFERENCE_SIGMAS
) -> list[torch.Tensor]:
    """[MMD^2(x, y) for y in ys], the x-x kernel block computed once for all of them.

    CFL pulls the student's common features towards each teacher's: with T teachers this
    evaluates (1 + 2T) B x B kernel blocks instead of the 4T of T separate `mmd` calls.
    """
    xr = _rows(x)
    kxx = _mean_kernel(xr, xr, sigmas)
    out = []
    for y in ys:
        yr = _rows(y)
        kyy = _mean_kernel(yr, yr, sigmas)
        kxy = _mean_kernel(xr, yr, sigmas)
        out.append((kxx + kyy - 2 * kxy).clamp_min(0))
    return out


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon.float(), target.float())
