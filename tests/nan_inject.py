"""A test-only callback that makes one loss term NaN at one global step (tests/test_reliability.py).

It multiplies the term by NaN inside the graph, so the gradients of everything that feeds the
term are NaN too, as after a real overflow.
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
