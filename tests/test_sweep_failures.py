"""A sweep in which jobs fail still gets its report, which lists each failed or unfinished job.

Three levels: the aggregation over a hand-made sweep dir; a stub Hydra app (seconds) whose one
job raises, with the basic and the joblib launcher; and the real CLI on the tiny experiment.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from amalgam.report.sweep import (
    FAILURE,
    UNFINISHED,
    AggregateOnMultirunEnd,
    collect,
    job_problems,
    write_sweep_report,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def results(variant: str, seed: int, acc: float) -> dict:
    """A results.json as a finished job writes it (the fields the sweep report reads)."""
    return {
        "variant": variant,
        "method": "cfl",
        "seed": seed,
        "targets": "Concat",
        "uses_labels": False,
        "tasks": {"a": {"student_acc": acc, "teacher_acc": 0.9}},
        "joint": {"student_acc": acc, "teacher_ensemble_acc": 0.8},
    }


def job(sweep: Path, name: str, overrides: str, files: dict[str, str] | None = None) -> Path:
    """A job dir: `.hydra/overrides.yaml` and the given files (name: text)."""
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(overrides)
    for fname, text in (files or {}).items():
        (d / fname).write_text(text)
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep dir: one finished job, one failed, one killed, one with a malformed
    results.json, one with malformed overrides.yaml and failure record."""
    s = tmp_path / "sweep"
    job(s, "0_seed=0", "- seed=0\n", {"results.json": json.dumps(results("", 0, 0.5))})
    fail = {"status": "failed", "error": "RuntimeError: lr is nan | inf\nsecond line"}
    job(s, "1_optim.lr=nan", "- optim.lr=nan\n", {FAILURE: json.dumps(fail)})
    job(s, "2_seed=2", "- seed=2\n")
    job(s, "3_bad", "- seed=3\n", {"results.json": '{"tasks": '})
    job(s, "4_worse", "{a: 1}\n", {FAILURE: '"just a string"'})
    job(s, "5_shape", "- [unclosed\n", {"results.json": json.dumps({"tasks": {}, "joint": 1})})
    return s


def test_problems_lists_failed_killed_and_malformed_jobs(sweep):
    assert [r["seed"] for r in collect(sweep)] == [0]
    n, problems = job_problems(sweep)
    assert n == 6
    assert problems == [
        {
            "job": "1_optim.lr=nan",
            "status": "failed",
            "overrides": "optim.lr=nan",
            "error": "RuntimeError: lr is nan | inf",
        },
        {"job": "2_seed=2", "status": "unfinished", "overrides": "seed=2", "error": UNFINISHED},
        {
            "job": "3_bad",
            "status": "malformed",
            "overrides": "seed=3",
            "error": "results.json: unreadable (JSONDecodeError: Expecting value: line 1 column "
            "11 (char 10))",
        },
        {
            "job": "4_worse",
            "status": "failed",
            "overrides": "(malformed .hydra/overrides.yaml: not a list of strings)",
            "error": "(malformed failure record: no 'error' text)",
        },
        {
            "job": "5_shape",
            "status": "malformed",
            "overrides": "(malformed .hydra/overrides.yaml: ParserError)",
            "error": "results.json: no 'tasks' entry",
        },
    ]


def test_report_lists_the_problems_under_the_table(sweep):
    paths = write_sweep_report(sweep)
    md = paths["md"].read_text()
    assert md.startswith(
        f"# Sweep report: {sweep}\n\nWARNING: 5 of 6 jobs failed or did not finish (listed at "
        "the end); the table aggregates the jobs that wrote a readable results.json.\n"
    )
    assert "| cfl | 1 | 0 | 50.00 | 50.00 |" in md  # one seed: its value, no "± 0.00"
    tail = md[md.index("## Failed or unfinished jobs") :].splitlines()
    assert tail[:5] == [
        "## Failed or unfinished jobs: 5 of 6",
        "",
        "| job | status | overrides | error |",
        "|---|---|---|---|",
        "| 1_optim.lr=nan | failed | `optim.lr=nan` | RuntimeError: lr is nan \\| inf |",
    ]
    assert tail[5] == f"| 2_seed=2 | unfinished | `seed=2` | {UNFINISHED} |"
    assert [r["variant"] for r in csv.DictReader(paths["csv"].open())] == ["cfl"]


def test_report_of_a_sweep_where_every_job_failed(tmp_path):
    job(tmp_path, "0_a", "- a=1\n", {FAILURE: json.dumps({"error": "ValueError: no"})})
    (tmp_path / "report.csv").write_text("stale")
    paths = write_sweep_report(tmp_path)
    assert set(paths) == {"md"} and not (tmp_path / "report.csv").exists()
    md = paths["md"].read_text()
    assert "No job wrote a readable results.json" in md
    assert "| 0_a | failed | `a=1` | ValueError: no |" in md


def test_report_cli_lists_the_problems(sweep, monkeypatch, capsys):
    from amalgam.report.__main__ import main

    monkeypatch.setattr(sys, "argv", ["amalgam.report", str(sweep)])
    main()
    assert "5 of 6 jobs failed or did not finish" in capsys.readouterr().out
    assert "| 1_optim.lr=nan | failed |" in (sweep / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["amalgam.report", str(sweep / "nothing")])
    with pytest.raises(SystemExit, match=r"no results\.json and no job dir"):
        main()


def job_config(output_dir: Path, mode: RunMode = RunMode.MULTIRUN):
    return OmegaConf.create({"hydra": {"mode": mode, "runtime": {"output_dir": str(output_dir)}}})


def test_a_failed_job_records_its_error_in_its_dir(tmp_path):
    cb = AggregateOnMultirunEnd()
    ret = JobReturn(status=JobStatus.FAILED, _return_value=ValueError("bad value\nmore"))
    cb.on_job_end(job_config(tmp_path), job_return=ret)
    rec = json.loads((tmp_path / FAILURE).read_text())
    assert rec["error"] == "ValueError: bad value" and rec["type"] == "builtins.ValueError"
    # a job started again in its dir drops the last attempt's record
    cb.on_job_start(job_config(tmp_path), task_function=None)
    assert not (tmp_path / FAILURE).exists()
    # a single run (no sweep) and a finished job write none
    cb.on_job_end(job_config(tmp_path, RunMode.RUN), job_return=ret)
    done = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
    cb.on_job_end(job_config(tmp_path), job_return=done)
    assert not (tmp_path / FAILURE).exists()


STUB_APP = '''
"""A Hydra app whose job x=boom raises; the others write a results.json."""
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    if cfg.x == "boom":
        raise RuntimeError("job exploded\\nsecond line")
    res = {
        "variant": f"x={cfg.x}", "seed": 0,
        "tasks": {"a": {"student_acc": 0.5, "teacher_acc": 0.9}},
        "joint": {"student_acc": 0.5, "teacher_ensemble_acc": 0.8},
    }
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.long)])
def test_stub_sweep_with_a_failing_job_writes_its_report(tmp_path, launcher):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(STUB_APP))
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(app),
        "-m",
        "+x=1,boom,2",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}",
        "+hydra.callbacks.sweep_report._target_=amalgam.report.AggregateOnMultirunEnd",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert p.returncode == 1, p.stderr
    assert "job exploded" in p.stderr  # Hydra's own message is still there
    assert p.stderr.count("Error executing job") == 1
    md = (sweep / "report.md").read_text()
    assert "WARNING: 1 of 3 jobs failed" in md
    assert "| 1 | failed | `+x=boom` | RuntimeError: job exploded |" in md
    assert "| x=1 | 1 |" in md and "| x=2 | 1 |" in md
    assert [r["variant"] for r in csv.DictReader((sweep / "report.csv").open())] == ["x=1", "x=2"]


@pytest.mark.slow
def test_cli_sweep_with_a_failing_job_writes_its_report(tiny_teachers, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "amalgam.amalgamate",
        "-m",
        "experiment=tiny",
        "debug=quick",
        "optim.lr=0.001,nan",
        f"hydra.sweep.dir={sweep}",
        f"paths.root_dir={tiny_teachers}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tiny_teachers, env=ENV)
    assert p.returncode != 0
    (failed,) = sweep.glob("*_optim.lr=nan")
    error = json.loads((failed / FAILURE).read_text())["error"]
    assert "optim.lr" in error  # whichever check refuses the value, it names it
    md = (sweep / "report.md").read_text()
    overrides = f"experiment=tiny debug=quick optim.lr=nan paths.root_dir={tiny_teachers}"
    assert f"| {failed.name} | failed | `{overrides}` | {error} |" in md
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [(r["variant"], r["n"]) for r in rows] == [("optim.lr=0.001", "1")]
    # the report CLI rebuilds the same report from the files on disk
    (sweep / "report.md").unlink()
    subprocess.run([sys.executable, "-m", "amalgam.report", str(sweep)], env=ENV, check=True)
    assert (sweep / "report.md").read_text() == md
