"""Target rules: how the teachers' logits become ONE soft-target distribution over the union.

Every rule here is a gated mixture of the teachers' own distributions. Teacher i knows the
classes C_i and gives logits z_i; at temperature T its distribution is p_i = softmax(z_i / T)
over C_i. A rule picks gates pi_i(x) >= 0 with sum_i pi_i(x) = 1 (how much teacher i is trusted
on image x) and the target over the union is

    q(c | x) = sum over the teachers i that know c of  pi_i(x) * p_i(c | x).

q sums to 1 by construction. A class shared by several teachers (matched by name) gets the
gate-weighted sum of their probabilities: an averaged-probability rule over the teachers that
know it. The student's head has each union class once.

`concat` (the reference rule) gates by each teacher's partition function,
pi_i = exp(lse_i) / sum_j exp(lse_j) with lse_i = logsumexp(z_i / T). For disjoint class sets
q is then exactly softmax(concat(z_1, ..., z_N) / T), the reference code's target; with shared
classes, q(c) = sum_{i knows c} exp(z_ic / T) / sum_j sum_{c' in C_j} exp(z_jc' / T).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amalgam.tasks import ConfigError, LabelSpace


class TargetRule(nn.Module):
    """Base: subclasses give the gate logits log pi_i(x) (up to a per-image constant)."""

    def __init__(self, space: LabelSpace, prior: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.space = space
        for i, t in enumerate(space.tasks):  # union position of each of teacher i's classes
            idx = torch.tensor(space.indices(t.name), dtype=torch.long)
            self.register_buffer(f"index_{i}", idx, persistent=False)
        prior = dict(prior or {})
        unknown = sorted(set(prior) - set(space.names))
        if unknown:
            raise ConfigError(
                f"targets.prior names unknown teachers {unknown}; teachers are {space.names}"
            )
        w = torch.tensor([float(prior.get(n, 1.0)) for n in space.names])
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(
                f"targets.prior must be finite, >= 0 and not all zero, got {prior}; "
                "it weighs how much each teacher is trusted a priori"
            )
        self.register_buffer("log_prior", w.log(), persistent=False)

    @property
    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"index_{i}") for i in range(len(self.space.tasks))]

    def gate_logits(self, logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        """[B, N] unnormalised log gates of the N teachers."""
        raise NotImplementedError

    def gates(self, logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, N] gates pi_i(x): non-negative, summing to 1 over the teachers."""
        g = self.gate_logits([z.float() for z in logits], temperature) + self.log_prior
        return torch.softmax(g, dim=1)

    def forward(self, logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, K] soft targets over the union label space (float32, rows sum to 1)."""
        if len(logits) != len(self.space.tasks):
            raise ValueError(f"{len(logits)} teacher logits for {len(self.space.tasks)} tasks")
        z = [t.float() for t in logits]
        pi = self.gates(z, temperature)
        q = z[0].new_zeros(z[0].shape[0], self.space.num_classes)
        for i, (zi, idx) in enumerate(zip(z, self.indices, strict=True)):
            q.index_add_(1, idx, pi[:, i : i + 1] * torch.softmax(zi / temperature, dim=1))
        return q


class Concat(TargetRule):
    """The reference rule: softmax over the concatenated raw logits (see the module doc)."""

    def gate_logits(self, logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        return torch.stack([torch.logsumexp(z / temperature, dim=1) for z in logits], dim=1)


def union_log_targets(
    logits: Sequence[torch.Tensor], space: LabelSpace, rule: TargetRule | None = None
) -> torch.Tensor:
    """log q at T = 1 (for argmax predictions of the teacher ensemble)."""
    rule = rule if rule is not None else Concat(space).to(logits[0].device)
    return rule(logits, 1.0).clamp_min(1e-30).log()
