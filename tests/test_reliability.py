"""Crash safety (atomic files, SIGKILL), preemption (SIGTERM/SIGUSR1), the NaN guard, and a
soak run for memory growth (docs/RELIABILITY.md)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amalgam import files, report
from amalgam.checkpoint_io import AtomicCheckpointIO
from amalgam.data.datamodule import EpochShuffle
from amalgam.data.loaders import ResumableLoader, WorkerInit
from amalgam.errors import ConfigError
from amalgam.files import atomic_open, remove_stale_temps
from amalgam.nan_guard import NanGuard, NonFiniteError, all_finite
from amalgam.preemption import Preempted, Preemption
from conftest import make_cfg
from signals import SignalAtStep

TESTS = Path(__file__).parent
QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


def temps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


# ------------------------------------------------------------------------------ atomic files


def payloads() -> tuple[dict, dict]:
    """Two checkpoints of different sizes (8 and 12 MB): a kill can land inside a write."""
    g = torch.Generator().manual_seed(0)
    a = {"which": 0, "w": torch.randn(2_000_000, generator=g)}
    b = {"which": 1, "w": torch.randn(3_000_000, generator=g), "step": torch.arange(7)}
    return a, b


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x
    )


def classify(path: Path, a: dict, b: dict) -> str:
    """'a' or 'b' when the file holds one of the payloads, else 'torn'."""
    try:
        got = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return "torn"
    return "a" if same(got, a) else "b" if same(got, b) else "torn"


def save_loop(mode: str, path: Path, ready: Path, a: dict, b: dict) -> None:
    """The child's loop: a, b, a, ... into `path` until killed. `plain` writes in place."""
    ckpt_io = AtomicCheckpointIO()
    blobs = []
    for p in (a, b):
        buf = io.BytesIO()
        torch.save(p, buf)
        blobs.append(buf.getvalue())
    i = 0
    while True:
        if mode == "atomic":
            ckpt_io.save_checkpoint((a, b)[i % 2], path)
        else:  # what a non-atomic writer does: truncate, then write the new bytes
            with open(path, "wb") as f:
                blob = blobs[i % 2]
                for k in range(0, len(blob), 1 << 16):
                    f.write(blob[k : k + (1 << 16)])
        i += 1
        if i == 2:
            ready.touch()


def kill_at_random(mode: str, path: Path, trials: int, seed: int) -> list[tuple[str, int]]:
    """Fork a saving child `trials` times, SIGKILL it at a random moment; (state, temps left)."""
    a, b = payloads()  # made here: the child only serialises (no compute after fork)
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        ready = path.with_name("ready")
        ready.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:  # the child
            try:
                save_loop(mode, path, ready, a, b)
            finally:
                os._exit(1)
        deadline = time.time() + 60
        while not ready.exists():
            assert time.time() < deadline, "the save loop never got going"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        out.append((classify(path, a, b), len(temps(path.parent))))
    return out


@pytest.mark.slow
def test_sigkill_never_tears_an_atomic_checkpoint_but_tears_a_plain_write(tmp_path):
    (tmp_path / "atomic").mkdir()
    (tmp_path / "plain").mkdir()
    atomic = kill_at_random("atomic", tmp_path / "atomic" / "last.ckpt", trials=12, seed=0)
    plain = kill_at_random("plain", tmp_path / "plain" / "last.ckpt", trials=4, seed=1)
    print(f"atomic: {atomic}\nplain: {plain}")
    # the atomic file always loads (weights_only) and is exactly one of the two payloads ...
    assert all(state in ("a", "b") for state, _ in atomic), atomic
    # ... though kills did land inside saves (they left their temporary file behind)
    assert any(n for _, n in atomic), "no kill landed inside a save: the test proves nothing"
    # the same kills tear a file written in place: the test can fail
    assert any(state == "torn" for state, _ in plain), plain
    # the next save on this host removes the dead writers' temporary files
    a, _ = payloads()
    AtomicCheckpointIO().save_checkpoint(a, tmp_path / "atomic" / "last.ckpt")
    assert temps(tmp_path / "atomic") == []
    assert classify(tmp_path / "atomic" / "last.ckpt", *payloads()) == "a"


def test_atomic_open_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}')
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write('{"new": ')
        raise RuntimeError("crash in the middle of a write")
    assert path.read_text() == '{"old": 1}' and temps(tmp_path) == []
    with atomic_open(path, "w") as f:
        f.write('{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_stale_temps_of_dead_writers_only_are_removed(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = files.HOST
    stale = tmp_path / f".last.ckpt.{host}.{dead.pid}.abc123.tmp"
    live = tmp_path / f".last.ckpt.{host}.{os.getppid()}.abc123.tmp"
    other_host = tmp_path / f".last.ckpt.elsewhere.{dead.pid}.abc123.tmp"
    other_file = tmp_path / f".epoch_000.ckpt.{host}.{dead.pid}.abc123.tmp"
    for p in (stale, live, other_host, other_file):
        p.write_bytes(b"partial")
    assert remove_stale_temps(path) == [stale]
    assert live.exists() and other_host.exists() and other_file.exists()


def test_results_files_are_written_atomically(tmp_path, monkeypatch):
    results = {
        "method": "cfl",
        "seed": 0,
        "tasks": {"a": {"classes": ["x", "y"], "teacher_acc": 0.9, "student_acc": 0.8}},
        "joint": {"student_acc": 0.8, "teacher_ensemble_acc": 0.9},
    }
    paths = report.write(results, tmp_path)
    assert json.loads(paths["json"].read_text()) == results
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json",
        "results.md",
        "results.png",
    ]
    # a crash while the plot is drawn leaves the previous results.png, and no temporary file
    before = paths["png"].read_bytes()
    import matplotlib.figure

    def crash(self, *args, **kwargs):
        args[0].write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write(results | {"seed": 1}, tmp_path)
    assert paths["png"].read_bytes() == before and temps(tmp_path) == []
    assert json.loads(paths["json"].read_text())["seed"] == 1  # written before the plot


def test_trainer_configs_write_checkpoints_through_the_atomic_io(tmp_path):
    import hydra

    for name in ("default", "cpu", "ddp_cpu", "gpu", "ddp", "slurm"):
        cfg = make_cfg("amalgamate", [f"trainer={name}"], tmp_path)
        targets = [p._target_ for p in cfg.trainer.plugins]
        assert "amalgam.checkpoint_io.AtomicCheckpointIO" in targets, name
    assert "lightning.pytorch.plugins.environments.SLURMEnvironment" in targets  # slurm kept it
    for name in ("cpu", "ddp_cpu"):  # instantiated the CLI's way (no GPU here for the others)
        cfg = make_cfg("amalgamate", [f"trainer={name}"], tmp_path)
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO), name


# ------------------------------------------------------------------------------ preemption


class Tiny(L.LightningModule):
    """y = Wx on 64 random points, 8 steps per epoch: a Lightning run in about a second."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def tiny_trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    return L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[*callbacks, ckpt],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_preemption_saves_chains_the_previous_handler_and_restores_it(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    seen = []

    def previous(signum, frame):  # e.g. submitit's or the user's handler
        seen.append((signum, last.is_file()))

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        trainer = tiny_trainer(tmp_path, [Preemption(), SignalAtStep(3, "SIGUSR1")])
        with pytest.raises(Preempted) as err:
            trainer.fit(Tiny())
        assert err.value.code == 128 + signal.SIGUSR1 and err.value.path == str(last)
        # saved at the batch end after the signal, then the previous handler ran, once
        assert torch.load(last, weights_only=True)["global_step"] == 4
        assert seen == [(signal.SIGUSR1, True)]
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        # the resumed fit ends where an uninterrupted one does
        resumed = tiny_trainer(tmp_path, [Preemption()])
        resumed.fit(Tiny(), ckpt_path=str(last))
        assert resumed.global_step == 16
        assert not (tmp_path / "checkpoints" / "last-v1.ckpt").exists()
        assert torch.load(last, weights_only=True)["global_step"] == 16
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_preemption_leaves_sigusr1_to_lightning_slurm_requeue():
    env = SLURMEnvironment(auto_requeue=True)
    trainer = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env))
    p = Preemption()
    p.on_fit_start(trainer, None)
    assert signal.SIGUSR1 not in p._before and signal.SIGTERM in p._before
    off = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=SLURMEnvironment(False)))
    p.on_fit_start(off, None)  # conf/trainer/slurm.yaml: Lightning's requeue off
    assert signal.SIGUSR1 in p._before
    with pytest.raises(ConfigError, match="SIGTERM"):
        Preemption(signals=["SIGNOPE"])


class Dropping(L.LightningModule):
    """A dropout MLP on the numbers 0..47 (6 batches per epoch) that records its batches: the
    data order and the random draws both show in its final weights. Its LR schedule reads
    `estimated_stepping_batches`, as amalgam's does (Lightning then sets up the training data
    before it restores a checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, idx):
        (x,) = batch
        self.seen.append(x.flatten().long().tolist())
        return (self.net(x / 48) - 1).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def numbers(loader: type[DataLoader], workers: int = 0) -> DataLoader:
    """The amalgam training loader's setup: an epoch-seeded shuffle, persistent workers."""
    return loader(
        TensorDataset(torch.arange(48.0)[:, None]),
        batch_size=8,
        sampler=EpochShuffle(48, seed=0),
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=WorkerInit() if workers else None,
    )


def fit_dropping(tmp_path: Path, loader: type[DataLoader], workers: int, stop: int | None):
    """(batches, state dict) of 2 epochs of `Dropping`; with `stop`: SIGTERM at that global
    step, `last.ckpt` saved at the next batch end, and a resume from it in a fresh process
    state (seeded again, new module and loader), as `ckpt_path=last` does."""
    L.seed_everything(0)
    model = Dropping()
    if stop is None:
        tiny_trainer(tmp_path, []).fit(model, numbers(loader, workers))
        return model.seen, model.state_dict()
    with pytest.raises(Preempted):
        tiny_trainer(tmp_path, [Preemption(), SignalAtStep(stop)]).fit(
            model, numbers(loader, workers)
        )
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert saved == stop + 1
    L.seed_everything(0)
    resumed = Dropping()
    tiny_trainer(tmp_path, [Preemption()]).fit(
        resumed, numbers(loader, workers), ckpt_path=str(last)
    )
    return model.seen[:saved] + resumed.seen, resumed.state_dict()


@pytest.mark.parametrize(
    ("stop", "workers"),
    [(3, 0), (8, 0), (8, 2)],
    ids=["mid-epoch-0", "mid-epoch-1", "mid-epoch-1-persistent-workers"],
)
def test_sigterm_resume_mid_epoch_trains_on_the_same_batches_and_weights(tmp_path, stop, workers):
    """A SIGTERM mid-epoch and a resume end with the uninterrupted run's weights, bit for bit:
    the resumed epoch goes on with the batches the interrupted one had left (ResumableLoader),
    and the random draws (dropout) go on from the checkpoint's random states (Preemption)."""
    full, want = fit_dropping(tmp_path / "full", ResumableLoader, workers, stop=None)
    got, weights = fit_dropping(tmp_path / "stopped", ResumableLoader, workers, stop)
    assert len(full) == len(got) == 12
    assert got == full
    assert weights.keys() == want.keys()
    assert all(torch.equal(weights[k], want[k]) for k in want)


def test_a_plain_dataloader_resumes_mid_epoch_at_the_epoch_start(tmp_path):
    """What ResumableLoader fixes: Lightning restarts a plain DataLoader's epoch at its first
    batch and runs the number of batches it had left, so the resumed epoch trains on its first
    batches twice and never on its last ones (the test above can fail)."""
    full, _ = fit_dropping(tmp_path / "full", DataLoader, 0, stop=None)
    got, _ = fit_dropping(tmp_path / "stopped", DataLoader, 0, stop=3)
    assert len(got) == len(full) == 12
    assert got[4:6] == full[:2] != full[4:6]  # after the resume: the epoch's start again


def test_resumable_loader_skips_the_indices_of_the_batches_it_had_handed_out():
    """A resumed epoch starts at the checkpoint's batch without loading the skipped images; an
    epoch other than the checkpoint's (resumed at an epoch end) is read in full."""
    loads = []

    class Counted(TensorDataset):
        def __getitem__(self, i):
            loads.append(i)
            return super().__getitem__(i)

    def loader() -> ResumableLoader:
        ds = Counted(torch.arange(48))
        return ResumableLoader(ds, batch_size=8, sampler=EpochShuffle(48, seed=0))

    first = loader()
    first.sampler.set_epoch(1)
    it = iter(first)
    epoch_1 = [next(it)[0] for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does before the epoch's first batch
    it = iter(resumed)
    loads.clear()
    rest = [next(it)[0]]
    assert resumed.state_dict() == {"epoch": 1, "batches": 4}  # a second stop counts on
    rest += [b[0] for b in it]
    assert len(rest) == 3 and len(loads) == 8 * 3  # the first 3 batches were never loaded
    full = loader()
    full.sampler.set_epoch(1)
    assert [b[0].tolist() for b in full] == [b.tolist() for b in epoch_1 + rest]
    again = loader()
    again.load_state_dict({"epoch": 0, "batches": 6})  # saved at epoch 0's end
    again.sampler.set_epoch(1)
    assert len(list(again)) == 6


def start(root: Path, *args: str, out: Path) -> subprocess.Popen:
    """`python -m amalgam.amalgamate` in a session of its own; output to files, not pipes."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "amalgam.amalgamate", *args, f"paths.root_dir={root}"]
    log = open(out, "w")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def run(root: Path, *args: str, out: Path, timeout: float = 600) -> int:
    p = start(root, *args, out=out)
    try:
        return p.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


# 2 epochs of 6 steps, small val and test sets: ~15 s per run on a free CPU
RUN = [
    "experiment=tiny",
    "debug=quick",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "data.test_limit=64",
    "trainer.log_every_n_steps=1",
    *QUIET,
]


def weights_sha256(run_dir: Path) -> str:
    """SHA-256 of the weights in the run's final.ckpt (student and method; keys and values)."""
    sd = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tiny_teachers, tmp_path_factory) -> dict:
    """results.json of the uninterrupted run, plus its final weights' hash (`weights_sha256`)."""
    d = tmp_path_factory.mktemp("full")
    rc = run(tiny_teachers, *RUN, f"hydra.run.dir={d}", out=d.with_suffix(".log"))
    assert rc == 0, d.with_suffix(".log").read_text()[-3000:]
    return json.loads((d / "results.json").read_text()) | {"weights_sha256": weights_sha256(d)}


def resume_and_compare(root: Path, d: Path, full: dict, *args: str) -> dict:
    """Resume the run in `d` (ckpt_path=last); it must end where the uninterrupted one did:
    same step and epochs, the same accuracies and bit-identical final weights."""
    log = d.with_name(d.name + "_resume.log")
    rc = run(root, *RUN, f"hydra.run.dir={d}", "ckpt_path=last", *args, out=log)
    assert rc == 0, log.read_text()[-3000:]
    resumed = json.loads((d / "results.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["global_step"] == full["global_step"] == 12
    assert resumed["epochs"] == full["epochs"] == 2
    assert resumed["joint"] == full["joint"]
    assert {t: r["student_acc"] for t, r in resumed["tasks"].items()} == {
        t: r["student_acc"] for t, r in full["tasks"].items()
    }
    assert weights_sha256(d) == full["weights_sha256"]
    assert sorted(p.name for p in (d / "checkpoints").glob("*.ckpt")) == [
        "epoch_001.ckpt",
        "final.ckpt",
        "last.ckpt",
    ]
    return resumed


def signal_at_step_2(
    root: Path,
    run_args: list[str],
    d: Path,
    sig: signal.Signals,
    deadline_s: float,
    group: bool = False,
) -> tuple[int, str]:
    """Start a run in `d` that marks (and slows) step 2, send `sig` to its main process (with
    `group`: to every process of the run, as SLURM does) once the mark exists, and return its
    exit status and log."""
    marker = d.with_name(d.name + "_training")
    args = [
        "+callbacks.mark._target_=signals.MarkAndSlow",
        "+callbacks.mark.step=2",
        f"+callbacks.mark.path={marker}",
    ]
    log = d.with_name(d.name + "_preempted.log")
    p = start(root, *run_args, f"hydra.run.dir={d}", *args, out=log)
    try:
        deadline = time.time() + deadline_s
        while not marker.exists():
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "training never reached step 2"
            time.sleep(0.05)
        if group:
            os.killpg(p.pid, sig)
        else:
            os.kill(p.pid, sig)
        rc = p.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    return rc, log.read_text()


def train_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.csv's rows that carry a training loss."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_stops_and_resumes_to_the_uninterrupted_weights(
    tiny_teachers, tmp_path, uninterrupted
):
    """SIGTERM at step 3 (mid-epoch 0), resume: the uninterrupted run's step, accuracies and
    final weights (the resumed epoch goes on with the batches the interrupted one had left)."""
    d = tmp_path / "run"
    log = tmp_path / "preempted.log"
    args = ["+callbacks.sig._target_=signals.SignalAtStep", "+callbacks.sig.step=3"]
    rc = run(tiny_teachers, *RUN, f"hydra.run.dir={d}", *args, out=log)
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "SIGTERM: saved" in text and "Resume with ckpt_path=last" in text
    ckpt = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # the batch end after the signal, mid-epoch 0
    assert not (d / "results.json").exists()  # an unfinished run reports nothing
    before = train_steps(d)  # the rows logged before the signal's batch end
    assert before == [0, 1, 2]
    resume_and_compare(tiny_teachers, d, uninterrupted)
    after = train_steps(d)  # kept, and the resumed run (steps 4..11) appended after them
    assert after == [0, 1, 2, *range(4, 12)]


@pytest.mark.slow
@pytest.mark.long  # SIGTERM's test covers the resume inside make test
def test_sigterm_in_epoch_1_with_loader_workers_resumes_to_the_uninterrupted_weights(
    tiny_teachers, tmp_path, uninterrupted
):
    """Persistent loader workers and a SIGTERM in the second epoch: the resumed run ends with
    the uninterrupted weights. (A DataLoader with workers draws its indices when Lightning makes
    its iterator, before set_epoch: a resumed run read epoch 0's order in its first epoch.)"""
    d = tmp_path / "run"
    workers = ["data.num_workers=2", "data.persistent_workers=true"]
    args = ["+callbacks.sig._target_=signals.SignalAtStep", "+callbacks.sig.step=8"]
    log = tmp_path / "preempted.log"
    rc = run(tiny_teachers, *RUN, *workers, f"hydra.run.dir={d}", *args, out=log)
    assert rc == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    resume_and_compare(tiny_teachers, d, uninterrupted, *workers)


@pytest.mark.slow
@pytest.mark.long  # SIGTERM's test covers the same path inside make test
def test_sigusr1_from_outside_saves_and_resumes(tiny_teachers, tmp_path, uninterrupted):
    d = tmp_path / "run"
    # as SLURM's --signal=USR1@<s> does before the time limit
    rc, text = signal_at_step_2(tiny_teachers, RUN, d, signal.SIGUSR1, deadline_s=300)
    assert rc == 128 + signal.SIGUSR1, text[-3000:]
    step = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 < step < 12
    assert not (d / "results.json").exists()
    resume_and_compare(tiny_teachers, d, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(
    tiny_teachers, tmp_path
):
    """SLURM's preemption and scancel signal every process of the run. A torch DataLoader
    worker dies on a SIGTERM that its parent did not send, and the main process then raised
    "DataLoader worker ... is killed by signal" mid-step: exit 1 and no last.ckpt. The workers
    now leave the signal to the main process, which saves and stops as for a SIGTERM of its own;
    no worker outlives the run."""
    d = tmp_path / "run"
    workers = [*RUN, "data.num_workers=2", "data.persistent_workers=true"]
    rc, text = signal_at_step_2(tiny_teachers, workers, d, signal.SIGTERM, 300, group=True)
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "is killed by signal" not in text and "SIGTERM: saved" in text
    step = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 < step < 12
    assert not (d / "results.json").exists()
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={d}"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout  # the workers exited with the run


def test_worker_init_takes_preemption_signals_only_from_the_parent(tmp_path):
    """A process running WorkerInit survives SIGTERM / SIGUSR1 from a stranger, and exits 0 on a
    SIGTERM from its parent (the DataLoader's shutdown), as torch's own worker handler does."""
    script = (
        "import os, signal, sys, time\n"
        "from amalgam.data.loaders import WorkerInit\n"
        "def child():\n"
        "    WorkerInit()(0)\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    time.sleep(60)\n"
        "    os._exit(3)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    child()\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.01)\n"
        "print(pid, flush=True)\n"
        "sys.stdin.readline()  # the test has signalled the child as a stranger\n"
        "time.sleep(0.5)\n"
        "alive = os.waitpid(pid, os.WNOHANG) == (0, 0)\n"
        "os.kill(pid, signal.SIGTERM)  # now from the parent\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(alive, os.waitstatus_to_exitcode(status), flush=True)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "ready")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(p.stdout.readline())
        os.kill(child, signal.SIGTERM)
        os.kill(child, signal.SIGUSR1)
        out, _ = p.communicate("go\n", timeout=30)
    finally:
        p.kill()
    assert out.split() == ["True", "0"]


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_both_ddp_ranks_at_the_same_step(
    tiny_teachers, tmp_path, uninterrupted
):
    """DDP on CPU (2 processes): only rank 0 gets SIGTERM; the reduced flag stops rank 1 at the
    same batch end, the checkpoint is written once, and the DDP resume ends at the same step."""
    d = tmp_path / "run"
    ddp = [*RUN, "trainer=ddp_cpu"]
    # to rank 0 only (Lightning started rank 1 as a child)
    rc, text = signal_at_step_2(tiny_teachers, ddp, d, signal.SIGTERM, deadline_s=400)
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert text.count("SIGTERM: saved") == 1  # rank 0 reports (and writes) once
    step = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 < step < 12
    assert not (d / "results.json").exists()
    rc = run(tiny_teachers, *ddp, f"hydra.run.dir={d}", "ckpt_path=last", out=tmp_path / "r.log")
    assert rc == 0, (tmp_path / "r.log").read_text()[-3000:]
    resumed = json.loads((d / "results.json").read_text())
    assert resumed["world_size"] == 2 and resumed["global_step"] == uninterrupted["global_step"]


# ------------------------------------------------------------------------------ NaN guard


# the tiny amalgamation in 2 steps per epoch, for the NaN guard's runs (tests/nan_inject.py)
NAN_RUN = [
    "experiment=tiny",
    "debug=quick",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "data.test_limit=32",
    "logger=csv",
]


def nan_cfg(root: Path, out: Path, action: str):
    """2 epochs of 2 steps; the 'mmd' term is NaN at global step 3 (the 2nd step of epoch 1),
    after last.ckpt was written at the end of epoch 0 (global step 2)."""
    return make_cfg(
        "amalgamate",
        [
            *NAN_RUN,
            f"callbacks.nan_guard.action={action}",
            "+callbacks.inject._target_=nan_inject.InjectNaN",
            "+callbacks.inject.step=3",
            "+callbacks.inject.term=mmd",
            *QUIET,
        ],
        root,
        out,
    )


def finite_weights(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    return ckpt


@pytest.mark.slow
def test_nan_stop_names_the_term_and_step_and_keeps_the_last_good_checkpoint(
    tiny_teachers, tmp_path
):
    from amalgam.amalgamate import amalgamate

    with pytest.raises(NonFiniteError) as err:
        amalgamate(nan_cfg(tiny_teachers, tmp_path / "run", "stop"))
    msg = str(err.value)
    assert "global step 3" in msg and "mmd=nan" in msg and "gradients non-finite" in msg
    assert "kd=" in msg  # the finite terms are shown too
    assert "last.ckpt" in msg and "nan_guard.action=skip" in msg
    assert msg.endswith(  # the data was checked and found finite, and a checkpoint exists
        "Cause: the optimisation (the batch's images, every model's normalised inputs and the "
        "teachers' outputs are finite). Fix: start afresh with a lower optim.lr (a resume "
        "restores the checkpoint's optimizer, its learning rate included), or check "
        "method.weights; or resume with ckpt_path=last and callbacks.nan_guard.action=skip to "
        "drop such steps"
    )
    ckpt = finite_weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 < 3
    assert not (tmp_path / "run" / "checkpoints" / "final.ckpt").exists()
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_nan_skip_drops_one_step_and_finishes_finite(tiny_teachers, tmp_path):
    from amalgam.amalgamate import amalgamate

    res = amalgamate(nan_cfg(tiny_teachers, tmp_path / "run", "skip"))
    assert res["global_step"] == 4
    ckpt = finite_weights(tmp_path / "run" / "checkpoints" / "final.ckpt")
    assert ckpt["callbacks"]["NanGuard"] == {"skipped": 1}
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/skipped_steps" in metrics


def test_nan_guard_refuses_to_write_non_finite_weights():
    guard = NanGuard()
    trainer = SimpleNamespace(global_step=7)
    ok = {"state_dict": {"w": torch.ones(3), "n": torch.tensor(5)}}
    guard.on_save_checkpoint(trainer, None, ok)
    bad = {"state_dict": {"w": torch.ones(3), "head.bias": torch.tensor([0.0, float("inf")])}}
    with pytest.raises(NonFiniteError, match=r"global step 7: non-finite weights in head.bias"):
        guard.on_save_checkpoint(trainer, None, bad)


def test_nan_guard_options_and_all_finite():
    with pytest.raises(ConfigError, match=r"callbacks\.nan_guard\.action='ignore'"):
        NanGuard(action="ignore")
    with pytest.raises(ConfigError, match="every_n_steps"):
        NanGuard(every_n_steps=0)

    def every(action: str, device: str, n: int | None = None) -> int:
        g = NanGuard(action, every_n_steps=n)
        strategy = SimpleNamespace(root_device=torch.device(device))
        g.on_fit_start(SimpleNamespace(strategy=strategy, log_every_n_steps=20), object())
        return g._every

    # every step on CPU and in skip mode; on an accelerator where logging syncs anyway
    assert every("stop", "cpu") == 1 and every("skip", "cuda") == 1
    assert every("stop", "cuda") == 20 and every("stop", "cuda", 1) == 1
    x = torch.ones(10)
    assert bool(all_finite([x, x.half(), torch.tensor(2.0)]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3] = bad
        assert not bool(all_finite([x, y])) and not bool(all_finite([y.half()]))
    big = torch.full((100_000,), 60000.0, dtype=torch.float16)  # 1-norm overflows fp16
    assert bool(all_finite([big]))


# ------------------------------------------------------------------------------ soak


SOAK_STEPS = int(os.environ.get("AMALGAM_SOAK_STEPS", "2000"))
SOAK_WARMUP = 300


@pytest.mark.soak
def test_soak_memory_stays_flat_over_thousands_of_steps(tiny_teachers, tmp_path, request):
    """A long CPU run (teacher cache on, csv logger, a validation and a checkpoint every few
    epochs): resident memory after the warm-up does not grow (no tensors kept alive by logging,
    no cache leak). Runs only when selected: `make test-soak` (`pytest -m soak`)."""
    expr = request.config.getoption("markexpr") or ""
    if "soak" not in expr or "not soak" in expr:
        pytest.skip("soak test: run it with `make test-soak` (pytest -m soak)")
    d = tmp_path / "run"
    probe = tmp_path / "rss.json"
    args = [
        "experiment=tiny",
        "logger=csv",
        "data.batch_size=16",
        "data.test_limit=64",
        "teacher_cache.enabled=true",
        f"teacher_cache.dir={tmp_path / 'cache'}",
        "trainer.max_epochs=-1",
        f"+trainer.max_steps={SOAK_STEPS}",
        "+trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=10",
        "callbacks.model_checkpoint.every_n_epochs=10",
        "+callbacks.rss._target_=rss.RssProbe",
        f"+callbacks.rss.path={probe}",
        "+callbacks.rss.every=50",
        f"hydra.run.dir={d}",
        *QUIET,
    ]
    start_time = time.time()
    rc = run(tiny_teachers, *args, out=tmp_path / "soak.log", timeout=4 * 3600)
    wall = time.time() - start_time
    assert rc == 0, (tmp_path / "soak.log").read_text()[-3000:]
    assert json.loads((d / "results.json").read_text())["global_step"] == SOAK_STEPS
    assert any((tmp_path / "cache").iterdir()), "the teacher cache was not used"
    samples = json.loads(probe.read_text())["samples"]
    first = samples[0][1]
    warm = next(mib for step, mib, _ in samples if step >= SOAK_WARMUP)
    end = samples[-1][1]
    late = [(s, m) for s, m, _ in samples if s >= SOAK_WARMUP]
    mean_s = sum(s for s, _ in late) / len(late)
    mean_m = sum(m for _, m in late) / len(late)
    slope = sum((s - mean_s) * (m - mean_m) for s, m in late) / sum(
        (s - mean_s) ** 2 for s, _ in late
    )
    figures = {
        "steps": SOAK_STEPS,
        "warmup_steps": SOAK_WARMUP,
        "rss_start_mib": round(first, 1),
        "rss_after_warmup_mib": round(warm, 1),
        "rss_end_mib": round(end, 1),
        "rss_max_after_warmup_mib": round(max(m for _, m in late), 1),
        "growth_after_warmup_mib": round(end - warm, 2),
        "slope_mib_per_1000_steps": round(1000 * slope, 3),
        "train_seconds": samples[-1][2],
        "wall_seconds": round(wall, 1),
    }
    print("soak:", json.dumps(figures))
    (TESTS.parent / "logs").mkdir(exist_ok=True)
    (TESTS.parent / "logs" / "soak.json").write_text(json.dumps(figures | {"samples": samples}))
    tolerance = max(16.0, 0.02 * warm)  # MiB: allocator noise, not a per-step leak
    assert end - warm < tolerance, figures
    assert 1000 * slope < tolerance / (SOAK_STEPS / 1000), figures
