"""A run dir belongs to one run: a second process is refused, a finished run is never
overwritten, a resume with another config is refused or needs +resume_changes=allow, a run that
would not fit on the disk is refused; train_teacher writes where teacher.weights says."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import amalgam
from amalgam import files, rundir
from amalgam.errors import ConfigError
from amalgam.launch import checkpoint_bytes, config_changes
from conftest import make_cfg
from test_scaleout import TESTS, cli

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]
FAST = ["experiment=tiny", "debug=fast_dev_run", *QUIET]
HOLD = """
import sys, time
from amalgam import files, rundir
rundir.claim(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def holder(d: Path) -> subprocess.Popen:
    """Another process that holds run dir `d` (until killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


# ------------------------------------------------------------------------------ the lock


def test_a_second_process_is_refused_naming_the_dir_and_the_holder(tmp_path):
    d = tmp_path / "run"
    p = holder(d)
    try:
        with pytest.raises(ConfigError) as e:
            rundir.claim(d)
        msg = str(e.value)
        assert f"run dir '{d}' is in use by another run (pid {p.pid} on" in msg
        assert "hydra.run.dir=<new dir>" in msg
        assert not rundir.holds(d)
    finally:
        p.kill()
        p.wait()


def test_a_killed_holder_never_blocks_the_dir(tmp_path, caplog):
    d = tmp_path / "run"
    p = holder(d)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((d / rundir.OWNER).read_text())["pid"] == p.pid  # left behind
    with caplog.at_level("WARNING", logger="amalgam"):
        rundir.claim(d)
    try:
        assert rundir.holds(d)
        assert f"pid {p.pid}" in caplog.text and "that process is gone" in caplog.text
        assert json.loads((d / rundir.OWNER).read_text())["pid"] == os.getpid()
    finally:
        rundir.release(d)
    assert not (d / rundir.OWNER).exists() and not rundir.holds(d)
    rundir.claim(d)  # free again, and claimed twice by one process is one claim
    rundir.claim(d)
    rundir.release(d)
    assert not rundir.holds(d)


def test_ddp_children_leave_the_lock_to_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not rundir.is_rank_zero()
    rundir.claim(tmp_path / "run")
    assert not rundir.holds(tmp_path / "run")


@pytest.mark.slow
def test_two_cli_runs_in_one_run_dir(tiny_teachers, tmp_path):
    """The first run ends as if alone; the second is refused at start and writes nothing."""
    d = tmp_path / "run"
    gate = tmp_path / "gate"  # the first run waits at its start until the second is done
    args = ["experiment=tiny", *QUIET, f"hydra.run.dir={d}", f"paths.root_dir={tiny_teachers}"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amalgam.amalgamate",
            *args,
            "+callbacks.gate._target_=gate.WaitForFile",
            f"+callbacks.gate.path={gate}",
        ],
        stdout=log,
        stderr=log,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not (d / rundir.OWNER).exists() and time.time() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        second = cli(tiny_teachers, *args, check=False)
    finally:
        gate.touch()
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 2
    assert f"run dir '{d}' is in use by another run (pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    res = json.loads((d / "results.json").read_text())
    with (d / "csv" / "metrics.csv").open() as f:
        train = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    # every step of the one run, from its first, once each: no rows lost or added by another
    assert train[0] == 0 and train == sorted(set(train)) and train[-1] < res["global_step"]
    assert not (d / rundir.OWNER).exists()  # released at the end


# ------------------------------------------------------------------------------ finished runs


@pytest.fixture(scope="module")
def finished(tiny_teachers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    amalgam.Amalgamation.from_config(
        amalgam.compose(FAST, root=tiny_teachers, output_dir=out)
    ).fit()
    return out


def test_a_new_run_never_overwrites_a_finished_one(finished, tiny_teachers):
    before = {p: p.read_bytes() for p in [finished / "results.json", *finished.rglob("*.ckpt")]}
    cfg = amalgam.compose(FAST, root=tiny_teachers, output_dir=finished)
    with pytest.raises(ConfigError) as e:
        amalgam.Amalgamation.from_config(cfg)
    msg = str(e.value)
    assert f"run dir '{finished}' already holds a run (results.json, checkpoints/" in msg
    assert "ckpt_path=last" in msg
    assert not rundir.holds(finished)
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_the_cli_refuses_before_hydra_rewrites_the_stored_config(finished, tiny_teachers):
    stored = (finished / "results.json").read_bytes()
    p = cli(tiny_teachers, *FAST, f"hydra.run.dir={finished}", check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (finished / ".hydra").exists()  # the API run had none; Hydra wrote none
    assert (finished / "results.json").read_bytes() == stored


def test_a_resume_of_its_own_checkpoint_is_not_a_new_run(tmp_path):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
    rundir.refuse_finished(d, d / "checkpoints" / "last.ckpt")  # continues that run
    with pytest.raises(ConfigError, match="a resume of another run's checkpoint would overwrite"):
        rundir.refuse_finished(d, tmp_path / "other" / "last.ckpt")
    rundir.refuse_finished(tmp_path / "empty", None)


# ------------------------------------------------------------------------------ resume checks


def resume(tiny_teachers, finished, out, *overrides):
    ckpt = finished / "checkpoints" / "final.ckpt"
    cfg = make_cfg("amalgamate", [*FAST, f"ckpt_path={ckpt}", *overrides], tiny_teachers, out)
    return amalgam.Amalgamation.from_config(cfg)


def test_resume_with_changed_hyper_parameters_lists_them(finished, tiny_teachers, tmp_path):
    with pytest.raises(ConfigError) as e:
        resume(tiny_teachers, finished, tmp_path / "a", "optim.lr=0.002", "method.weights.mmd=3")
    msg = str(e.value)
    assert "was trained with another config; changed: method.weights.mmd: 10.0 -> 3" in msg
    assert "optim.lr: 0.001 -> 0.002" in msg and "+resume_changes=allow" in msg
    am = resume(tiny_teachers, finished, tmp_path / "b", "optim.lr=0.002",
                "+resume_changes=allow")  # fmt: skip
    assert am.module is not None
    rundir.release(tmp_path / "b")
    resume(tiny_teachers, finished, tmp_path / "c")  # the same config: nothing to allow
    rundir.release(tmp_path / "c")


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("student.arch=test_resnet", "its tensors do not fit this run's student and method"),
        ("method=kd", "its tensors do not fit"),
        ("optim=sgd", "its optimizer state belongs to another optimizer"),
    ],
)
def test_resume_that_cannot_load_is_refused_even_when_allowed(
    finished, tiny_teachers, tmp_path, override, why
):
    with pytest.raises(ConfigError) as e:
        resume(tiny_teachers, finished, tmp_path / "r", override, "+resume_changes=allow")
    msg = str(e.value)
    assert "cannot be resumed with this config: " + why in msg
    assert "ckpt_path=null" in msg
    assert not rundir.holds(tmp_path / "r")


def test_config_changes_ignore_paths_and_compare_leaves():
    old = {"paths": {"output_dir": "/a"}, "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "seed": 1}
    new = {"paths": {"output_dir": "/b"}, "optim": {"lr": 1e-3, "betas": [0.9, 0.9]}, "seed": 2}
    new["teacher_set"] = {"a": {"weights": "/moved.safetensors"}}
    old["teacher_set"] = {"a": {"weights": "/orig.safetensors"}}
    assert config_changes(old, new) == [("optim.betas", [0.9, 0.99], [0.9, 0.9]), ("seed", 1, 2)]


# ------------------------------------------------------------------------------ disk space


def test_a_run_that_would_fill_the_disk_is_refused(tiny_teachers, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 2**20)
    )  # 3 MB free
    cfg = amalgam.compose(FAST, root=tiny_teachers, output_dir=tmp_path / "full")
    with pytest.raises(ConfigError) as e:
        amalgam.Amalgamation.from_config(cfg)
    msg = str(e.value)
    assert "has 3 MB free, but this run's checkpoints need about" in msg
    assert "hydra.run.dir=<dir on a disk with room>" in msg
    assert not rundir.holds(tmp_path / "full")


def test_checkpoint_bytes_counts_weights_and_adam_state():
    from torch import nn

    m = nn.Linear(10, 10)  # 110 float32 = 440 bytes; x3 (Adam), x4 files
    assert checkpoint_bytes(m) == 440 * 3 * 4


# ------------------------------------------------------------------------------ teacher files


@pytest.mark.slow
def test_train_teacher_writes_the_path_given_and_never_overwrites(tiny_teachers, tmp_path):
    from amalgam.train_teacher import train_teacher

    target = tmp_path / "zoo" / "my_teacher.safetensors"
    args = ["teacher=tiny_a", "experiment=tiny_teachers", "logger=none", "callbacks=none",
            f"teacher.weights={target}", "trainer.max_epochs=1"]  # fmt: skip
    cfg = make_cfg("train_teacher", args, tmp_path, tmp_path / "o1")
    assert train_teacher(cfg) == target
    assert target.is_file() and target.with_suffix(".json").is_file()
    assert not (tmp_path / "zoo" / "tiny_a.safetensors").exists()
    first = target.read_bytes()
    with pytest.raises(ConfigError) as e:
        train_teacher(make_cfg("train_teacher", args, tmp_path, tmp_path / "o2"))
    assert f"teacher.weights='{target}': a teacher already exists there" in str(e.value)
    assert "overwrite=true" in str(e.value) and target.read_bytes() == first
    again = make_cfg(
        "train_teacher", [*args, "overwrite=true", "seed=3"], tmp_path, tmp_path / "o3"
    )
    assert train_teacher(again) == target and target.read_bytes() != first
    with pytest.raises(ConfigError, match=r"give a path ending in '\.safetensors'"):
        train_teacher(make_cfg("train_teacher", [*args[:-2], "teacher.weights=x.pt"], tmp_path))


# ------------------------------------------------------------------------------ before Hydra


@pytest.mark.parametrize("mode", ["run", pytest.param("multirun", marks=pytest.mark.long)])
def test_output_dir_under_a_file_is_refused_before_hydra_touches_it(tmp_path, mode):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    if mode == "run":
        args, key, d = [f"hydra.run.dir={blocker}/run"], "hydra.run.dir", f"{blocker}/run"
    else:
        d = f"{blocker}/sweep"
        args, key = ["-m", "seed=0,1", f"hydra.sweep.dir={d}"], "hydra.sweep.dir"
    p = cli(tmp_path, *args, "experiment=tiny", check=False)
    assert p.returncode == 2, p.stderr
    assert f"Error: {key}='{d}' is not writable: '{blocker}' is a file" in p.stderr
    assert "Traceback" not in p.stderr and "NotADirectoryError" not in p.stderr


def test_read_only_output_dir_is_refused_before_hydra_touches_it(tmp_path, monkeypatch, capsys):
    import tempfile

    from omegaconf import OmegaConf

    from amalgam.launch import Preflight

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **kw):
        if Path(str(dir)) == ro:
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root writes anywhere: simulate the mount
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(ro / "run")}}, "ckpt_path": None})
    with pytest.raises(SystemExit) as e:
        Preflight().on_run_start(cfg, config_name="amalgamate")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"hydra.run.dir='{ro}/run' is not writable (PermissionError: Permission denied" in err
    assert not (ro / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; skipped where mounting is not allowed)."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_mid_run_names_the_file_and_keeps_the_last_checkpoint(small_disk):
    import torch

    from amalgam.checkpoint_io import AtomicCheckpointIO
    from amalgam.files import atomic_write_text

    io, last = AtomicCheckpointIO(), small_disk / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(100_000)}, last)  # 0.4 MB: fits
    with pytest.raises(files.DiskFullError) as e:
        io.save_checkpoint({"w": torch.zeros(1_000_000)}, last)  # 4 MB: does not
    msg = str(e.value)
    assert msg.startswith(f"writing '{last}' failed: the disk is full ('{last.parent}' has ")
    assert "hydra.run.dir=<dir on a disk with room>" in msg and "ckpt_path=last" in msg
    assert "inline_container" not in msg and "unexpected pos" not in msg
    assert torch.equal(torch.load(last, weights_only=True)["w"], torch.ones(100_000))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temp left
    with pytest.raises(files.DiskFullError, match=r"results\.json' failed: the disk is full"):
        atomic_write_text(small_disk / "results.json", "x" * 3_000_000)
    assert not (small_disk / "results.json").exists()


def test_disk_full_is_told_from_other_write_errors(tmp_path):
    import errno

    assert files.disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert files.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert not files.disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")
    assert not files.disk_full(torch_says, tmp_path / "x.ckpt", need_bytes=1)  # room here
    assert not files.disk_full(RuntimeError("CUDA error"), tmp_path)
