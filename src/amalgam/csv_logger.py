"""Lightning's CSV logger that, on a resumed run, keeps the interrupted run's rows before the
checkpoint's step (Lightning's own deletes the whole metrics.csv)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from amalgam.files import atomic_open


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
