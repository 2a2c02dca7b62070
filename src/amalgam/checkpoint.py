"""A student checkpoint's `amalgam` record, in one place.

`RunRecord` is what a checkpoint of `amalgam.amalgamate` keeps besides tensors: the composed
config, the label space, the teachers (file and metadata, never their tensors), the resolved
preprocessing and the wandb run id. `AmalgamModule` writes it with `write_record`; every
reader of a checkpoint goes through `read_checkpoint`, which loads the file with
`weights_only=True` (tensors and plain containers, never code), checks the record's shape, and
with `trust_targets` given also checks the stored config against the allow-list
(`amalgam.trust`) before anything instantiates from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amalgam.errors import ConfigError
from amalgam.teachers.io import torch_load_safely
from amalgam.trust import check_untrusted_config

KEY = "amalgam"  # the checkpoint entry that holds the record
RUN_CKPT = "<run dir>/checkpoints/last.ckpt (or final.ckpt) of an amalgam.amalgamate run"


@dataclass
class RunRecord:
    """The `amalgam` record of a student checkpoint."""

    config: dict[str, Any] = field(default_factory=dict)  # resolved; a Python-built run: a part
    label_space: dict[str, Any] = field(default_factory=dict)  # LabelSpace.as_dict()
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # {name: {path, meta}}
    preprocess: dict[str, Any] | None = None  # timm preprocessing as resolved, image_size
    wandb_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The plain dict stored in the checkpoint (what `torch.load(weights_only=True)` reads)."""
        out: dict[str, Any] = {
            "config": self.config,
            "label_space": self.label_space,
            "teachers": self.teachers,
        }
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess
        if self.wandb_id is not None:
            out["wandb_id"] = self.wandb_id
        return out

    @classmethod
    def from_dict(cls, rec: Any, where: str) -> RunRecord:
        """The record read back from `where`; a field of the wrong type is refused, one line."""
        if not isinstance(rec, Mapping):
            raise ConfigError(f"{where}: its '{KEY}' record is not a mapping; give {RUN_CKPT}")
        kinds = {
            "config": Mapping,
            "label_space": Mapping,
            "teachers": Mapping,
            "preprocess": (Mapping, type(None)),
            "wandb_id": (str, type(None)),
        }
        for name, kind in kinds.items():
            if name in rec and not isinstance(rec[name], kind):
                raise ConfigError(
                    f"{where}: '{KEY}.{name}' is a {type(rec[name]).__name__}, not what "
                    f"amalgam writes; the file was edited or is not amalgam's: give {RUN_CKPT}"
                )
        teachers = rec.get("teachers") or {}
        bad = [str(n) for n, t in teachers.items() if not isinstance(t, Mapping)]
        if bad:
            raise ConfigError(f"{where}: '{KEY}.teachers' entries {bad} are not mappings")
        return cls(
            config=dict(rec.get("config") or {}),
            label_space=dict(rec.get("label_space") or {}),
            teachers={str(n): dict(t) for n, t in teachers.items()},
            preprocess=None if rec.get("preprocess") is None else dict(rec["preprocess"]),
            wandb_id=rec.get("wandb_id"),
        )

    def teacher_hashes(self) -> dict[str, str | None]:
        """{teacher: sha256 of the file the student was trained with} (None where unrecorded)."""
        return {n: (t.get("meta") or {}).get("sha256") for n, t in self.teachers.items()}


@dataclass(frozen=True)
class StudentCheckpoint:
    """A checkpoint read back from disk: its record, tensors and the step it was written at."""

    path: Path
    record: RunRecord
    state_dict: dict[str, Any]
    global_step: int
    epoch: int | None = None

    def rule_fitted(self) -> bool:
        """Whether it holds a fitted target rule's statistics (a resume then skips the fit)."""
        return any(k.endswith("targets.fitted") and bool(v) for k, v in self.state_dict.items())


def write_record(checkpoint: dict[str, Any], record: RunRecord) -> None:
    """Store `record` in a checkpoint dict being saved (Lightning's on_save_checkpoint)."""
    checkpoint[KEY] = record.as_dict()


def _read(path: str, key: str, fix: str) -> StudentCheckpoint:
    ckpt = torch_load_safely(path, key, fix)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get(KEY), Mapping):
        raise ConfigError(
            f"{key} '{path}' was not written by amalgam.amalgamate (no '{KEY}' record): "
            f"give {RUN_CKPT}"
        )
    if not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConfigError(f"{key} '{path}' holds no state_dict: give {RUN_CKPT}")
    step, epoch = ckpt.get("global_step", 0), ckpt.get("epoch")
    return StudentCheckpoint(
        path=Path(path),
        record=RunRecord.from_dict(ckpt[KEY], f"{key} '{path}'"),
        state_dict=dict(ckpt["state_dict"]),
        global_step=int(step) if isinstance(step, int) else 0,
        epoch=epoch if isinstance(epoch, int) else None,
    )


def read_checkpoint(
    path: str | os.PathLike[str],
    trust_targets: Iterable[str] | None = None,
    key: str = "checkpoint",
) -> StudentCheckpoint:
    """A student checkpoint of amalgam.amalgamate, loaded with weights_only=True. Nothing is
    kept: a training run never holds a second copy of a checkpoint's tensors.

    The record is untrusted data. With `trust_targets` given (a reader that will instantiate the
    stored config), every `_target_` in it must be on amalgam's allow-list (`amalgam.trust`) or
    in `trust_targets`; `key` names the setting the path came from, for the error message.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} '{p}' not found: give {RUN_CKPT}")
    ckpt = _read(str(p), key, f"Give {RUN_CKPT}.")
    if trust_targets is not None:
        check_untrusted_config(ckpt.record.as_dict(), f"{key} '{p}'", trust_targets, KEY)
    return ckpt
