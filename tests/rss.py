"""A test-only callback that samples the process's resident memory during training (soak test)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), not the peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssProbe(Callback):
    """Every `every` steps record (global step, RSS MiB, seconds since training started) and
    rewrite `path` (JSON) with all the samples so far."""

    def __init__(self, path: str, every: int = 50) -> None:
        self.path = Path(path)
        self.every = every
        self.samples: list[tuple[int, float, float]] = []
        self.start = time.time()

    def _sample(self, step: int) -> None:
        self.samples.append((step, rss_bytes() / 2**20, round(time.time() - self.start, 2)))
        self.path.write_text(json.dumps({"samples": self.samples}))  # survives a killed run

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.time()
        self._sample(trainer.global_step)

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step % self.every == 0:
            self._sample(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample(trainer.global_step)
