"""A test-only Lightning callback that holds a run at its start until a file appears.

Tests that need a run to be still running while something else happens (a second run into the
same dir) open the gate when they are done, so no timing decides the outcome.
"""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class WaitForFile(Callback):
    def __init__(self, path: str, timeout: float = 300.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {self.path} never opened")
            time.sleep(0.1)
