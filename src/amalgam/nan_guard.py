"""NaN guard: a non-finite loss term or gradient stops the run before the optimizer step
(`NonFiniteError`, naming the terms and the step) or skips that step; no checkpoint with
non-finite weights is ever written. A stop says the likely cause (data, normalisation, lr).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from amalgam.errors import ConfigError
from amalgam.preemption import Preemption
from amalgam.utils import log


class NonFiniteError(RuntimeError):
    """A loss term or gradient was NaN/inf; the weights were not updated with it."""


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 0-d bool tensor (on the tensors' device, no host sync): every element is finite.

    Per tensor one reduction (a fused `_foreach_norm` where available): a 1-norm is NaN/inf iff
    an element is (fp16 tensors, whose norm could overflow, are tested element-wise).
    """
    tensors = [t for t in tensors if t.is_floating_point() or t.is_complex()]  # ints: finite
    if not tensors:
        return torch.tensor(True)
    half = [t for t in tensors if t.dtype == torch.float16]
    rest = [t for t in tensors if t.dtype != torch.float16 and not t.is_sparse]
    parts: list[torch.Tensor] = [torch.isfinite(t).all().reshape(1) for t in half]
    if rest:
        try:
            norms = torch._foreach_norm(rest, 1)
        except (AttributeError, RuntimeError, TypeError):
            norms = [torch.linalg.vector_norm(t, 1) for t in rest]
        device = norms[0].device
        parts.append(torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()[None])
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts]).all()


class NanGuard(Callback):
    """Non-finite loss terms or gradients stop the run (`action="stop"`) or skip the step.

    The loss terms come from the module's `method` (a forward hook keeps the detached terms of
    the training step; other modules: the summed loss), the gradients from the optimizer, both
    checked in `on_before_optimizer_step`, i.e. after backward and before the weights change.

    - stop: `NonFiniteError` naming the non-finite terms, the parameters with non-finite
      gradients and the global step; the weights, last.ckpt and every checkpoint stay finite.
      The message names the cause and its fix: the data (non-finite images, a model's
      normalisation std with a 0: `teacher_set.<name>.std`, `student.std`, a teacher's
      non-finite outputs), the loss at global step 0 (no update yet: not the learning rate),
      else the optimisation (a lower `optim.lr`). It suggests a resume only when a last
      checkpoint exists on disk.
    - skip: the step's gradients are dropped (the optimizer leaves the weights and its state
      alone; the LR schedule still advances), `skipped` counts them (logged as
      `train/skipped_steps`, kept in checkpoints).

    The check is one fused all-finite reduction and one host read. On CPU that costs nothing
    noticeable and runs every step. On an accelerator the read is a sync per step, so by default
    (`every_n_steps=None`) it runs every `trainer.log_every_n_steps` steps there (the steps that
    sync for logging anyway) and every step in skip mode; `every_n_steps=1` checks every step
    everywhere. A non-finite step between checks can reach the weights, but never a checkpoint:
    `on_save_checkpoint` refuses to write non-finite weights (one check per save). Under
    `16-mixed` precision the GradScaler owns gradient overflow (it skips those steps itself), so
    only the loss terms are checked.
    """

    def __init__(
        self, action: str = "stop", every_n_steps: int | None = None, check_grads: bool = True
    ) -> None:
        if action not in ("stop", "skip"):
            raise ConfigError(
                f"callbacks.nan_guard.action='{action}': choose stop (end the run, keep the last "
                "good checkpoint) or skip (drop the step's gradients and go on)"
            )
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ConfigError(
                f"callbacks.nan_guard.every_n_steps={every_n_steps}: give an integer >= 1, or "
                "null for the default (every step on CPU and in skip mode)"
            )
        self.action = action
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.check_grads = bool(check_grads)
        self.skipped = 0
        self._every = 1
        self._terms: dict[str, torch.Tensor] | None = None
        self._records: list[dict[str, torch.Tensor]] = []
        self._images: list[torch.Tensor] = []  # the step's batch images, for the diagnosis
        self._hook: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ---------------------------------------------------------------- collecting the terms

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is not None:
            self._every = self.every_n_steps
        elif self.action == "skip" or trainer.strategy.root_device.type == "cpu":
            self._every = 1
        else:
            self._every = max(1, int(trainer.log_every_n_steps))
        self._records, self._terms, self._images = [], None, []
        method = getattr(pl_module, "method", None)
        if isinstance(method, nn.Module) and self._hook is None:
            self._hook = method.register_forward_hook(self._keep_terms)

    def _keep_terms(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and isinstance(output, Mapping):
            self._terms = {
                str(k): v.detach() for k, v in output.items() if isinstance(v, torch.Tensor)
            }

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = _images_of(batch)  # a reference, no copy: the batch lives until the step anyway
        if x is not None:
            self._images.append(x)

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        self._records.append(self._terms or {"loss": loss.detach()})
        self._terms = None

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._records, self._terms, self._images = [], None, []

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unhook()
        if self.skipped and trainer.is_global_zero:
            log.warning("nan_guard skipped %d step(s) with non-finite values", self.skipped)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._unhook()

    # ---------------------------------------------------------------- the check

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        records, self._records = self._records, []
        images, self._images = self._images, []
        step = trainer.global_step
        if step % self._every:
            return
        values = [v for rec in records for v in rec.values()]
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params] if self.check_grads and not _scaler(trainer) else []
        bad = not bool(all_finite([*values, *grads]))  # the one host sync
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        what = _describe(records, params if grads else [], pl_module)
        if self.action == "stop":
            last = _last_checkpoint(trainer)
            keep = f"the last good checkpoint is '{last}'" if last else _NO_CHECKPOINT
            late = (
                f" (checked every {self._every} steps: it may have appeared up to "
                f"{self._every - 1} steps earlier)"
                if self._every > 1
                else ""
            )
            cause = _cause(trainer, pl_module, images, step, last)
            raise NonFiniteError(
                f"non-finite values at global step {step}{late}: {what}. The run stopped before "
                f"the optimizer step; {keep}. {cause}"
            )
        for p in params:
            p.grad = None  # the optimizer skips parameters without gradients: no update at all
        self.skipped += 1
        if trainer.is_global_zero:
            log.warning(
                "nan_guard: skipped global step %d (%s); %d skipped so far",
                step,
                what,
                self.skipped,
            )
            for lg in trainer.loggers:
                lg.log_metrics({"train/skipped_steps": float(self.skipped)}, step=step)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        sd = checkpoint.get("state_dict") or {}
        weights = {
            k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
        }
        if not weights or bool(all_finite(list(weights.values()))):
            return
        bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
        last = _last_checkpoint(trainer)
        if last:
            kept = f"the checkpoints already on disk are kept (the last good one is '{last}')"
            lower = f"start afresh with a lower optim.lr {_LR_RESTORED}"
        else:
            kept, lower = _NO_CHECKPOINT, "start afresh with a lower optim.lr"
        raise NonFiniteError(
            f"refusing to write a checkpoint at global step {trainer.global_step}: non-finite "
            f"weights in {_first(bad)}; {kept}. Fix: {lower}, and check every step with "
            "callbacks.nan_guard.every_n_steps=1 (a non-finite step is then stopped before it "
            "reaches the weights)"
        )


def _scaler(trainer: Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _first(names: Sequence[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _describe(
    records: Sequence[Mapping[str, torch.Tensor]],
    params: Sequence[torch.Tensor],
    pl_module: LightningModule,
) -> str:
    """'loss terms mmd=nan (finite: kd=0.51, rec=0.13); gradients non-finite in 3 of 40 ...'."""
    bad: dict[str, str] = {}
    good: dict[str, str] = {}
    for rec in records:
        for k, v in rec.items():
            val = f"{v.float().mean().item():.4g}" if v.numel() else "empty"
            (good if bool(torch.isfinite(v).all()) else bad)[k] = val
    parts = []
    if bad:
        fine = {k: v for k, v in good.items() if k not in bad}
        rest = f" (finite: {', '.join(f'{k}={v}' for k, v in fine.items())})" if fine else ""
        parts.append("loss terms " + ", ".join(f"{k}={v}" for k, v in bad.items()) + rest)
    bad_grads = [p for p in params if not bool(torch.isfinite(p.grad).all())]
    if bad_grads:
        by_id = {id(p): n for n, p in pl_module.named_parameters()}
        parts.append(
            f"gradients non-finite in {len(bad_grads)} of {len(params)} parameter tensors "
            f"({_first([by_id.get(id(p), '?') for p in bad_grads], 3)})"
        )
    return "; ".join(parts) or "non-finite values"


# ------------------------------------------------------------------------------ NaN diagnosis

_NO_CHECKPOINT = "no checkpoint was written yet, so there is nothing to resume"
_LR_RESTORED = "(a resume restores the checkpoint's optimizer, its learning rate included)"
_NOT_THE_LR = "lowering optim.lr will not help"


def _images_of(batch: Any) -> torch.Tensor | None:
    """The float images of a training batch ({"image": ...}, (images, labels), or a tensor)."""
    if isinstance(batch, Mapping):
        batch = batch.get("image")
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    return batch if isinstance(batch, torch.Tensor) and batch.is_floating_point() else None


def _last_checkpoint(trainer: Any) -> str | None:
    """The run's last checkpoint that exists on disk: a ModelCheckpoint's last one, or the
    `last.ckpt` that it or Preemption writes, or `<root dir>/checkpoints/last.ckpt`."""
    paths: list[str] = []
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, ModelCheckpoint):
            paths.append(cb.last_model_path)
            if cb.dirpath:
                paths.append(os.path.join(cb.dirpath, "last.ckpt"))
        elif isinstance(cb, Preemption):
            paths.append(cb.checkpoint_path(trainer))
    root = getattr(trainer, "default_root_dir", None)
    if root:
        paths.append(os.path.join(root, "checkpoints", "last.ckpt"))
    return next((p for p in paths if p and os.path.isfile(p)), None)


def _models(pl_module: Any) -> list[tuple[str, str, nn.Module]]:
    """(who, config key, model) of the module's teachers and student: models with their own
    input normalisation (`preprocess`, `mean`, `std`), as `amalgam.backbone.Backbone`."""
    bank = getattr(pl_module, "teachers", None)
    teachers = getattr(bank, "teachers", None)
    found = [(f"teacher '{n}'", f"teacher_set.{n}", m) for n, m in (teachers or {}).items()]
    student = getattr(pl_module, "student", None)
    if student is not None:
        found.append(("the student", "student", student))
    return [f for f in found if callable(getattr(f[2], "preprocess", None))]


def _floats(t: Any) -> str:
    values = t.flatten().tolist() if isinstance(t, torch.Tensor) else []
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


@torch.no_grad()
def _data_cause(
    images: Sequence[torch.Tensor], pl_module: Any, context: Any
) -> tuple[str | None, list[str]]:
    """(the data's part in a non-finite step, or None; what was found finite).

    Looks at the step's images, each model's normalised inputs and the teachers' outputs, in
    that order: the first non-finite one is the cause. Run only once a step was non-finite.
    """
    if not images:
        return None, []
    bad = sum(int((~torch.isfinite(x)).sum()) for x in images)
    if bad:
        total = sum(x.numel() for x in images)
        return (
            f"Cause: the data, not the optimisation: {bad} of {total} values of the batch's "
            "images are NaN/inf. Fix: the images (a Source or transform that yields non-finite "
            "pixels): repair or drop them, or set callbacks.nan_guard.action=skip to drop such "
            f"batches; {_NOT_THE_LR}"
        ), []
    checked = ["the batch's images"]
    models = _models(pl_module)
    for who, key, model in models:
        if not all(bool(torch.isfinite(model.preprocess(x)).all()) for x in images):
            return _normalisation_cause(who, key, model), checked
    if models:
        checked.append("every model's normalised inputs")
    teachers = [(who, key, m) for who, key, m in models if key.startswith("teacher_set.")]
    for who, key, model in teachers:
        with context:
            outs = [model(x, features=True) for x in images]
        if not all(bool(all_finite([o.logits, *o.features])) for o in outs):
            return (
                f"Cause: not the optimisation: {who} gives NaN/inf outputs on finite inputs. "
                f"Fix: check its weights ({key}.weights) and teacher_dtype (float16 overflows "
                f"above 65504), then start afresh; {_NOT_THE_LR}"
            ), checked
    if teachers:
        checked.append("the teachers' outputs")
    return None, checked


def _normalisation_cause(who: str, key: str, model: nn.Module) -> str:
    """The data's cause when a model's normalisation turns finite images non-finite."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(std, torch.Tensor) and bool((std == 0).any()):
        why = f"normalises its inputs with std {_floats(std)}, which holds a 0 (x / 0 = inf)"
    else:
        why = f"turns the finite images into NaN/inf (mean {_floats(mean)}, std {_floats(std)})"
    return (
        f"Cause: the data, not the optimisation: {who} {why}, so its normalised inputs are "
        f"NaN/inf. Fix: set {key}.std (and {key}.mean) to the normalisation the model expects, "
        f"finite and with every std > 0, then start afresh; {_NOT_THE_LR}"
    )


def _cause(
    trainer: Trainer, pl_module: Any, images: Sequence[torch.Tensor], step: int, last: str | None
) -> str:
    """The 'Cause: ... Fix: ...' part of the NaN guard's stop message."""
    plugin = getattr(trainer, "precision_plugin", None)
    context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
    data, checked = _data_cause(images, pl_module, context)
    # DDP: one rank's data stops all ranks, and no rank blames the learning rate
    if trainer.strategy.reduce_boolean_decision(data is not None, all=False) and data is None:
        data = (
            "Cause: the data, not the optimisation: another rank's batch or normalised inputs "
            f"are NaN/inf (its message names them); {_NOT_THE_LR}"
        )
    if data is not None:
        return data
    finite = " and ".join([", ".join(checked[:-1]), checked[-1]] if len(checked) > 1 else checked)
    found = f"{finite} are finite" if finite else "the batch's inputs could not be checked"
    if step == 0:
        return (
            f"Cause: not the learning rate: at global step 0 no optimizer step has run yet and "
            f"{found}, so the loss is non-finite on the initial weights. Fix: check "
            "method.weights and the method's settings (e.g. a temperature of 0) and the "
            "student's initialisation, then start afresh"
        )
    if last:
        lower = f"start afresh with a lower optim.lr {_LR_RESTORED}"
        skip = "resume with ckpt_path=last and callbacks.nan_guard.action=skip to drop such steps"
    else:
        lower = "start afresh with a lower optim.lr"
        skip = "set callbacks.nan_guard.action=skip to drop such steps"
    return f"Cause: the optimisation ({found}). Fix: {lower}, or check method.weights; or {skip}"
