"""What a run knows about how it was launched: its variant name, loggers, resume, DDP checks."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from amalgam.build import to_dict
from amalgam.tasks import ConfigError
from amalgam.utils import log
from amalgam.validate import check_checkpoint, check_run_dirs


def hydra_mode() -> RunMode | None:
    return HydraConfig.get().mode if HydraConfig.initialized() else None


def method_name(cfg: DictConfig) -> str:
    """The method's `name` in its config, else its class name."""
    return str(cfg.method.get("name") or cfg.method._target_.rsplit(".", 1)[-1])


def variant_name(cfg: DictConfig) -> str:
    """The job's overrides minus seed & co. (Hydra's override_dirname), else the method name."""
    if HydraConfig.initialized():
        name = HydraConfig.get().job.override_dirname
        if name:
            return str(name)
    return method_name(cfg)


def check_launch(cfg: DictConfig) -> None:
    """Refuse a DDP trainer that would spawn children inside a Hydra multirun (STACK.md), and
    directories the run cannot write."""
    check_run_dirs(cfg)
    t = cfg.trainer
    strategy = str(t.get("strategy", "auto"))
    devices = t.get("devices", 1)
    many = str(devices) not in ("1", "None") or int(t.get("num_nodes", 1) or 1) > 1
    spawns_children = strategy.startswith("ddp") and "spawn" not in strategy and many
    if hydra_mode() == RunMode.MULTIRUN and spawns_children and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.strategy={strategy} with devices={devices} inside a Hydra multirun: "
            "Lightning would start child processes that re-run the whole sweep. On a cluster use "
            "hydra/launcher=slurm with tasks_per_node = trainer.devices (one SLURM task per "
            "device); locally run the jobs one by one, or use trainer.strategy=ddp_spawn"
        )


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: ckpt_path, or <run dir>/checkpoints/last.ckpt for 'last'.

    It is read safely (tensors only) and must come from this run's teacher set.
    """
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if str(ckpt) == "last":
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
    else:
        path = Path(str(ckpt))
        if not path.is_file():
            raise ConfigError(f"ckpt_path '{ckpt}' not found: give a checkpoint file, or 'last'")
    check_checkpoint(path, to_dict(cfg.get("teacher_set")) or {})
    return path


class ResumeState(NamedTuple):
    """What a resume needs from its checkpoint besides the weights Lightning restores."""

    step: int  # the global step it resumes at
    wandb_id: str | None
    rule_fitted: bool  # holds a fitted target rule's statistics (then the resume skips the fit)


@functools.lru_cache(maxsize=4)
def _resume_state(path: str, mtime_ns: int, size: int) -> ResumeState:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", {})
    return ResumeState(
        step=int(ckpt["global_step"]),
        wandb_id=(ckpt.get("amalgam") or {}).get("wandb_id"),
        rule_fitted=any(k.endswith("targets.fitted") and bool(v) for k, v in sd.items()),
    )


def resume_state(ckpt: Path) -> ResumeState:
    """Read once per file version (keyed by path, mtime and size), however many parts of the
    launch ask: the loggers (step, wandb id) and the build (whether to fit the rule)."""
    st = os.stat(ckpt)
    return _resume_state(str(ckpt), st.st_mtime_ns, st.st_size)


def wandb_id_of(ckpt: Path | None) -> str | None:
    return None if ckpt is None else resume_state(ckpt).wandb_id


def rule_fitted_in(ckpt: Path) -> bool:
    """Whether a checkpoint holds a fitted target rule's statistics (a resume then skips the fit:
    Lightning restores them into the rebuilt rule before the first step)."""
    return resume_state(ckpt).rule_fitted


def step_of(ckpt: Path) -> int:
    """The global step a checkpoint resumes at."""
    return resume_state(ckpt).step


def make_loggers(cfg: DictConfig, variant: str, resume_from: Path | None) -> list[Any]:
    """Instantiate the logger group; wandb runs are grouped by variant and resume their id."""
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if not lcfg or "_target_" not in lcfg:
            continue
        kwargs: dict[str, Any] = {}
        if str(lcfg._target_).endswith("WandbLogger"):
            if not lcfg.get("group"):
                kwargs["group"] = f"{cfg.task_name}/{variant}"
            if not lcfg.get("name"):
                kwargs["name"] = f"{variant}/seed{cfg.seed}"
            run_id = wandb_id_of(resume_from)
            if run_id:
                kwargs |= {"id": run_id, "resume": "allow"}
                log.info("resuming wandb run %s", run_id)
        if lcfg._target_ == "amalgam.reliability.CSVLogger" and resume_from is not None:
            kwargs["resume_step"] = step_of(resume_from)  # keep the rows logged before it
        loggers.append(hydra.utils.instantiate(lcfg, **kwargs))
    return loggers


def wandb_id(loggers: list[Any]) -> str | None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            return str(lg.experiment.id)  # starts the run now, so the id is known
    return None
