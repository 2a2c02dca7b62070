"""Supervised training of one network on one task (how teachers are made)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from amalgam.backbone import Backbone
from amalgam.optim import configure


def split_head(net: Backbone) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters of a backbone as {'body': ..., 'head': ...}."""
    head = net.model.get_classifier() if hasattr(net.model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    params = list(net.parameters())
    return {
        "body": [p for p in params if id(p) not in head_ids],
        "head": [p for p in params if id(p) in head_ids],
    }


def steps_per_epoch(trainer: L.Trainer) -> int:
    total = int(trainer.estimated_stepping_batches)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    return max(1, total // epochs)


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        net: Backbone,
        num_classes: int,
        optim: Mapping[str, Any],
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.optim = dict(optim)
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, features=False).logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits.float(), y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        return configure(
            self.optim,
            split_head(self.net),
            int(self.trainer.estimated_stepping_batches),
            steps_per_epoch(self.trainer),
        )
