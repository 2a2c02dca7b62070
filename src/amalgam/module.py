"""The LightningModule that wires frozen teachers, a student and a method together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import lightning as L
import torch

from amalgam.backbone import Backbone
from amalgam.checkpoint import RunRecord, write_record
from amalgam.classifier import split_head, steps_per_epoch
from amalgam.evaluation import AmalgamAccuracy, TestMetrics
from amalgam.methods.base import Method
from amalgam.optim import configure
from amalgam.teachers.bank import TeacherBank

TEACHER_PREFIX = "teachers."


def images_of(batch: Any) -> torch.Tensor:
    """The images of an unlabeled batch; refuses any batch that carries labels."""
    if isinstance(batch, Mapping):
        extra = set(batch) - {"image", "index", "view"}
        if extra:
            raise ValueError(
                f"an amalgamation batch may carry images, ids and view ids only, got {extra}"
            )
        return batch["image"]
    raise TypeError(
        "amalgamation expects unlabeled batches {'image', 'index'}; got "
        f"{type(batch).__name__}. Use the datamodule's train_dataloader()."
    )


class AmalgamModule(L.LightningModule):
    """Trains the student (and the method's own parts) on unlabeled images.

    Teachers are frozen, kept in eval mode, left out of the optimiser and of checkpoints
    (which record their paths and hashes in `checkpoint['amalgam']` instead).
    """

    def __init__(
        self,
        teachers: TeacherBank,
        student: Backbone,
        method: Method,
        optim: Mapping[str, Any],
        record: RunRecord | None = None,
    ) -> None:
        super().__init__()
        self.teachers = teachers
        self.student = student
        self.method = method
        self.optim = dict(optim)
        self.record = record or RunRecord()  # the checkpoint's `amalgam` record, less teachers
        self.space = teachers.space
        self.strict_loading = False
        # set by the caller to read teacher outputs from a cache: (device, rank, world, barrier,
        # broadcast)
        # -> TeacherCache; opened in on_fit_start, once the ranks exist
        self.cache_spec: Callable[..., Any] | None = None
        self.cache: Any = None
        self.val_acc = AmalgamAccuracy(self.space)

    def train(self, mode: bool = True) -> AmalgamModule:
        super().train(mode)
        self.teachers.eval()
        return self

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if k.startswith(TEACHER_PREFIX)]:
            del sd[k]
        return sd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_record(checkpoint, replace(self.record, teachers=self.teachers.record()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x, features=False).logits

    def on_fit_start(self) -> None:
        if self.cache_spec is not None and self.cache is None:
            self.cache = self.cache_spec(
                device=self.device,
                rank=self.global_rank,
                world=self.trainer.world_size,
                barrier=self.trainer.strategy.barrier,
                broadcast=self.trainer.strategy.broadcast,
            )

    def losses(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms; teacher outputs come from the cache when it has `index` (`view`)."""
        feats = self.method.needs_features
        t_feats = self.method.needs_teacher_features
        if not self.method.uses_teachers:
            t = None
        elif self.cache is not None and index is not None:
            t = self.cache.lookup(index, x.device, features=t_feats, view=view)
        else:
            t = self.teachers(x, features=t_feats)
        s = self.student(x, features=feats)
        return self.method(s, t, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.method.uses_labels:
            x, y = batch
            terms = self.losses(x, y)
        else:
            x = images_of(batch)
            terms = self.losses(x, index=batch.get("index"), view=batch.get("view"))
        loss = torch.stack(list(terms.values())).sum()
        if self.log_this_step():
            self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True)
        return loss

    def log_this_step(self) -> bool:
        """Log the loss terms only on the steps the logger writes (`log_every_n_steps`).

        A value logged to the progress bar is read back with `.item()` at every refresh: on a GPU
        that is a host-device sync per step. Logged only every n steps, the step stays sync-free.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1)))
        return (self.global_step + 1) % every == 0 or self.global_step == 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)
        if not self.method.uses_labels:
            terms = self.losses(x)
            loss = torch.stack(list(terms.values())).sum()
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        # one name per metric: val/acc_<task> for the tasks, val/joint_acc for the union
        joint = acc.pop("joint")
        self.log_dict({f"val/acc_{k}": v for k, v in acc.items()}, prog_bar=False)
        self.log("val/joint_acc", joint, prog_bar=True)
        self.val_acc.reset()

    # the final evaluation: `trainer.test(module, test loader)`; device, precision and DDP are
    # the Trainer's, every rank's counts are summed (amalgam.evaluation.TestMetrics)
    def on_test_epoch_start(self) -> None:
        self.test_metrics = TestMetrics(self.space, self.method.targets).to(self.device)
        self.test_results: dict[str, Any] | None = None

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_metrics.update(self.student, self.teachers, x, y)

    def on_test_epoch_end(self) -> None:
        self.test_results = self.test_metrics.compute()
        del self.test_metrics  # no state of it outlives the evaluation

    def configure_optimizers(self):
        groups = split_head(self.student)
        groups["method"] = list(self.method.parameters())
        return configure(
            self.optim,
            groups,
            int(self.trainer.estimated_stepping_batches),
            steps_per_epoch(self.trainer),
        )
