"""Tracking and clusters: wandb config/summary/groups/artifacts read back from offline runs,
variant names, console output without a terminal, SLURM presets, --help, one-line errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import amalgam.utils  # noqa: F401  (registers the resolvers the SLURM preset uses)
from amalgam.console import ConsoleLog, config_tree, duration, show_config, want_progress_bar
from amalgam.launch import is_variant_key, variant_of
from amalgam.utils import CONF_DIR
from wandb_read import read_run

TESTS = Path(__file__).parent


def run_cli(root: Path, *args: str, env: dict[str, str] | None = None, logs: Path | None = None):
    """The CLI with stdout and stderr going to files in `logs` (no terminal, as a SLURM job)."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "HYDRA_FULL_ERROR")},
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "amalgam.amalgamate", *args, f"paths.root_dir={root}"]
    logs = logs or root
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with out.open("w") as o, err.open("w") as e:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=o, stderr=e, check=False).returncode
    return rc, out.read_text(), err.read_text()


# ------------------------------------------------------------------------------ variant names


def test_variant_names_leave_out_where_a_run_executes():
    over = [
        "logger.wandb.offline=True",
        "logger=wandb",
        "method=kd",
        "trainer.devices=4",
        "trainer=gpu",
        "hydra/launcher=slurm",
        "data.num_workers=8",
        "paths.root_dir=/x",
        "+trainer.max_steps=9",
        "seed=3",
        "tags=[a]",
    ]
    assert variant_of(over) == "+trainer.max_steps=9,method=kd"
    assert variant_of(["experiment=tiny", "method=cfl"], excluded=["experiment"]) == "method=cfl"
    assert variant_of(["logger=csv", "seed=1"]) == ""
    assert is_variant_key("trainer.max_epochs") and is_variant_key("callbacks.nan_guard.action")
    assert not is_variant_key("callbacks") and not is_variant_key("callbacks.progress")
    assert not is_variant_key("trainer") and not is_variant_key("logger.wandb.project")


# ------------------------------------------------------------------------------ one real sweep


@pytest.mark.slow
def test_wandb_sweep_config_groups_artifacts_and_console(tiny_teachers, tmp_path):
    """A 2-job multirun with wandb offline, as a cluster user runs it (no terminal)."""
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "debug=quick",
        "logger=wandb",
        "logger.wandb.offline=True",
        "logger.wandb.log_model=true",
        "tags=[paper,tiny]",
        "method=kd,cfl",
        "console.every_n_steps=2",
        f"hydra.sweep.dir={sweep}",
        logs=tmp_path,
    )
    assert rc == 0, err[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 2
    seen = {}
    for job in jobs:
        (wdir,) = sorted((job / "wandb").glob("offline-run-*"))
        run = read_run(wdir)
        method = run["config"]["method"]["name"]
        seen[method] = run
        # the resolved config is the run's hyper-parameters: nested, filterable
        assert (
            run["config"]["student"]["arch"]
            == OmegaConf.load(Path(CONF_DIR) / "student" / "tiny.yaml").arch
        )
        if method == "cfl":
            assert run["config"]["method"]["weights"]["mmd"] == pytest.approx(
                OmegaConf.load(Path(CONF_DIR) / "method" / "cfl.yaml").weights.mmd
            )
        assert run["config"]["targets"]["_target_"].endswith("Concat")
        assert run["config"]["seed"] == 1337
        # grouped by variant; the logger overrides are not part of it
        assert run["run"].run_group == f"tiny/method={method}"
        assert run["run"].display_name == f"method={method}/seed1337"
        assert {"paper", "tiny", method} <= set(run["run"].tags)
        # the summary holds the test figures the results file holds
        results = yaml.safe_load((job / "results.json").read_text())
        assert run["summary"]["test/joint/student_acc"] == pytest.approx(
            results["joint"]["student_acc"]
        )
        # one name per val metric
        val_keys = {k for row in run["history"] for k in row if k.startswith("val/")}
        assert "val/joint_acc" in val_keys and "val/acc_joint" not in val_keys
        # the final checkpoint and the results files as one artifact
        (art,) = [a for a in run["artifacts"] if a.type == "model"]
        files = {e.path for e in art.manifest.contents}
        assert art.type == "model" and "final" in list(art.aliases)
        assert {"final.ckpt", "results.json", "results.md", "config_tree.log"} <= files
        # hparams.yaml of the CSV logger is not written (logger=wandb), the tree is
        tree = (job / "config_tree.log").read_text()
        assert "method" in tree and "teacher_set" in tree and "max_epochs: 2" in tree
    assert set(seen) == {"kd", "cfl"}
    # the report's rows are the variants, with their seeds
    report = (sweep / "report.md").read_text()
    assert "method=kd" in report and "method=cfl" in report and "logger" not in report
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(r["variant"] for r in rows) == ["method=cfl", "method=kd"]
    assert all("1337" in r["seeds"] for r in rows)
    # the console, without a terminal: run dir, config tree, a line per epoch and per 2 steps
    text = out + err
    assert "run dir:" in text and "CONFIG" in text
    epoch_lines = [ln for ln in text.splitlines() if "epoch 2/2 step 8/8" in ln]
    assert len(epoch_lines) >= 2 and all("img/s" in ln and "elapsed" in ln for ln in epoch_lines)
    assert any("| val " in ln and "joint_acc" in ln for ln in epoch_lines)
    assert any("epoch 1/2 step 2/8" in ln and "ETA" in ln for ln in text.splitlines())
    assert "Epoch 0/" not in text and "Epoch 1/" not in text  # no progress bar in a file
    # and the lines reach the Hydra log file of each job
    for job in jobs:
        assert "epoch 2/2 step 8/8" in (job / "amalgamate.log").read_text()


@pytest.mark.slow
def test_hparams_file_and_reference_ensemble_beside_the_rule(tiny_teachers, tmp_path):
    """The CSV logger's hparams.yaml holds the config; under a rule other than concat the
    results also give the teachers' concat ensemble, from the same teachers and images."""
    from amalgam.api import Amalgamation
    from amalgam.evaluation import evaluate
    from amalgam.report.run import rows
    from conftest import make_cfg

    cfg = make_cfg(
        "amalgamate",
        ["experiment=tiny", "debug=fast_dev_run", "targets=ood_msp", "console.progress_bar=false"],
        tiny_teachers,
        tmp_path / "run",
    )
    am = Amalgamation.from_config(cfg)
    results = am.fit()
    hp = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert hp["method"]["name"] == "cfl" and hp["seed"] == 1337
    assert hp["targets"]["_target_"] == "amalgam.targets.OODGate"
    assert (tmp_path / "run" / "config_tree.log").is_file()
    joint = results["joint"]
    assert joint["target_rule"] != "Concat"
    m = am.module
    concat = evaluate(m.student, m.teachers, am.datamodule.test_dataloader(), m.space, "cpu")
    assert joint["teacher_ensemble_concat_acc"] == pytest.approx(
        concat["joint"]["teacher_ensemble_acc"]
    )
    labels = [r[0] for r in rows(results)]
    assert labels[-1] == "joint (teachers: Concat, the reference rule)"
    assert "Concat, the reference rule" in (tmp_path / "run" / "results.md").read_text()


# ------------------------------------------------------------------------------ console parts


def test_duration_and_progress_bar_setting():
    assert duration(3725) == "1h02m05s" and duration(65) == "1m05s" and duration(4.2) == "4s"

    class Tty:
        def isatty(self):
            return True

    class File:
        def isatty(self):
            return False

    assert want_progress_bar("auto", Tty()) and not want_progress_bar("auto", File())
    assert want_progress_bar(True, File()) and not want_progress_bar("false", Tty())


def test_console_log_line_has_terms_throughput_and_eta(caplog):
    class FakeTrainer:
        global_step = 50
        current_epoch = 0
        max_epochs = 4
        estimated_stepping_batches = 200
        is_global_zero = True
        num_training_batches = 50
        callback_metrics: ClassVar[dict[str, float]] = {
            "train/loss": 1.5,
            "train/kd": 1.0,
            "train/mmd": 0.5,
            "val/x": 0.25,
        }

    cb = ConsoleLog(every_n_steps=10)
    cb._start = cb._last = __import__("time").perf_counter() - 10.0
    cb._images = 640
    line = cb.line(FakeTrainer(), val=True)
    assert line.startswith("epoch 1/4 step 50/200 | loss 1.5 kd 1 mmd 0.5 | val x 0.2500")
    rate = float(line.split(" img/s")[0].rsplit("| ", 1)[1])
    assert 55 < rate < 65  # 640 images in ~10 s
    assert "ETA 30s" in line  # 150 steps left at 0.2 s a step
    with pytest.raises(ValueError, match="every_n_steps"):
        ConsoleLog(every_n_steps=0)


def test_config_tree_saved_as_text(tmp_path):
    cfg = OmegaConf.create({"seed": 1, "method": {"name": "cfl", "weights": {"mmd": 2.0}}})
    path = show_config(cfg, tmp_path, echo=False)
    text = path.read_text()
    assert path.name == "config_tree.log"
    assert "method" in text and "mmd: 2.0" in text and "seed: 1" in text
    assert "\x1b[" not in text  # plain text, no colour codes
    assert config_tree(cfg).label == "CONFIG"


# ------------------------------------------------------------------------------ SLURM presets


def _launcher(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "amalgamate", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
        )
    return cfg


def test_slurm_launcher_follows_the_trainer():
    cfg = _launcher(["trainer=slurm"])
    la = cfg.hydra.launcher
    assert (la.tasks_per_node, la.gpus_per_node, la.nodes) == (cfg.trainer.devices, 2, 1)
    cfg = _launcher(["trainer=slurm", "trainer.devices=4", "trainer.num_nodes=3"])
    la = cfg.hydra.launcher
    assert (la.tasks_per_node, la.gpus_per_node, la.nodes) == (4, 4, 3)
    la = _launcher(["trainer=ddp_cpu"]).hydra.launcher
    assert la.gpus_per_node == 0 and la.tasks_per_node == 2
    la = _launcher(["trainer=gpu"]).hydra.launcher
    assert (la.tasks_per_node, la.gpus_per_node) == (1, 1)
    with pytest.raises(Exception, match="give a device count"):
        _ = _launcher(["trainer=slurm", "trainer.devices=auto"]).hydra.launcher.tasks_per_node


# ------------------------------------------------------------------------------ CLI text


@pytest.mark.slow
def test_help_is_amalgams(tmp_path):
    rc, out, _ = run_cli(tmp_path, "--help")
    assert rc == 0
    assert "knowledge amalgamation" in out and "Powered by Hydra" not in out
    assert "method: cfl" in out and "teacher_set:" in out
    examples = [ln for ln in out.splitlines() if ln.strip().startswith("python -m amalgam.")]
    assert len(examples) == 3


@pytest.mark.slow
def test_config_error_is_one_line_unless_full_error(tmp_path):
    args = ("experiment=tiny", "optim.lr=-1", f"hydra.run.dir={tmp_path / 'r'}")
    rc, _, err = run_cli(tmp_path, *args)
    assert rc != 0
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "optim.lr" in lines[0] and "Traceback" not in err
    assert lines[0] == err.strip().splitlines()[-1]  # the last thing printed
    assert rc == 2
    rc, _, err = run_cli(tmp_path, *args, env={"HYDRA_FULL_ERROR": "1"})
    assert rc != 0 and "Traceback" in err and "optim.lr" in err
