"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 during training save `checkpoints/last.ckpt` at the
next batch end and stop the run (`Preempted`); `ckpt_path=last` resumes it. Every checkpoint
keeps the random states, and `ResumableLoader` the data position within the epoch, so the
resumed run goes on with the batches (and random draws) the uninterrupted one had.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from amalgam.data.loaders import PREEMPTION_SIGNALS, ResumableLoader
from amalgam.errors import ConfigError
from amalgam.utils import log

PathLike = str | os.PathLike


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
