"""Test-only callbacks that make a run non-finite (tests/test_reliability.py, test_nan_guard.py):
a NaN loss term, NaN pixels, a zero normalisation std.

`InjectNaN` multiplies the term by NaN inside the graph, so the gradients of everything that
feeds the term are NaN too, as after a real overflow.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class InjectNaN(Callback):
    def __init__(self, step: int, term: str = "mmd") -> None:
        self.step = step
        self.term = term
        self.trainer = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        # prepended: the NanGuard's hook (registered earlier) must see the poisoned terms
        pl_module.method.register_forward_hook(self._poison, prepend=True)

    def _poison(self, module, args, output):
        if module.training and self.trainer.global_step == self.step:
            output = dict(output)
            output[self.term] = output[self.term] * float("nan")
            return output
        return None


class PoisonImages(Callback):
    """Makes one pixel of the batch's images NaN at one global step, in place: non-finite data
    as a custom Source could hand out (registered after the NanGuard, which keeps the batch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["image"][0, 0, 0, 0] = float("nan")


class ZeroStd(Callback):
    """Sets the first channel's normalisation std of a model to 0 when the fit starts: what a
    zero std set on the Backbone directly does, past the config's validation. `model` is a
    teacher's name or 'student'."""

    def __init__(self, model: str) -> None:
        self.model = model

    def on_fit_start(self, trainer, pl_module) -> None:
        target = (
            pl_module.student
            if self.model == "student"
            else pl_module.teachers.teachers[self.model]
        )
        target.std[0, 0] = 0.0
