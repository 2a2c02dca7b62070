"""A test-only Lightning callback that hard-kills the run (SIGKILL) at a given step.

It kills the whole process group, helpers such as wandb's service included, the way a cluster
kills a preempted job; the test starts the run in a session of its own.
"""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)
