"""Hyper-parameter search: the validation objective `main` returns, and an Optuna sweep."""

import importlib.util
import json
import math

import pytest
import yaml
from omegaconf import OmegaConf

from amalgam.amalgamate import objective
from amalgam.errors import ConfigError
from test_scaleout import cli

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]
HAVE_OPTUNA = all(
    importlib.util.find_spec(m) for m in ("optuna", "hydra_plugins.hydra_optuna_sweeper")
)
NO_OPTUNA = (
    "the Optuna sweeper is not installed: pip install -e '.[hparams]' "
    "(hydra-optuna-sweeper, optuna<3, sqlalchemy<2)"
)
# conf/hparams_search/cfl_optuna.yaml: (low, high) of every searched key
SPACE = {
    "method.weights.mmd": (0.1, 100.0),
    "method.weights.rec": (0.1, 100.0),
    "method.temperature": (1.0, 8.0),
    "optim.lr": (1e-4, 1e-2),
    "optim.lr_mult.head": (1.0, 30.0),
    "optim.lr_mult.method": (1.0, 30.0),
}


def test_objective_is_a_validation_metric_only():
    results = {"val": {"task_mean_acc": 0.75, "joint_acc": 0.5}, "joint": {"student_acc": 0.9}}
    cfg = OmegaConf.create({"optimized_metric": "val/task_mean_acc"})
    assert objective(cfg, results) == 0.75
    assert objective(OmegaConf.create({"optimized_metric": None}), results) is None
    assert objective(cfg, {}) is None  # ranks other than 0 report nothing
    with pytest.raises(ConfigError, match="never the test split"):
        objective(OmegaConf.create({"optimized_metric": "test/joint/student_acc"}), results)
    with pytest.raises(ConfigError, match="validation never ran"):
        objective(cfg, {"val": {}})
    with pytest.raises(ConfigError, match=r"val/joint_acc"):
        objective(OmegaConf.create({"optimized_metric": "val/nope"}), results)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_OPTUNA, reason=NO_OPTUNA)
def test_optuna_search_reports_best_validation_params(tiny_teachers, tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        tiny_teachers,
        "-m",
        "hparams_search=cfl_optuna",
        "experiment=tiny",
        "debug=fast_dev_run",
        *QUIET,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=7",
        f"hydra.sweep.dir={sweep}",
    )
    trials = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(trials) == ["0", "1", "2"]
    values = {k: r["val"]["task_mean_acc"] for k, r in trials.items()}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == set(SPACE)
    for key, (low, high) in SPACE.items():
        assert low <= best["best_params"][key] <= high, key
    assert best["best_value"] == max(values.values())
    # a best trial ran with the reported parameters (its own Hydra overrides)
    ran = []
    for k, v in values.items():
        over = yaml.safe_load((sweep / k / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in over if o.split("=", 1)[0] in SPACE)
        if v == best["best_value"]:
            ran.append(all(math.isclose(float(params[p]), best["best_params"][p]) for p in SPACE))
    assert any(ran)
    # each trial is its own variant (its sampled parameters) in the sweep report
    assert len({r["variant"] for r in trials.values()}) == 3
