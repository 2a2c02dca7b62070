"""What a run prints: the composed config as a tree at the start, then a log line per epoch (and
per N steps) with the loss terms, throughput and ETA.

The lines go through Python logging (logger "amalgam"), so they reach Hydra's console and its
log file, and a SLURM `.out` file or a redirected `make demo`, where a progress bar shows
nothing. The rich progress bar is kept for a terminal (`console.progress_bar: auto`).
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from amalgam.files import atomic_write_text

log = logging.getLogger("amalgam")
CONFIG_TREE = "config_tree.log"
# the config's groups first, in the order a reader looks for them; the other keys follow
TREE_ORDER = (
    "experiment",
    "data",
    "teacher_set",
    "student",
    "method",
    "targets",
    "optim",
    "trainer",
    "teacher_cache",
    "callbacks",
    "logger",
    "paths",
)


def config_tree(cfg: DictConfig | Mapping[str, Any], order: Sequence[str] = TREE_ORDER) -> Any:
    """The config as a rich Tree: one branch per top-level key, each group as YAML."""
    from rich.syntax import Syntax
    from rich.tree import Tree

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    tree = Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    scalars = {}
    for key in keys:
        node = "???" if OmegaConf.is_missing(cfg, key) else cfg[key]
        if OmegaConf.is_config(node):
            try:
                text = OmegaConf.to_yaml(node, resolve=True)
            except Exception:  # an interpolation only a Hydra run resolves: show it as written
                text = OmegaConf.to_yaml(node)
            tree.add(str(key), style="bold").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
        else:
            scalars[str(key)] = node
    if scalars:
        text = "\n".join(f"{k}: {v}" for k, v in scalars.items())
        tree.add("(top level)", style="bold").add(Syntax(text, "yaml", theme="ansi_dark"))
    return tree


@rank_zero_only
def show_config(
    cfg: DictConfig | Mapping[str, Any], out_dir: str | Path | None, echo: bool = True
) -> Path | None:
    """Save the config tree as `<out_dir>/config_tree.log` (plain text) and print it."""
    from rich.console import Console

    tree = config_tree(cfg)
    path = None
    if out_dir is not None:
        buf = io.StringIO()
        Console(file=buf, width=100, color_system=None, soft_wrap=True).print(tree)
        path = Path(out_dir) / CONFIG_TREE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, buf.getvalue())
    if echo:
        Console(file=sys.stdout, soft_wrap=True).print(tree)
    return path


def want_progress_bar(setting: Any, stream: Any = None) -> bool:
    """`console.progress_bar`: true | false | auto (a bar only when stdout is a terminal)."""
    if isinstance(setting, bool):
        return setting
    if str(setting).lower() in ("true", "false"):
        return str(setting).lower() == "true"
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """`3725` -> `1h02m05s`, `65` -> `1m05s`, `4.2` -> `4s`."""
    s = round(max(0.0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = batch.get("image")
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix) :]] = float(v)
            except (TypeError, ValueError):
                continue
    return out


class ConsoleLog(L.Callback):
    """One log line per training epoch, and one per `every_n_steps` optimizer steps if set:

        epoch 2/5 step 240/600 | loss 1.234 kd 0.812 mmd 0.301 rec 0.121 | val joint_acc 0.8123 |
        412 img/s | 1m12s elapsed, ETA 1m48s

    The loss terms are the ones the module last logged (every `trainer.log_every_n_steps`);
    throughput counts the images of the batches since the previous line; the ETA extrapolates
    the steps still to run (`trainer.estimated_stepping_batches`) at this fit's mean step time.
    Rank 0 only.
    """

    def __init__(self, every_n_steps: int | None = None, logger: str = "amalgam") -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(
                f"console.every_n_steps={every_n_steps}: give a positive number of steps, or "
                "null for one line per epoch"
            )
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.logger = logging.getLogger(logger)
        self._start = self._last = 0.0
        self._first_step = 0
        self._images = 0
        self._rate: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first_step = int(trainer.global_step)
        self._images = 0
        if trainer.is_global_zero:
            total = self._total(trainer)
            self.logger.info(
                "training: %s optimizer steps%s, %s per epoch",
                total if total is not None else "?",
                f" from step {self._first_step}" if self._first_step else "",
                trainer.num_training_batches,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self._images += _batch_size(batch)
        n = self.every_n_steps
        if n and trainer.is_global_zero and trainer.global_step % n == 0:
            self.logger.info(self.line(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.logger.info(self.line(trainer, val=True))

    @staticmethod
    def _total(trainer: L.Trainer) -> int | None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:
            return None
        return int(total) if total not in (None, float("inf")) else None

    def line(self, trainer: L.Trainer, val: bool = False) -> str:
        now = time.perf_counter()
        step, total = int(trainer.global_step), self._total(trainer)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        parts = [
            f"epoch {trainer.current_epoch + 1}/{epochs} step {step}/{total if total else '?'}"
        ]
        metrics = trainer.callback_metrics
        terms = _scalars(metrics, "train/")
        if terms:
            loss = terms.pop("loss", None)
            shown = ([f"loss {loss:.4g}"] if loss is not None else []) + [
                f"{k} {v:.4g}" for k, v in terms.items()
            ]
            parts.append(" ".join(shown))
        if val:
            vals = _scalars(metrics, "val/")
            if vals:
                parts.append("val " + " ".join(f"{k} {v:.4f}" for k, v in sorted(vals.items())))
        dt = now - self._last
        if dt > 0 and self._images:  # else a line at the same step as the last: its rate
            self._rate = self._images / dt
        if self._rate is not None:
            parts.append(f"{self._rate:.0f} img/s")
        elapsed = now - self._start
        done = step - self._first_step
        timing = f"{duration(elapsed)} elapsed"
        if total and done > 0:
            timing += f", ETA {duration(elapsed / done * max(0, total - step))}"
        parts.append(timing)
        self._last, self._images = now, 0
        return " | ".join(parts)


def console_settings(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's `console:` block, with its defaults."""
    block = (cfg or {}).get("console") if cfg is not None else None
    block = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else block
    out = {"progress_bar": "auto", "every_n_steps": None, "config_tree": True, "log_lines": True}
    out.update(dict(block or {}))
    return out


def console_callbacks(
    callbacks: list[Any], settings: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The run's callbacks as the console settings want them, and the Trainer arguments that go
    with them: without a progress bar, the bar callbacks are dropped and the Trainer told
    `enable_progress_bar=False` (else Lightning adds its tqdm bar); the log lines are a
    ConsoleLog unless one is given already."""
    from lightning.pytorch.callbacks import ProgressBar

    kwargs = trainer_kwargs(settings)
    if "enable_progress_bar" in kwargs:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if settings.get("log_lines", True) and not any(isinstance(c, ConsoleLog) for c in callbacks):
        callbacks = [*callbacks, ConsoleLog(settings.get("every_n_steps"))]
    return callbacks, kwargs


def trainer_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The Trainer arguments the console settings ask for: without a progress bar,
    `enable_progress_bar=False` (else Lightning adds its tqdm bar)."""
    if want_progress_bar(settings.get("progress_bar", "auto")):
        return {}
    return {"enable_progress_bar": False}
