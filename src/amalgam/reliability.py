"""Crash safety and numerical guards for training runs (docs/RELIABILITY.md).

- `AtomicCheckpointIO`: every checkpoint Lightning writes goes through `amalgam.files`' atomic
  writer (temporary file, fsync, `os.replace`): old file or new, never a torn one.
- `Preemption`: SIGTERM / SIGUSR1 / SIGUSR2 during training save `checkpoints/last.ckpt` at the next
  batch end and stop the run (`Preempted`); `ckpt_path=last` resumes it. Every checkpoint keeps
  the random states, and `ResumableLoader` the data position within the epoch, so the resumed run
  goes on with the batches (and random draws) the uninterrupted one had.
- `CSVLogger`: Lightning's CSV logger that, on a resumed run, keeps the interrupted run's rows
  before the checkpoint's step (Lightning's deletes the whole metrics.csv).
- `NanGuard`: a non-finite loss term or gradient stops the run before the optimizer step
  (`NonFiniteError`, naming the terms and the step) or skips that step; no checkpoint with
  non-finite weights is ever written.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader

from amalgam import rundir
from amalgam.errors import ConfigError
from amalgam.files import atomic_open, disk_full, disk_full_error
from amalgam.utils import log

__all__ = [
    "AtomicCheckpointIO",
    "CSVLogger",
    "NanGuard",
    "NonFiniteError",
    "Preempted",
    "Preemption",
    "ResumableLoader",
    "all_finite",
]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------ checkpoints


def _local_path(path: PathLike) -> Path | None:
    """The local file behind `path`, None for a remote URL (s3://, gs://, ...)."""
    s = os.fspath(path)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return None if "://" in s else Path(s)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose local saves are atomic (temp file + fsync + os.replace).

    Enabled by `plugins: [{_target_: amalgam.reliability.AtomicCheckpointIO}]` in the trainer
    config; every checkpoint Lightning writes goes through it (ModelCheckpoint, `last.ckpt`,
    `trainer.save_checkpoint`, Preemption), under DDP too (rank 0 writes). Remote URLs fall back to
    Lightning's own writer. A SIGKILL mid-save can leave `.<name>.<host>.<pid>.*.tmp` next
    to the checkpoint; the next save of that name on the same host deletes it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None
    ) -> None:
        local = _local_path(path)
        if local is None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                "Trainer.save_checkpoint(..., storage_options=...) is not supported by "
                "AtomicCheckpointIO; remove storage_options"
            )
        try:
            with atomic_open(local, "wb") as f:
                torch.save(checkpoint, f)
        except RuntimeError as e:  # torch's zip writer on a full disk: "unexpected pos ..."
            need = rundir.tensor_bytes(checkpoint)
            if disk_full(e, local, need):
                raise disk_full_error(local, need) from e
            raise


# ------------------------------------------------------------------------------ preemption


class _ResumingWriter(ExperimentWriter):
    """Keeps metrics.csv's rows of steps < `resume_step` and appends after them."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__, after metrics_keys = []
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _step_of(r) < self._resume_step]
        self.metrics_keys = keys
        with atomic_open(path, "w") as f:  # text mode: newline handling as csv expects
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def _step_of(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger; with `resume_step` (set by the launcher on `ckpt_path=...`), the
    rows the interrupted run logged before that step are kept and the resumed run appends."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resume_step is not None and rank_zero_only.rank == 0:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self._resume_step)
        return super().experiment


class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving `path`; exit status 128 + signal."""

    def __init__(self, signum: int, path: str, code: int | None = None) -> None:
        super().__init__(128 + signum if code is None else code)
        self.signum = signum
        self.path = path


def _signal_number(sig: str | int) -> signal.Signals:
    try:
        if isinstance(sig, str) and not sig.isdigit():
            name = sig.upper()
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(int(sig))
    except (KeyError, ValueError):
        raise ConfigError(
            f"callbacks.preemption.signals: unknown signal '{sig}'; use names such as SIGTERM, "
            "SIGUSR1, SIGUSR2"
        ) from None


def _slurm_requeue(trainer: Trainer) -> bool:
    """Lightning owns SIGUSR1 when it runs under SLURM with auto_requeue on."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)


PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class WorkerInit:
    """`worker_init_fn` of amalgam's DataLoaders: workers leave the preemption signals to the
    main process.

    SLURM's preemption and `scancel`, and `kill -- -<pgid>`, signal every process of the run,
    DataLoader workers included. A torch worker dies on a SIGTERM that its parent did not send,
    and the main process then raises "DataLoader worker ... is killed by signal" in the middle of
    a step: the run crashes before `Preemption` can save `last.ckpt` (and a Hydra multirun goes
    on with its next job). So each worker blocks SIGTERM / SIGUSR1 / SIGUSR2 and a daemon thread
    takes them with `sigwaitinfo`: sent by the worker's parent (DataLoader shutdown,
    multiprocessing's exit terminating daemonic workers), the worker exits as torch's own handler
    makes it; sent by anyone else, it is dropped, and the main process, which got the same
    signal, saves and stops. A worker whose parent dies exits through torch's watchdog.

    With `seed_everything(workers=True)` it also seeds the worker as Lightning's
    `pl_worker_init_function` (which Lightning adds only to loaders without a worker_init_fn).
    """

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        wanted = {getattr(signal, n) for n in PREEMPTION_SIGNALS if hasattr(signal, n)}
        if wanted and hasattr(signal, "sigwaitinfo"):
            parent = os.getppid()
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

            def wait() -> None:
                while True:
                    info = signal.sigwaitinfo(wanted)
                    if info.si_pid == parent:
                        os._exit(0)

            threading.Thread(target=wait, name="amalgam-worker-signals", daemon=True).start()
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


class ResumableLoader(DataLoader):
    """A DataLoader that a resumed fit continues mid-epoch where the interrupted one stood.

    On a resume from a mid-epoch checkpoint (Preemption's `last.ckpt`), Lightning restarts a
    plain DataLoader's epoch at its first batch and runs the number of batches the epoch had left:
    the resumed run trained on the epoch's first batches again instead of its last ones. This
    loader is stateful for Lightning (`state_dict` / `load_state_dict`, kept in the fit loop's
    state of every checkpoint): it records the sampler's epoch and the batches handed out in it,
    and the resumed epoch skips those batches' indices (their images are not loaded).

    Its iterator is made at the first `next()`, not at `iter()`: Lightning calls `iter()` when a
    fit starts, before `set_epoch`, and with workers a DataLoader iterator draws its indices at
    once, so a resumed run with `num_workers > 0` read the order of epoch 0 in its first epoch,
    whatever epoch it resumed in. Exact for samplers whose order is a function of the epoch
    (`set_epoch`: `EpochShuffle`, Lightning's DDP wrapper of it); other samplers restart the
    epoch as a plain DataLoader does. No `__init__` of its own: Lightning re-creates loaders
    (DDP samplers) from DataLoader's arguments.
    """

    _position: tuple[int, int] = (-1, 0)  # (sampler epoch, batches handed out) of this epoch
    _resume: tuple[int, int] | None = None  # a checkpoint's position, used by the next epoch
    _skip = 0  # set only while the iterator of a resumed epoch is made

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _LazyEpoch(self)

    @property
    def _index_sampler(self) -> Any:  # where torch's iterators draw the (batch) indices from
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def _begin(self) -> Iterator[Any]:
        """The DataLoader iterator of the epoch that starts now, past the batches a resumed
        epoch had already trained on."""
        epoch = _sampler_epoch(self)
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and epoch is not None and resume[0] == epoch else 0
        self._position = (-1 if epoch is None else epoch, skip)
        # Making a DataLoader iterator draws its workers' seed from torch's RNG. An uninterrupted
        # run draws it when an epoch starts, before a mid-epoch checkpoint, and with persistent
        # workers once, in its first epoch: those iterators are made without a draw, in a
        # resumed run and (persistent workers) in a fresh one, so both runs draw alike.
        persistent = self.persistent_workers and self.num_workers > 0
        no_draw = skip > 0 or (persistent and self._iterator is None)
        self._skip = skip
        try:
            with torch.random.fork_rng(devices=[]) if no_draw else contextlib.nullcontext():
                return super().__iter__()
        finally:
            self._skip = 0

    def _handed_out(self) -> None:
        epoch, batches = self._position
        self._position = (epoch, batches + 1)


class _LazyEpoch(Iterator[Any]):
    """One epoch of a ResumableLoader; the DataLoader iterator is made at the first `next()`."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._begin()
        batch = next(self.iterator)
        self.loader._handed_out()
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "iterator": None}  # torch's iterators cannot be pickled


class _SkipFirst:
    """An index (or batch) sampler whose first iteration leaves out its first `n` items."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler = sampler
        self.n = n

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        # a generator: this runs at the first next(), not at iter() (a worker iterator calls
        # iter() twice when it is made), and later epochs (persistent workers) get all items
        n, self.n = self.n, 0
        yield from itertools.islice(self.sampler, n, None)


def _sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch of the loader's epoch-seeded sampler (the one Lightning calls `set_epoch` on)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (loader.sampler, getattr(batch_sampler, "sampler", None)):
        epoch = getattr(sampler, "epoch", None)
        if callable(getattr(sampler, "set_epoch", None)) and isinstance(epoch, int):
            return epoch
    return None


def rng_states() -> dict[str, Any]:
    """The process's random states (torch, the current CUDA device, python, numpy), in types
    that `torch.load(weights_only=True)` reads."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what `rng_states` returned (states this process cannot take are left alone)."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "numpy" in states:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class Preemption(Callback):
    """On SIGTERM / SIGUSR1 / SIGUSR2 save `<dirpath>/last.ckpt` at the next batch end and stop.

    The handlers are installed in `on_train_start` (after Lightning installed its own, so
    Lightning's SIGTERM handling is replaced while the training loop runs and restored after) and
    only record the signal. At the next `on_train_batch_end` the flag is reduced over the ranks
    (any rank's signal stops all of them at the same step), the checkpoint is saved through the
    trainer (the atomic CheckpointIO), the handler that was installed before the fit started
    (e.g. submitit's SIGUSR2 requeue) is called, and `Preempted` (a SystemExit, status
    128 + signal) ends the run: no epoch-end hook can overwrite last.ckpt, and no final
    evaluation or results.json is written for an unfinished run. Resume with `ckpt_path=last`.

    Its state in every checkpoint is the process's random states (`rng_states`). When a resumed
    fit starts training (after the sanity check) it restores them and hands each
    `ResumableLoader` its position in the epoch: the resumed run trains on the batches and draws
    the random numbers (dropout, augmentation in the main process) of the uninterrupted one, and
    ends with its weights.

    A signal during validation or the sanity check acts at the next training batch (or at the
    end of training). A second signal of the same kind while the save is pending is passed on at
    once (the previous handler; the default action, i.e. termination, if there was none).
    SIGUSR1 is left to Lightning when Lightning's SLURM auto-requeue is on (its own handler saves
    an hpc checkpoint and requeues the job).
    """

    def __init__(
        self,
        dirpath: PathLike | None = None,
        filename: str = "last.ckpt",
        signals: Sequence[str | int] = PREEMPTION_SIGNALS,
        every_n_steps: int = 1,
        exit_code: int | None = None,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ConfigError(
                f"callbacks.preemption.every_n_steps={every_n_steps}: it must be >= 1 (1: act at "
                "the first batch end after the signal)"
            )
        self.dirpath = None if dirpath is None else str(dirpath)
        self.filename = str(filename)
        self.signals = [_signal_number(s) for s in signals]
        self.every_n_steps = int(every_n_steps)
        self.exit_code = exit_code
        self.pending: int | None = None
        self._passed_on = False  # the previous handler ran already (second signal)
        self._before: dict[int, Any] = {}  # handlers present before the fit: chained
        self._replaced: dict[int, Any] = {}  # handlers present when ours went in: restored
        self._rng: Mapping[str, Any] | None = None  # a checkpoint's random states, to restore
        self._loader_states: list[Any] = []  # the checkpoint's training loader positions

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_states = list((fit_loop.get("state_dict") or {}).get("combined_loader") or [])

    def _resume(self, trainer: Trainer) -> None:
        """Go on from the checkpoint's moment: its random states, and its positions within the
        epoch for the ResumableLoaders. Lightning hands a stateful loader its position only when
        the fit loop sets up its data after the checkpoint is restored; a `configure_optimizers`
        that reads `trainer.estimated_stepping_batches` (amalgam's does) sets it up before, and
        the positions were dropped: the resumed epoch started again at its first batch."""
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None
        states, self._loader_states = self._loader_states, []
        combined = trainer.train_dataloader
        loaders = [
            dl
            for dl in getattr(combined, "flattened", [combined])
            if callable(getattr(dl, "state_dict", None))
            and callable(getattr(dl, "load_state_dict", None))
        ]  # the loaders Lightning saved states of, in its order
        if len(states) == len(loaders):
            for loader, state in zip(loaders, states, strict=True):
                if isinstance(loader, ResumableLoader):
                    loader.load_state_dict(state)

    # ---------------------------------------------------------------- handlers

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.pending = None
        self._passed_on = False
        self._before, self._replaced = {}, {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not in the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            if sig == signal.SIGUSR1 and _slurm_requeue(trainer):
                log.info("Preemption: SIGUSR1 left to Lightning's SLURM auto-requeue")
                continue
            self._before[sig] = signal.getsignal(sig)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resume(trainer)  # after the sanity check, before the first training batch
        for sig in self._before:
            self._replaced[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # no logging here: writing to a stream the interrupted code is writing to can raise
        if self.pending is None:
            self.pending = signum
            return
        if signum == self.pending and not self._passed_on:  # asked twice: act as without us
            previous = self._before.get(signum)
            self._passed_on = True
            self._restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
                signal.raise_signal(signum)

    def _restore(self) -> None:
        for sig, handler in self._replaced.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._replaced = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    # ---------------------------------------------------------------- the stop

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        # single device: a plain bool; DDP: one all-reduce, so all ranks stop at the same step
        if trainer.strategy.reduce_boolean_decision(self.pending is not None, all=False):
            self._stop(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.strategy.reduce_boolean_decision(self.pending is not None, all=False):
            self._stop(trainer)

    def checkpoint_path(self, trainer: Trainer) -> str:
        cb = trainer.checkpoint_callback
        dirpath = self.dirpath or (
            cb.dirpath if isinstance(cb, ModelCheckpoint) and cb.dirpath else None
        )
        return os.path.join(
            dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), self.filename
        )

    def _stop(self, trainer: Trainer) -> None:
        signum = self.pending or signal.SIGTERM  # a rank that got no signal stops as for SIGTERM
        path = self.checkpoint_path(trainer)
        # a ModelCheckpoint that writes the same last.ckpt keeps overwriting it after the resume
        # (else it would write last-v1.ckpt next to it and ckpt_path=last would find a stale file)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                last = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
                if os.path.abspath(last) == os.path.abspath(path):
                    cb.last_model_path = last
        if trainer.is_global_zero:
            log.warning(
                "received %s: saving %s at global step %d, then stopping",
                signal.Signals(signum).name,
                path,
                trainer.global_step,
            )
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, for the resume
        if trainer.is_global_zero:
            log.warning(
                "%s: saved %s at global step %d; stopping. Resume with ckpt_path=last (or "
                "ckpt_path=%s)",
                signal.Signals(signum).name,
                path,
                trainer.global_step,
                path,
            )
        previous = self._before.get(signum) if self.pending and not self._passed_on else None
        self._restore()
        self.pending = None
        if callable(previous):
            previous(signum, None)
        raise Preempted(int(signum), path, self.exit_code)


# ------------------------------------------------------------------------------ NaN guard


class NonFiniteError(RuntimeError):
    """A loss term or gradient was NaN/inf; the weights were not updated with it."""


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 0-d bool tensor (on the tensors' device, no host sync): every element is finite.

    Per tensor one reduction (a fused `_foreach_norm` where available): a 1-norm is NaN/inf iff
    an element is (fp16 tensors, whose norm could overflow, are tested element-wise).
    """
    tensors = [t for t in tensors if t.is_floating_point() or t.is_complex()]  # ints: finite
    if not tensors:
        return torch.tensor(True)
    half = [t for t in tensors if t.dtype == torch.float16]
    rest = [t for t in tensors if t.dtype != torch.float16 and not t.is_sparse]
    parts: list[torch.Tensor] = [torch.isfinite(t).all().reshape(1) for t in half]
    if rest:
        try:
            norms = torch._foreach_norm(rest, 1)
        except (AttributeError, RuntimeError, TypeError):
            norms = [torch.linalg.vector_norm(t, 1) for t in rest]
        device = norms[0].device
        parts.append(torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()[None])
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts]).all()


class NanGuard(Callback):
    """Non-finite loss terms or gradients stop the run (`action="stop"`) or skip the step.

    The loss terms come from the module's `method` (a forward hook keeps the detached terms of
    the training step; other modules: the summed loss), the gradients from the optimizer, both
    checked in `on_before_optimizer_step`, i.e. after backward and before the weights change.

    - stop: `NonFiniteError` naming the non-finite terms, the parameters with non-finite
      gradients and the global step; the weights, last.ckpt and every checkpoint stay finite.
      The message names the cause and its fix: the data (non-finite images, a model's
      normalisation std with a 0: `teacher_set.<name>.std`, `student.std`, a teacher's
      non-finite outputs), the loss at global step 0 (no update yet: not the learning rate),
      else the optimisation (a lower `optim.lr`). It suggests a resume only when a last
      checkpoint exists on disk.
    - skip: the step's gradients are dropped (the optimizer leaves the weights and its state
      alone; the LR schedule still advances), `skipped` counts them (logged as
      `train/skipped_steps`, kept in checkpoints).

    The check is one fused all-finite reduction and one host read. On CPU that costs nothing
    noticeable and runs every step. On an accelerator the read is a sync per step, so by default
    (`every_n_steps=None`) it runs every `trainer.log_every_n_steps` steps there (the steps that
    sync for logging anyway) and every step in skip mode; `every_n_steps=1` checks every step
    everywhere. A non-finite step between checks can reach the weights, but never a checkpoint:
    `on_save_checkpoint` refuses to write non-finite weights (one check per save). Under
    `16-mixed` precision the GradScaler owns gradient overflow (it skips those steps itself), so
    only the loss terms are checked.
    """

    def __init__(
        self, action: str = "stop", every_n_steps: int | None = None, check_grads: bool = True
    ) -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(
                f"callbacks.nan_guard.action='{action}': choose stop (end the run, keep the last "
                "good checkpoint) or skip (drop the step's gradients and go on)"
            )
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ConfigError(
                f"callbacks.nan_guard.every_n_steps={every_n_steps}: give an integer >= 1, or "
                "null for the default (every step on CPU and in skip mode)"
            )
        self.action = action
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.check_grads = bool(check_grads)
        self.skipped = 0
        self._every = 1
        self._terms: dict[str, torch.Tensor] | None = None
        self._records: list[dict[str, torch.Tensor]] = []
        self._images: list[torch.Tensor] = []  # the step's batch images, for the diagnosis
        self._hook: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ---------------------------------------------------------------- collecting the terms

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is not None:
            self._every = self.every_n_steps
        elif self.action == "skip" or trainer.strategy.root_device.type == "cpu":
            self._every = 1
        else:
            self._every = max(1, int(trainer.log_every_n_steps))
        self._records, self._terms, self._images = [], None, []
        method = getattr(pl_module, "method", None)
        if isinstance(method, nn.Module) and self._hook is None:
            self._hook = method.register_forward_hook(self._keep_terms)

    def _keep_terms(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and isinstance(output, Mapping):
            self._terms = {
                str(k): v.detach() for k, v in output.items() if isinstance(v, torch.Tensor)
            }

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = _images_of(batch)  # a reference, no copy: the batch lives until the step anyway
        if x is not None:
            self._images.append(x)

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        self._records.append(self._terms or {"loss": loss.detach()})
        self._terms = None

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._records, self._terms, self._images = [], None, []

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unhook()
        if self.skipped and trainer.is_global_zero:
            log.warning("nan_guard skipped %d step(s) with non-finite values", self.skipped)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._unhook()

    # ---------------------------------------------------------------- the check

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        records, self._records = self._records, []
        images, self._images = self._images, []
        step = trainer.global_step
        if step % self._every:
            return
        values = [v for rec in records for v in rec.values()]
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params] if self.check_grads and not _scaler(trainer) else []
        bad = not bool(all_finite([*values, *grads]))  # the one host sync
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        what = _describe(records, params if grads else [], pl_module)
        if self.action == "stop":
            last = _last_checkpoint(trainer)
            keep = f"the last good checkpoint is '{last}'" if last else _NO_CHECKPOINT
            late = (
                f" (checked every {self._every} steps: it may have appeared up to "
                f"{self._every - 1} steps earlier)"
                if self._every > 1
                else ""
            )
            cause = _cause(trainer, pl_module, images, step, last)
            raise NonFiniteError(
                f"non-finite values at global step {step}{late}: {what}. The run stopped before "
                f"the optimizer step; {keep}. {cause}"
            )
        for p in params:
            p.grad = None  # the optimizer skips parameters without gradients: no update at all
        self.skipped += 1
        if trainer.is_global_zero:
            log.warning(
                "nan_guard: skipped global step %d (%s); %d skipped so far",
                step,
                what,
                self.skipped,
            )
            for lg in trainer.loggers:
                lg.log_metrics({"train/skipped_steps": float(self.skipped)}, step=step)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        sd = checkpoint.get("state_dict") or {}
        weights = {
            k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
        }
        if not weights or bool(all_finite(list(weights.values()))):
            return
        bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
        last = _last_checkpoint(trainer)
        if last:
            kept = f"the checkpoints already on disk are kept (the last good one is '{last}')"
            lower = f"start afresh with a lower optim.lr {_LR_RESTORED}"
        else:
            kept, lower = _NO_CHECKPOINT, "start afresh with a lower optim.lr"
        raise NonFiniteError(
            f"refusing to write a checkpoint at global step {trainer.global_step}: non-finite "
            f"weights in {_first(bad)}; {kept}. Fix: {lower}, and check every step with "
            "callbacks.nan_guard.every_n_steps=1 (a non-finite step is then stopped before it "
            "reaches the weights)"
        )


def _scaler(trainer: Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _first(names: Sequence[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _describe(
    records: Sequence[Mapping[str, torch.Tensor]],
    params: Sequence[torch.Tensor],
    pl_module: LightningModule,
) -> str:
    """'loss terms mmd=nan (finite: kd=0.51, rec=0.13); gradients non-finite in 3 of 40 ...'."""
    bad: dict[str, str] = {}
    good: dict[str, str] = {}
    for rec in records:
        for k, v in rec.items():
            val = f"{v.float().mean().item():.4g}" if v.numel() else "empty"
            (good if bool(torch.isfinite(v).all()) else bad)[k] = val
    parts = []
    if bad:
        fine = {k: v for k, v in good.items() if k not in bad}
        rest = f" (finite: {', '.join(f'{k}={v}' for k, v in fine.items())})" if fine else ""
        parts.append("loss terms " + ", ".join(f"{k}={v}" for k, v in bad.items()) + rest)
    bad_grads = [p for p in params if not bool(torch.isfinite(p.grad).all())]
    if bad_grads:
        by_id = {id(p): n for n, p in pl_module.named_parameters()}
        parts.append(
            f"gradients non-finite in {len(bad_grads)} of {len(params)} parameter tensors "
            f"({_first([by_id.get(id(p), '?') for p in bad_grads], 3)})"
        )
    return "; ".join(parts) or "non-finite values"


# ------------------------------------------------------------------------------ NaN diagnosis

_NO_CHECKPOINT = "no checkpoint was written yet, so there is nothing to resume"
_LR_RESTORED = "(a resume restores the checkpoint's optimizer, its learning rate included)"
_NOT_THE_LR = "lowering optim.lr will not help"


def _images_of(batch: Any) -> torch.Tensor | None:
    """The float images of a training batch ({"image": ...}, (images, labels), or a tensor)."""
    if isinstance(batch, Mapping):
        batch = batch.get("image")
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    return batch if isinstance(batch, torch.Tensor) and batch.is_floating_point() else None


def _last_checkpoint(trainer: Any) -> str | None:
    """The run's last checkpoint that exists on disk: a ModelCheckpoint's last one, or the
    `last.ckpt` that it or Preemption writes, or `<root dir>/checkpoints/last.ckpt`."""
    paths: list[str] = []
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, ModelCheckpoint):
            paths.append(cb.last_model_path)
            if cb.dirpath:
                paths.append(os.path.join(cb.dirpath, "last.ckpt"))
        elif isinstance(cb, Preemption):
            paths.append(cb.checkpoint_path(trainer))
    root = getattr(trainer, "default_root_dir", None)
    if root:
        paths.append(os.path.join(root, "checkpoints", "last.ckpt"))
    return next((p for p in paths if p and os.path.isfile(p)), None)


def _models(pl_module: Any) -> list[tuple[str, str, nn.Module]]:
    """(who, config key, model) of the module's teachers and student: models with their own
    input normalisation (`preprocess`, `mean`, `std`), as `amalgam.backbone.Backbone`."""
    bank = getattr(pl_module, "teachers", None)
    teachers = getattr(bank, "teachers", None)
    found = [(f"teacher '{n}'", f"teacher_set.{n}", m) for n, m in (teachers or {}).items()]
    student = getattr(pl_module, "student", None)
    if student is not None:
        found.append(("the student", "student", student))
    return [f for f in found if callable(getattr(f[2], "preprocess", None))]


def _floats(t: Any) -> str:
    values = t.flatten().tolist() if isinstance(t, torch.Tensor) else []
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


@torch.no_grad()
def _data_cause(
    images: Sequence[torch.Tensor], pl_module: Any, context: Any
) -> tuple[str | None, list[str]]:
    """(the data's part in a non-finite step, or None; what was found finite).

    Looks at the step's images, each model's normalised inputs and the teachers' outputs, in
    that order: the first non-finite one is the cause. Run only once a step was non-finite.
    """
    if not images:
        return None, []
    bad = sum(int((~torch.isfinite(x)).sum()) for x in images)
    if bad:
        total = sum(x.numel() for x in images)
        return (
            f"Cause: the data, not the optimisation: {bad} of {total} values of the batch's "
            "images are NaN/inf. Fix: the images (a Source or transform that yields non-finite "
            "pixels): repair or drop them, or set callbacks.nan_guard.action=skip to drop such "
            f"batches; {_NOT_THE_LR}"
        ), []
    checked = ["the batch's images"]
    models = _models(pl_module)
    for who, key, model in models:
        if not all(bool(torch.isfinite(model.preprocess(x)).all()) for x in images):
            return _normalisation_cause(who, key, model), checked
    if models:
        checked.append("every model's normalised inputs")
    teachers = [(who, key, m) for who, key, m in models if key.startswith("teacher_set.")]
    for who, key, model in teachers:
        with context:
            outs = [model(x, features=True) for x in images]
        if not all(bool(all_finite([o.logits, *o.features])) for o in outs):
            return (
                f"Cause: not the optimisation: {who} gives NaN/inf outputs on finite inputs. "
                f"Fix: check its weights ({key}.weights) and teacher_dtype (float16 overflows "
                f"above 65504), then start afresh; {_NOT_THE_LR}"
            ), checked
    if teachers:
        checked.append("the teachers' outputs")
    return None, checked


def _normalisation_cause(who: str, key: str, model: nn.Module) -> str:
    """The data's cause when a model's normalisation turns finite images non-finite."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(std, torch.Tensor) and bool((std == 0).any()):
        why = f"normalises its inputs with std {_floats(std)}, which holds a 0 (x / 0 = inf)"
    else:
        why = f"turns the finite images into NaN/inf (mean {_floats(mean)}, std {_floats(std)})"
    return (
        f"Cause: the data, not the optimisation: {who} {why}, so its normalised inputs are "
        f"NaN/inf. Fix: set {key}.std (and {key}.mean) to the normalisation the model expects, "
        f"finite and with every std > 0, then start afresh; {_NOT_THE_LR}"
    )


def _cause(
    trainer: Trainer, pl_module: Any, images: Sequence[torch.Tensor], step: int, last: str | None
) -> str:
    """The 'Cause: ... Fix: ...' part of the NaN guard's stop message."""
    plugin = getattr(trainer, "precision_plugin", None)
    context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
    data, checked = _data_cause(images, pl_module, context)
    # DDP: one rank's data stops all ranks, and no rank blames the learning rate
    if trainer.strategy.reduce_boolean_decision(data is not None, all=False) and data is None:
        data = (
            "Cause: the data, not the optimisation: another rank's batch or normalised inputs "
            f"are NaN/inf (its message names them); {_NOT_THE_LR}"
        )
    if data is not None:
        return data
    finite = " and ".join([", ".join(checked[:-1]), checked[-1]] if len(checked) > 1 else checked)
    found = f"{finite} are finite" if finite else "the batch's inputs could not be checked"
    if step == 0:
        return (
            f"Cause: not the learning rate: at global step 0 no optimizer step has run yet and "
            f"{found}, so the loss is non-finite on the initial weights. Fix: check "
            "method.weights and the method's settings (e.g. a temperature of 0) and the "
            "student's initialisation, then start afresh"
        )
    if last:
        lower = f"start afresh with a lower optim.lr {_LR_RESTORED}"
        skip = "resume with ckpt_path=last and callbacks.nan_guard.action=skip to drop such steps"
    else:
        lower = "start afresh with a lower optim.lr"
        skip = "set callbacks.nan_guard.action=skip to drop such steps"
    return f"Cause: the optimisation ({found}). Fix: {lower}, or check method.weights; or {skip}"
