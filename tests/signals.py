"""Test-only Lightning callbacks that deliver signals to the run (tests/test_reliability.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send `signum` to this process once, at the end of the batch that reaches `step`."""

    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step = step
        self.signum = signal.Signals[signum]
        self.sent = False

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class MarkAndSlow(Callback):
    """From `step` on: touch `path` (the test then signals the process from outside) and sleep
    `sleep` seconds per batch, so the signal lands while training runs."""

    def __init__(self, step: int, path: str, sleep: float = 0.2) -> None:
        self.step = step
        self.path = Path(path)
        self.sleep = sleep

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            self.path.touch()
            time.sleep(self.sleep)
