"""The NaN guard's stop message: what caused the non-finite step (the data, the loss at step 0,
the optimisation) and a fix that fits it; a resume only where a checkpoint exists
(docs/RELIABILITY.md, "Non-finite loss or gradients")."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amalgam.nan_guard import NanGuard, NonFiniteError
from conftest import make_cfg
from test_reliability import NAN_RUN

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


class Line(L.LightningModule):
    """y = Wx on 64 points, 8 steps per epoch; `nan_pixel`: that image's first value is NaN
    (batch 2 of epoch 0); `nan_loss_at`: the loss is NaN at that global step; `lr`: SGD's."""

    def __init__(self, lr=0.01, nan_pixel=None, nan_loss_at=None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.lr, self.nan_pixel, self.nan_loss_at = lr, nan_pixel, nan_loss_at

    def training_step(self, batch, idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if self.global_step == self.nan_loss_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        y = x.sum(1, keepdim=True)
        if self.nan_pixel is not None:
            x[self.nan_pixel, 0] = float("nan")
        return DataLoader(TensorDataset(x, y), batch_size=8)


def stop_message(tmp_path: Path, model: L.LightningModule) -> str:
    """The NonFiniteError of a 2-epoch fit with the guard and an epoch-end last.ckpt."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[NanGuard(), ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(model)
    return str(err.value)


def test_non_finite_images_are_blamed_on_the_data_not_the_learning_rate(tmp_path):
    msg = stop_message(tmp_path, Line(nan_pixel=17))  # batch 2: global step 2
    assert msg.startswith("non-finite values at global step 2: loss terms loss=nan")
    assert (
        "Cause: the data, not the optimisation: 1 of 32 values of the batch's images are "
        "NaN/inf. Fix: the images (a Source or transform that yields non-finite pixels): "
        "repair or drop them, or set callbacks.nan_guard.action=skip to drop such batches; "
        "lowering optim.lr will not help"
    ) in msg
    assert "a lower optim.lr" not in msg and "ckpt_path=last" not in msg


def test_a_non_finite_loss_at_step_0_is_not_the_learning_rate(tmp_path):
    msg = stop_message(tmp_path, Line(nan_loss_at=0))
    assert msg.endswith(
        "Cause: not the learning rate: at global step 0 no optimizer step has run yet and the "
        "batch's images are finite, so the loss is non-finite on the initial weights. Fix: "
        "check method.weights and the method's settings (e.g. a temperature of 0) and the "
        "student's initialisation, then start afresh"
    )
    assert "optim.lr" not in msg and "ckpt_path=last" not in msg


def test_divergence_before_any_checkpoint_says_start_afresh_not_resume(tmp_path):
    msg = stop_message(tmp_path, Line(lr=1e6))  # diverges within epoch 0
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "The run stopped before the optimizer step; no checkpoint was written yet, so " in msg
    assert msg.endswith(
        "Cause: the optimisation (the batch's images are finite). Fix: start afresh with a "
        "lower optim.lr, or check method.weights; or set callbacks.nan_guard.action=skip to "
        "drop such steps"
    )
    assert "ckpt_path=last" not in msg and "resume with" not in msg


def test_divergence_after_a_checkpoint_names_it_and_how_to_resume(tmp_path):
    msg = stop_message(tmp_path, Line(nan_loss_at=10))  # epoch 1, after last.ckpt (step 8)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is '{last}'" in msg
    assert msg.endswith(
        "Cause: the optimisation (the batch's images are finite). Fix: start afresh with a "
        "lower optim.lr (a resume restores the checkpoint's optimizer, its learning rate "
        "included), or check method.weights; or resume with ckpt_path=last and "
        "callbacks.nan_guard.action=skip to drop such steps"
    )


def test_the_checkpoint_guard_suggests_a_resume_only_from_a_file_that_exists(tmp_path):
    guard = NanGuard()
    bad = {"state_dict": {"w": torch.tensor([float("nan")])}}
    trainer = SimpleNamespace(global_step=7, callbacks=[], default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteError) as err:
        guard.on_save_checkpoint(trainer, None, bad)
    assert "non-finite weights in w; no checkpoint was written yet, so there is nothing to " in (
        str(err.value)
    )
    assert "ckpt_path=last" not in str(err.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    with pytest.raises(NonFiniteError) as err:
        guard.on_save_checkpoint(trainer, None, bad)
    assert f"(the last good one is '{last}'). Fix: start afresh with a lower optim.lr" in (
        str(err.value)
    )


# ------------------------------------------------------------------------------ amalgamation


def amalgamate_until_nan(root: Path, out: Path, *inject: str) -> str:
    """The stop message of the tiny amalgamation (2 steps per epoch) with a test callback of
    tests/nan_inject.py that makes it non-finite."""
    from amalgam.amalgamate import amalgamate

    cfg = make_cfg(
        "amalgamate",
        [*NAN_RUN, *inject, *QUIET],
        root,
        out,
    )
    with pytest.raises(NonFiniteError) as err:
        amalgamate(cfg)
    return str(err.value)


@pytest.mark.parametrize(
    ("model", "who", "key"),
    [("tiny_a", "teacher 'tiny_a'", "teacher_set.tiny_a"), ("student", "the student", "student")],
)
def test_a_zero_std_names_the_model_and_its_config_key(tiny_teachers, tmp_path, model, who, key):
    """A std of 0 set on the Backbone itself (past the config's validation) makes the inputs
    inf/NaN at step 0: the message blames that normalisation, not the learning rate."""
    inject = ["+callbacks.zero._target_=nan_inject.ZeroStd", f"+callbacks.zero.model={model}"]
    msg = amalgamate_until_nan(tiny_teachers, tmp_path / "run", *inject)
    assert msg.startswith("non-finite values at global step 0: loss terms ")
    assert f"Cause: the data, not the optimisation: {who} normalises its inputs with std [0, " in (
        msg
    )
    assert (
        f"which holds a 0 (x / 0 = inf), so its normalised inputs are NaN/inf. Fix: set "
        f"{key}.std (and {key}.mean) to the normalisation the model expects, finite and with "
        "every std > 0, then start afresh; lowering optim.lr will not help"
    ) in msg
    assert "a lower optim.lr" not in msg and "ckpt_path=last" not in msg


def test_nan_pixels_in_an_amalgamation_batch_are_blamed_on_the_data(tiny_teachers, tmp_path):
    inject = ["+callbacks.poison._target_=nan_inject.PoisonImages", "+callbacks.poison.step=1"]
    msg = amalgamate_until_nan(tiny_teachers, tmp_path / "run", *inject)
    assert msg.startswith("non-finite values at global step 1: loss terms ")
    assert "Cause: the data, not the optimisation: 1 of " in msg
    assert " values of the batch's images are NaN/inf." in msg
    assert "a lower optim.lr" not in msg and "ckpt_path=last" not in msg
