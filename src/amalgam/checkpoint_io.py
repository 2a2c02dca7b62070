"""Checkpoints written atomically: every file Lightning saves goes through `amalgam.files`'
atomic writer (temporary file, fsync, `os.replace`): the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from amalgam import rundir
from amalgam.files import atomic_open, disk_full, disk_full_error

PathLike = str | os.PathLike


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
