"""Sweeps, launchers, DDP, wandb and resume through the real CLI (subprocesses, tiny models)."""

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


def cli(
    root: Path,
    *args: str,
    module: str = "amalgam.amalgamate",
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run the CLI in a session of its own; output goes to files, not pipes, so helpers that
    outlive the run (wandb's service after a SIGKILL) cannot keep the test waiting."""
    # a wandb service started by an earlier in-process test must not be shared by the CLI runs
    env = {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", module, *args]
    if module == "amalgam.amalgamate":
        cmd.append(f"paths.root_dir={root}")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd or root, env=env, stdout=out, stderr=err, start_new_session=True
        )
        rc = proc.wait()
        kill_orphans(proc.pid)
        out.seek(0)
        err.seek(0)
        p = subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def kill_orphans(pid: int) -> None:
    """Kill wandb's service processes left behind by a killed run `pid`, as a cluster would."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"--pid {pid} " in cmdline + " " and "wandb" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def test_multirun_2x2_aggregates_mean_and_std(tiny_teachers, tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "debug=quick",
        "method=kd,cfl",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 4
    assert len({p.parent.name for p in results}) == 4
    runs = [json.loads(p.read_text()) for p in results]
    assert {r["variant"] for r in runs} == {"method=kd", "method=cfl"}
    assert {r["targets"] for r in runs} == {"Concat"}  # the target rule each run used
    rows = {r["variant"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    for variant in ("method=kd", "method=cfl"):
        accs = [100 * r["joint"]["student_acc"] for r in runs if r["variant"] == variant]
        assert rows[variant]["n"] == "2"
        assert float(rows[variant]["joint_student_mean"]) == pytest.approx(
            statistics.fmean(accs), abs=1e-3
        )
        assert float(rows[variant]["joint_student_std"]) == pytest.approx(
            statistics.stdev(accs), abs=1e-3
        )
    md = (sweep / "report.md").read_text()
    assert "target rule, Concat)" in md
    assert "±" in md and "method=kd" in md and (sweep / "report.png").stat().st_size > 1000
    commit = runs[0]["provenance"]["git_commit"] or "unknown"
    assert f"Code: {commit[:12]} (4 jobs)" in md and "WARNING" not in md
    # the report CLI rebuilds the same table
    (sweep / "report.md").unlink()
    cli(tiny_teachers, str(sweep), module="amalgam.report")
    assert (sweep / "report.md").read_text() == md


def test_submitit_local_runs_a_job(tiny_teachers, tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "debug=quick",
        "method=kd",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        f"teacher_cache.dir={tmp_path / 'unused' / 'cache'}",  # a path value in the job's name
    )
    # one directory per job (the path's separators do not nest directories), named in the job
    assert len(list(sweep.glob("*/results.json"))) == 1
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert job.name.startswith("0_") and "unused_cache" in job.name
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert (sweep / "report.md").is_file()


def test_joblib_local_parallel_runs_jobs_in_separate_dirs(tiny_teachers, tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "debug=quick",
        "seed=0,1",
        "hydra/launcher=local_parallel",
        f"hydra.sweep.dir={sweep}",
    )
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert len({r["checkpoint"] for r in runs}) == 2
    assert "| cfl | 2 |" in (sweep / "report.md").read_text()


def test_ddp_cpu_two_processes_same_results_schema(tiny_teachers, tmp_path):
    cli(tiny_teachers, "experiment=tiny", "debug=quick", f"hydra.run.dir={tmp_path / 'one'}")
    cli(
        tiny_teachers,
        "experiment=tiny",
        "debug=quick",
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())

    def schema(d):
        return {
            k: schema(v) if isinstance(v, dict) else type(v).__name__
            for k, v in d.items()
            if k not in ("resumed_from",)
        }

    assert schema(ddp) == schema(one)
    assert one["world_size"] == 1 and ddp["world_size"] == 2
    # 4 batches per epoch per process in both runs: each process saw its own half of the data
    assert ddp["global_step"] == one["global_step"] == 8
    assert 0.3 < ddp["joint"]["student_acc"] <= 1
    assert len(list((tmp_path / "ddp").glob("results.*"))) == 3
    # the final test ran on both ranks, each test image counted once: the same frozen teachers
    # give the same counts and accuracies as in one process
    assert ddp["joint"]["n_test"] == one["joint"]["n_test"]
    assert ddp["joint"]["teacher_ensemble_acc"] == one["joint"]["teacher_ensemble_acc"]
    for name, t in one["tasks"].items():
        assert ddp["tasks"][name]["n_test"] == t["n_test"] > 0
        assert ddp["tasks"][name]["teacher_acc"] == t["teacher_acc"]
    assert ddp["task_confusion"]["teachers"] == one["task_confusion"]["teachers"]


def test_ddp_inside_multirun_is_refused(tiny_teachers, tmp_path):
    p = cli(
        tiny_teachers,
        "-m",
        "experiment=tiny",
        "trainer=ddp_cpu",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 's'}",
        check=False,
    )
    assert p.returncode != 0
    assert "re-run the whole sweep" in p.stderr and "hydra/launcher=slurm" in p.stderr


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.long  # test_tracking's offline sweep reads the same runs back, inside make test
def test_wandb_offline_logs_metrics(tiny_teachers, tmp_path):
    run = tmp_path / "run"
    cli(
        tiny_teachers,
        "experiment=tiny",
        "debug=quick",
        "logger=wandb",
        "logger.wandb.offline=true",
        f"hydra.run.dir={run}",
    )
    (d,) = wandb_runs(run)
    data = b"".join(p.read_bytes() for p in d.glob("*.wandb"))
    for key in (
        b"train/kd",
        b"train/mmd",
        b"train/rec",
        b"val/joint_acc",
        b"test/joint/student_acc",
        b"results",
    ):
        assert key in data, key


@pytest.mark.long  # test_reliability's SIGTERM resume test covers it inside make test
def test_kill_and_resume_matches_uninterrupted_run(tiny_teachers, tmp_path):
    common = [
        "experiment=tiny",
        "trainer.max_epochs=3",
        "logger=wandb",
        "logger.wandb.offline=true",
        "~callbacks.progress",
        "+trainer.enable_progress_bar=false",
    ]
    cli(tiny_teachers, *common, f"hydra.run.dir={tmp_path / 'full'}")
    killed = tmp_path / "killed"
    p = cli(
        tiny_teachers,
        *common,
        f"hydra.run.dir={killed}",
        "+callbacks.kill._target_=killer.KillAtStep",
        "+callbacks.kill.step=16",
        check=False,
    )
    assert p.returncode == -9, "the run was meant to be killed"
    assert (killed / "checkpoints" / "last.ckpt").is_file()
    assert not (killed / "results.json").exists()
    cli(tiny_teachers, *common, f"hydra.run.dir={killed}", "ckpt_path=last")
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["global_step"] == full["global_step"] and resumed["epochs"] == 3
    for task in full["tasks"]:
        assert resumed["tasks"][task]["student_acc"] == pytest.approx(
            full["tasks"][task]["student_acc"], abs=1e-6
        )
    assert resumed["joint"]["student_acc"] == pytest.approx(full["joint"]["student_acc"], abs=1e-6)
    # the resumed run continued the same wandb run id
    ids = {d.name.rsplit("-", 1)[-1] for d in wandb_runs(killed)}
    assert len(wandb_runs(killed)) == 2 and len(ids) == 1
