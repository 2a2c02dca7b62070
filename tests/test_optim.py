"""The optimiser builder: fused kernels give the same update as the per-parameter loop."""

import pytest
import torch
from torch import nn

from amalgam.errors import ConfigError
from amalgam.optim import build_optimizer, param_groups, use_fused


def train(cfg: dict, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = param_groups(
        {"body": model[0].parameters(), "head": model[2].parameters()}, 1e-2, {"head": 10.0}
    )
    opt = build_optimizer(cfg, groups)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_update_equals_loop(name):
    base = {"name": name, "lr": 1e-2, "weight_decay": 1e-4}
    fused = train({**base, "fused": True})
    loop = train({**base, "fused": False})
    start = train({**base, "fused": False}, steps=0)
    for f, lp, s in zip(fused, loop, start, strict=True):
        assert not torch.equal(lp, s)  # the parameters moved
        torch.testing.assert_close(f, lp, atol=1e-6, rtol=1e-5)


def test_fused_auto_and_bad_value():
    groups = [{"params": [nn.Parameter(torch.zeros(3))]}]
    assert use_fused({"fused": "auto"}, groups) is True  # float32 on CPU
    assert use_fused({"fused": False}, groups) is False
    with pytest.raises(ConfigError, match=r"optim\.fused"):
        use_fused({"fused": "yes"}, groups)
