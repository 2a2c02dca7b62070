"""Compare target rules on the teacher ensemble alone (no student is trained).

    python -m amalgam.rules_eval experiment=demo targets=concat,density_ratio [--out f.json]

Any other argument is a Hydra override of the `amalgamate` config. `targets` takes one rule or a
comma-separated list of `conf/targets/` names; each rule is fit as `build_amalgamation` would
(from the teachers' own images and the unlabeled pool, never an amalgamation label), then the
teachers run once over the test split and every rule is scored on the same outputs:
joint accuracy (argmax of q over the union), task-aware accuracy (each teacher's own head),
the mean gate on the true task, and the task confusion (rows: true task, columns: the task of
the argmax; a shared class counts for its first task). The row `oracle_gate` gates by the test
labels' task: the bound of any gate on these teachers (the only row that reads labels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from amalgam.build import build_amalgamation
from amalgam.errors import ConfigError
from amalgam.evaluation import AmalgamAccuracy, task_confusion, task_owner
from amalgam.files import atomic_write_text
from amalgam.targets import TargetRule, pooled
from amalgam.tasks import LabelSpace
from amalgam.utils import CONF_DIR, quiet_known_warnings, to_dict


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The `amalgamate` config with `overrides`; output_dir set (no Hydra run here)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("amalgamate", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(str(cfg.paths.log_dir)) / "rules_eval")
    return cfg


@torch.no_grad()
def test_outputs(bank: Any, loader: Any, device: torch.device) -> dict[str, Any]:
    """Every teacher's logits and pooled last feature map over the test split, and labels."""
    zs: list[list[torch.Tensor]] = [[] for _ in bank.names]
    fs: list[list[torch.Tensor]] = [[] for _ in bank.names]
    ys = []
    for x, y in loader:
        out = bank(x.to(device), features=True)
        for i, (z, f) in enumerate(zip(out.logits, pooled(out.features), strict=True)):
            zs[i].append(z.float().cpu())
            fs[i].append(f.cpu())
        ys.append(y.long())
    return {
        "logits": [torch.cat(z) for z in zs],
        "features": [torch.cat(f) for f in fs],
        "labels": torch.cat(ys),
    }


@torch.no_grad()
def score_rule(rule: TargetRule, outs: dict[str, Any], space: LabelSpace) -> dict[str, Any]:
    """Joint and task-aware accuracy, gate on the true task and task confusion of one rule."""
    rule = rule.cpu().eval()
    logits, feats, y = outs["logits"], outs["features"], outs["labels"]
    q = rule(logits, 1.0, feats if rule.needs_features else None)
    pi = rule.gates(logits, 1.0, feats if rule.needs_features else None)
    acc = AmalgamAccuracy(space, sync_on_compute=False)
    acc.update(q.clamp_min(1e-30).log(), y)
    joint = float(acc.compute()["joint"])
    own = {}
    for i, t in enumerate(space.tasks):  # each teacher's own head on its task's images
        idx = torch.tensor(space.indices(t.name))
        local = torch.full((space.num_classes,), -1, dtype=torch.long)
        local[idx] = torch.arange(len(idx))
        mask = local[y] >= 0
        own[t.name] = float((logits[i][mask].argmax(1) == local[y[mask]]).float().mean())
    knows = torch.zeros(len(space.tasks), space.num_classes, dtype=torch.bool)
    for i, t in enumerate(space.tasks):
        knows[i, space.indices(t.name)] = True
    gate_true = float((pi * knows[:, y].T.float()).sum(1).mean())
    owner = task_owner(space)
    conf = task_confusion(q.argmax(1), y, owner, len(space.tasks))
    return {
        "joint": joint,
        "task_aware": own,
        "gate_on_true_task": gate_true,
        "task_confusion": conf.tolist(),
    }


@torch.no_grad()
def oracle(outs: dict[str, Any], space: LabelSpace) -> dict[str, Any]:
    """The bound of any gate: pi = the teachers that know the TEST label (reads labels)."""

    class Oracle(TargetRule):
        def gate_logits(self, logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
            return torch.where(self.knows, 0.0, -1e4)

    rule = Oracle(space)
    knows = torch.zeros(len(space.tasks), space.num_classes, dtype=torch.bool)
    for i, t in enumerate(space.tasks):
        knows[i, space.indices(t.name)] = True
    rule.knows = knows[:, outs["labels"]].T
    return score_rule(rule, outs, space) | {"rule": "test labels (a bound)", "fit_seconds": 0.0}


def evaluate_rules(overrides: list[str], rules: list[str], device: str | None = None) -> dict:
    """{rule: scores} for each `conf/targets/<rule>` on one set of teacher test outputs."""
    quiet_known_warnings()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = compose_cfg([*overrides, f"targets={rules[0]}"])
    t0 = time.perf_counter()
    dm, module = build_amalgamation(cfg)  # fits rules[0] if it has statistics
    first_fit = time.perf_counter() - t0
    bank, space = module.teachers.to(dev), module.space
    outs = test_outputs(bank, dm.test_dataloader(), dev)
    results: dict[str, Any] = {}
    for k, name in enumerate(rules):
        t0 = time.perf_counter()
        if k == 0:
            rule, fit_s = module.method.targets, first_fit
        else:
            rcfg = compose_cfg([*overrides, f"targets={name}"]).targets
            rule = hydra.utils.instantiate(to_dict(rcfg))(space=space).to(dev)
            if rule.needs_fit:
                rule.fit(bank, dm)
            fit_s = time.perf_counter() - t0
        results[name] = score_rule(rule, outs, space) | {
            "rule": type(rule).__name__,
            "fit_seconds": round(fit_s, 1),
        }
    results["oracle_gate"] = oracle(outs, space)
    results["_info"] = {
        "overrides": overrides,
        "n_test": len(outs["labels"]),
        "tasks": list(space.names),
        "device": str(dev),
    }
    return results


def table(results: dict[str, Any]) -> Table:
    tasks = results["_info"]["tasks"]
    t = Table(title=f"target rules: teacher ensemble on {results['_info']['n_test']} test images")
    for h in ["rule", "joint %", *[f"{n} %" for n in tasks], "gate on true task %"]:
        t.add_column(h, justify="left" if h == "rule" else "right")
    t.add_column("task confusion (true task rows / predicted)")
    t.add_column("fit s", justify="right")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        t.add_row(
            name,
            f"{100 * r['joint']:.2f}",
            *[f"{100 * r['task_aware'][n]:.2f}" for n in tasks],
            f"{100 * r['gate_on_true_task']:.2f}",
            " / ".join(" ".join(str(v) for v in row) for row in r["task_confusion"]),
            f"{r['fit_seconds']:.1f}",
        )
    return t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=demo")
    p.add_argument("--out", help="write the scores as JSON to this file")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    rules, rest = ["concat"], []
    for o in args.overrides:
        if o.startswith("targets="):
            rules = [r.strip() for r in o.split("=", 1)[1].split(",") if r.strip()]
        else:
            rest.append(o)
    if not rules:
        raise ConfigError("targets= names no rule: give e.g. targets=concat,density_ratio")
    results = evaluate_rules(rest, rules, args.device)
    Console(width=max(Console().width, 132)).print(table(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
