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

Rules with statistics (`Calibrated`, `OODGate`, `DensityRatio`) are fit once before training by
`fit(bank, dm)` (`build.assemble` calls it) from each teacher's OWN-task images (the
teacher owner's data) and, for `DensityRatio`, the unlabeled amalgamation pool; never from a
label of the amalgamation data. Their statistics are persistent buffers: they land in student
checkpoints and are loaded back (with their shapes) when a run is rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from amalgam.errors import ConfigError
from amalgam.tasks import LabelSpace
from amalgam.utils import log

Features = Sequence[Any]  # per teacher: its list of feature maps, one map, or pooled [B, D]


def pooled(features: Features) -> list[torch.Tensor]:
    """[B, D_i] per teacher: the last feature map each teacher returns, global-average-pooled."""
    out = []
    for f in features:
        if isinstance(f, list | tuple):
            if not f:
                raise ValueError("a teacher returned no feature map: call it with features=True")
            f = f[-1]
        f = f.float()
        out.append(f.flatten(2).mean(2) if f.dim() == 4 else f.mean(1) if f.dim() == 3 else f)
    return out


class TargetRule(nn.Module):
    """Base: subclasses give the gate logits log pi_i(x) (up to a per-image constant).

    A rule whose gate reads the teachers' features sets `needs_features` and takes
    `gate_logits(logits, temperature, features=...)` (features pooled, see `pooled`); a rule
    with statistics sets `needs_fit` and implements `fit(bank, dm)`.
    """

    needs_fit: bool = False

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
    def needs_features(self) -> bool:
        """True when the gate reads the teachers' (last) feature maps, not only their logits."""
        return False

    @property
    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"index_{i}") for i in range(len(self.space.tasks))]

    def fit(self, bank: nn.Module, dm: Any) -> None:
        """Statistics-free rules have nothing to fit."""

    def scaled_logits(self, z: torch.Tensor, i: int, temperature: float) -> torch.Tensor:
        """Teacher i's logits as they enter p_i = softmax(.) (default: z_i / T)."""
        return z / temperature

    def gate_logits(self, logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        """[B, N] unnormalised log gates of the N teachers."""
        raise NotImplementedError

    def gates(
        self,
        logits: Sequence[torch.Tensor],
        temperature: float = 1.0,
        features: Features | None = None,
    ) -> torch.Tensor:
        """[B, N] gates pi_i(x): non-negative, summing to 1 over the teachers."""
        z = [t.float() for t in logits]
        if self.needs_features:
            if features is None:
                raise ValueError(
                    f"target rule {type(self).__name__} gates by the teachers' features: pass "
                    "features=<TeacherOutputs.features> (teachers run with features=True)"
                )
            g = self.gate_logits(z, temperature, features=pooled(features))
        else:
            g = self.gate_logits(z, temperature)
        return torch.softmax(g + self.log_prior, dim=1)

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        temperature: float = 1.0,
        features: Features | None = None,
    ) -> torch.Tensor:
        """[B, K] soft targets over the union label space (float32, rows sum to 1)."""
        if len(logits) != len(self.space.tasks):
            raise ValueError(f"{len(logits)} teacher logits for {len(self.space.tasks)} tasks")
        z = [t.float() for t in logits]
        pi = self.gates(z, temperature, features)
        q = z[0].new_zeros(z[0].shape[0], self.space.num_classes)
        for i, (zi, idx) in enumerate(zip(z, self.indices, strict=True)):
            p = torch.softmax(self.scaled_logits(zi, i, temperature), dim=1)
            q.index_add_(1, idx, pi[:, i : i + 1] * p)
        return q


class Concat(TargetRule):
    """The reference rule: softmax over the concatenated raw logits (see the module doc).

    pi_i(x) = exp(lse_i) / sum_j exp(lse_j), lse_i = logsumexp(z_i / T).
    """

    def gate_logits(self, logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        return torch.stack([torch.logsumexp(z / temperature, dim=1) for z in logits], dim=1)


# ------------------------------------------------------------------------------ fitting helpers


def _check_number(value: Any, key: str, low: float, low_ok: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v >= low if low_ok else v > low) or v != v or v == float("inf"):
        raise ConfigError(
            f"targets.{key}={value!r}: must be a finite number {'>=' if low_ok else '>'} {low}"
        )
    return v


def _check_count(value: Any, key: str, low: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"targets.{key}={value!r}: must be an integer >= {low}")
    return value


def _choice(value: Any, key: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(f"targets.{key}={value!r}: choose one of {list(options)}")
    return str(value)


def subset_loader(loader: DataLoader, limit: int | None, seed: int) -> DataLoader:
    """The loader's data set, at most `limit` images drawn at random (seeded), in fixed order."""
    ds = loader.dataset
    if limit is not None and len(ds) > limit:
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist())
    return DataLoader(ds, batch_size=loader.batch_size, shuffle=False, num_workers=0)


def bank_device(bank: nn.Module) -> torch.device:
    p = next(bank.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def teacher_outputs(
    bank: nn.Module, name: str, loader: Iterable[Any], features: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits [n, C], pooled last feature map [n, D] or None, labels [n] or None) of one
    teacher over a loader of (images, labels) or {"image", ...} batches."""
    teacher, device = bank.teachers[name], bank_device(bank)
    zs, fs, ys = [], [], []
    for batch in loader:
        x, y = (batch["image"], None) if isinstance(batch, Mapping) else (batch[0], batch[1])
        out = teacher(x.to(device), features=features)
        zs.append(out.logits.float().cpu())
        if features:
            fs.append(pooled([out.features])[0].cpu())
        if y is not None:
            ys.append(torch.as_tensor(y).long())
    if not zs:
        raise ConfigError(f"teacher '{name}': no images to fit the target rule on")
    return torch.cat(zs), torch.cat(fs) if features else None, torch.cat(ys) if ys else None


def held_out_loader(dm: Any, name: str, limit: int | None, rule: str) -> DataLoader:
    """Teacher `name`'s own-task held-out images (the val split), at most `limit` of them."""
    loader = dm.task_dataloader(name, "val")
    if len(loader.dataset) < 2:
        raise ConfigError(
            f"targets={rule} fits on each teacher's held-out own-task images (the val split), "
            f"but teacher '{name}' has {len(loader.dataset)}: set data.val_fraction > 0 "
            "(e.g. 0.1) or a larger data.train_limit"
        )
    return subset_loader(loader, limit, int(getattr(dm, "seed", 0)))


class FittedRule(TargetRule):
    """A rule with statistics: persistent buffers filled by `fit`, refused before it.

    Buffers of fit-time shapes (feature widths) start empty and take the shapes of a loaded
    state dict, so a checkpoint restores the statistics into a freshly built rule.
    """

    needs_fit = True

    def __init__(self, space: LabelSpace, prior: Mapping[str, float] | None = None) -> None:
        super().__init__(space, prior)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.is_fit = False  # a Python mirror of `fitted`: no device sync per training step

    def _stat(self, name: str, value: torch.Tensor | None = None) -> None:
        """Register (or set) a persistent statistics buffer."""
        t = torch.empty(0) if value is None else value.detach().float()
        self.register_buffer(name, t.to(self.log_prior.device))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_fit = bool(self.fitted)

    def fit(self, bank: nn.Module, dm: Any) -> None:
        """Compute the statistics (no label of the amalgamation data is read)."""
        t0 = time.perf_counter()
        was = bank.training
        bank.eval()
        try:
            self._fit(bank, dm)
        finally:
            bank.train(was)
        self.fitted.fill_(True)
        self.is_fit = True
        log.info("target rule %s fit in %.1f s", type(self).__name__, time.perf_counter() - t0)

    def _fit(self, bank: nn.Module, dm: Any) -> None:
        raise NotImplementedError

    def gates(
        self,
        logits: Sequence[torch.Tensor],
        temperature: float = 1.0,
        features: Features | None = None,
    ) -> torch.Tensor:
        if not self.is_fit:
            raise RuntimeError(
                f"target rule {type(self).__name__} has no statistics yet: call "
                "rule.fit(bank, dm) first (amalgam.build.assemble does) or load a checkpoint"
            )
        return super().gates(logits, temperature, features)


# ------------------------------------------------------------------------------ rules


class Calibrated(FittedRule):
    """Concat over per-teacher temperature-scaled logits.

    T_i minimises teacher i's NLL on its own held-out images (own-task labels, the teacher
    owner's), so every teacher's confidence is calibrated on its own task; then
    p_i = softmax(z_i / (T * T_i)) and pi_i(x) ∝ exp(logsumexp(z_i / (T * T_i))).
    """

    def __init__(
        self,
        space: LabelSpace,
        prior: Mapping[str, float] | None = None,
        fit_limit: int = 5000,
    ) -> None:
        super().__init__(space, prior)
        self.fit_limit = _check_count(fit_limit, "fit_limit")
        self._stat("log_temperature", torch.zeros(len(space.tasks)))

    @property
    def temperatures(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def scaled_logits(self, z: torch.Tensor, i: int, temperature: float) -> torch.Tensor:
        return z / (temperature * self.log_temperature[i].exp())

    def gate_logits(self, logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        z = [self.scaled_logits(zi, i, temperature) for i, zi in enumerate(logits)]
        return torch.stack([torch.logsumexp(zi, dim=1) for zi in z], dim=1)

    def _fit(self, bank: nn.Module, dm: Any) -> None:
        out = torch.zeros(len(self.space.tasks))
        for i, name in enumerate(self.space.names):
            loader = held_out_loader(dm, name, self.fit_limit, "calibrated")
            z, _, y = teacher_outputs(bank, name, loader, features=False)
            out[i] = fit_log_temperature(z, y)
        self._stat("log_temperature", out)
        log.info("calibrated temperatures: %s", dict(zip(self.space.names, out.exp().tolist())))


def fit_log_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """log T minimising the cross entropy of softmax(z / T) against y (temperature scaling)."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().clamp(-5, 5))


OOD_SCORES = ("msp", "energy", "mahalanobis")


class OODGate(FittedRule):
    """Gate by an out-of-distribution score of each teacher alone, standardised on its own data.

    s_i(x) is an outlier score of teacher i (higher = less like its own task):
    `msp`: -max_c softmax(z_i)_c; `energy`: -logsumexp(z_i); `mahalanobis`:
    log min_c (f_i - mu_ic)^T S_i^-1 (f_i - mu_ic), with f_i teacher i's pooled last feature map,
    mu_ic its class means and S_i the shared covariance shrunk towards (tr S / D) I by
    `shrinkage`, fit on its own-task training images with its own-task labels. m_i and sd_i are
    the mean and standard deviation of s_i on its own held-out images (the val split), so
    teachers are comparable, and

        pi_i(x) ∝ prior_i * exp(-beta * (s_i(x) - m_i) / sd_i).
    """

    def __init__(
        self,
        space: LabelSpace,
        prior: Mapping[str, float] | None = None,
        score: str = "mahalanobis",
        beta: float = 1.0,
        shrinkage: float = 0.5,
        fit_limit: int = 5000,
    ) -> None:
        super().__init__(space, prior)
        self.score = _choice(score, "score", OOD_SCORES)
        self.beta = _check_number(beta, "beta", 0.0)
        self.shrinkage = _check_number(shrinkage, "shrinkage", 0.0, low_ok=True)
        if self.shrinkage > 1:
            raise ConfigError(f"targets.shrinkage={shrinkage!r}: must be in [0, 1]")
        self.fit_limit = _check_count(fit_limit, "fit_limit")
        n = len(space.tasks)
        self._stat("loc", torch.zeros(n))
        self._stat("scale", torch.ones(n))
        if self.score == "mahalanobis":
            for i in range(n):
                self._stat(f"whiten_{i}")  # [D, D]: S^-1 = W W^T
                self._stat(f"centers_{i}")  # [C, D]: mu_c W

    @property
    def needs_features(self) -> bool:
        return self.score == "mahalanobis"

    def outlier_score(self, i: int, z: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        """[B] s_i(x) of teacher i from its logits z and pooled features f."""
        if self.score == "msp":
            return -torch.softmax(z, dim=1).max(dim=1).values
        if self.score == "energy":
            return -torch.logsumexp(z, dim=1)
        assert f is not None
        w, c = getattr(self, f"whiten_{i}"), getattr(self, f"centers_{i}")
        d = torch.cdist(f.float() @ w, c).square().min(dim=1).values
        return d.clamp_min(1e-12).log()

    def gate_logits(  # type: ignore[override]
        self,
        logits: Sequence[torch.Tensor],
        temperature: float,
        features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        feats = features if features is not None else [None] * len(logits)
        s = torch.stack(
            [self.outlier_score(i, z, f) for i, (z, f) in enumerate(zip(logits, feats))], dim=1
        )
        return -self.beta * (s - self.loc) / self.scale

    def _fit(self, bank: nn.Module, dm: Any) -> None:
        seed = int(getattr(dm, "seed", 0))
        loc, scale = torch.zeros(len(self.space.tasks)), torch.ones(len(self.space.tasks))
        for i, name in enumerate(self.space.names):
            if self.needs_features:
                train = subset_loader(dm.task_dataloader(name, "train"), self.fit_limit, seed)
                _, f, y = teacher_outputs(bank, name, train, features=True)
                w, c = gaussian_fit(f, y, self.shrinkage)
                self._stat(f"whiten_{i}", w)
                self._stat(f"centers_{i}", c)
            val = held_out_loader(dm, name, self.fit_limit, f"ood (score={self.score})")
            z, f, _ = teacher_outputs(bank, name, val, features=self.needs_features)
            dev = self.loc.device
            s = self.outlier_score(i, z.to(dev), None if f is None else f.to(dev)).cpu()
            loc[i], scale[i] = s.mean(), s.std().clamp_min(1e-6)
        self._stat("loc", loc)
        self._stat("scale", scale)


def gaussian_fit(
    f: torch.Tensor, y: torch.Tensor, shrinkage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [D, D], centers [C, D]) with (f - mu_c)^T S^-1 (f - mu_c) = ||f W - mu_c W||^2:
    class means mu_c and the shared covariance S, shrunk to (1 - a) S + a (tr S / D) I."""
    x = f.double()
    classes = torch.unique(y)
    mu = torch.stack([x[y == c].mean(0) for c in classes])
    r = x - mu[torch.searchsorted(classes, y)]
    cov = r.T @ r / max(len(x) - len(classes), 1)
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype)
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * eye + 1e-8 * eye
    w = torch.linalg.cholesky(torch.linalg.inv(cov))  # S^-1 = W W^T
    return w.float(), (mu @ w).float()


REPRESENTATIONS = ("features", "logits")


class DensityRatio(FittedRule):
    """Gate by how much more an image looks like a teacher's own task than like the pool.

    Per teacher i, a logistic "domain" classifier h_i on its own representation r_i(x) (its
    pooled last feature map, or its logits with representation=logits) is fit to tell its own
    held-out images (val split; positives) from images of the unlabeled amalgamation pool
    (negatives), the two sets weighted equally, with an L2 penalty `l2`:

        h_i(x) = w_i . (r_i(x) - m_i) / s_i + b_i  ≈  log p_i(x) / p_pool(x)

    (m_i, s_i: mean and std of r_i over the fit images). p_pool is a mixture of the tasks, so
    with the tasks' pool shares as `prior` and beta = 1 the gate is the posterior of task i:

        pi_i(x) ∝ prior_i * exp(beta * h_i(x)).

    Only teacher i's own images and unlabeled images are read; no amalgamation label.
    """

    def __init__(
        self,
        space: LabelSpace,
        prior: Mapping[str, float] | None = None,
        representation: str = "features",
        beta: float = 1.0,
        l2: float = 1e-4,
        fit_limit: int = 5000,
        pool_limit: int = 10000,
        max_iter: int = 200,
    ) -> None:
        super().__init__(space, prior)
        self.representation = _choice(representation, "representation", REPRESENTATIONS)
        self.beta = _check_number(beta, "beta", 0.0)
        self.l2 = _check_number(l2, "l2", 0.0, low_ok=True)
        self.fit_limit = _check_count(fit_limit, "fit_limit")
        self.pool_limit = _check_count(pool_limit, "pool_limit")
        self.max_iter = _check_count(max_iter, "max_iter", 1)
        for i in range(len(space.tasks)):
            self._stat(f"center_{i}")  # m_i [D]
            self._stat(f"weight_{i}")  # w_i / s_i [D]
        self._stat("bias", torch.zeros(len(space.tasks)))

    @property
    def needs_features(self) -> bool:
        return self.representation == "features"

    def domain_logits(self, reps: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, N] h_i(x) from each teacher's representation (pooled features or logits)."""
        h = [
            (r.float() - getattr(self, f"center_{i}")) @ getattr(self, f"weight_{i}")
            for i, r in enumerate(reps)
        ]
        return torch.stack(h, dim=1) + self.bias

    def gate_logits(  # type: ignore[override]
        self,
        logits: Sequence[torch.Tensor],
        temperature: float,
        features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.beta * self.domain_logits(features if self.needs_features else logits)

    def _fit(self, bank: nn.Module, dm: Any) -> None:
        feats = self.needs_features
        pool = subset_loader(dm.pool_dataloader(), self.pool_limit, int(getattr(dm, "seed", 0)))
        bias = torch.zeros(len(self.space.tasks))
        for i, name in enumerate(self.space.names):
            z_u, f_u, _ = teacher_outputs(bank, name, pool, features=feats)
            val = held_out_loader(dm, name, self.fit_limit, "density_ratio")
            z_p, f_p, _ = teacher_outputs(bank, name, val, features=feats)
            pos, unl = (f_p, f_u) if feats else (z_p, z_u)
            center, weight, bias[i] = fit_domain_classifier(pos, unl, self.l2, self.max_iter)
            self._stat(f"center_{i}", center)
            self._stat(f"weight_{i}", weight)
            h_pos, h_unl = ((r - center) @ weight + bias[i] for r in (pos, unl))
            log.info(
                "density_ratio %s: mean h %.2f on its held-out images, %.2f on the pool",
                name,
                float(h_pos.mean()),
                float(h_unl.mean()),
            )
        self._stat("bias", bias)


def fit_domain_classifier(
    pos: torch.Tensor, unl: torch.Tensor, l2: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(center m, weight w / s, bias b) of a class-balanced L2 logistic regression of `pos`
    (label 1) against `unl` (label 0) on standardised inputs: logit(x) = (x - m) . w/s + b."""
    x = torch.cat([pos, unl]).float()
    center, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xp, xu = (pos.float() - center) / std, (unl.float() - center) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            0.5 * (F.softplus(-(xp @ w + b)).mean() + F.softplus(xu @ w + b).mean())
            + l2 * w.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return center, (w.detach() / std), float(b.detach())


def union_log_targets(
    logits: Sequence[torch.Tensor],
    space: LabelSpace,
    rule: TargetRule | None = None,
    features: Features | None = None,
) -> torch.Tensor:
    """log q at T = 1 (for argmax predictions of the teacher ensemble)."""
    rule = rule if rule is not None else Concat(space).to(logits[0].device)
    return rule(logits, 1.0, features).clamp_min(1e-30).log()
