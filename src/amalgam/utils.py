"""Small helpers shared by the entry points: config dir, loggers, callbacks, warnings."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = os.environ.get("AMALGAM_CONF", str(Path(__file__).resolve().parents[2] / "conf"))
log = logging.getLogger("amalgam")


def to_dict(cfg: Any) -> Any:
    """A DictConfig as plain containers, interpolations resolved; anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def package_file(package: str, relative: str) -> str:
    """`${pkg_file:package,path}`: a file shipped inside an installed Python package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package '{package}' is not installed: pip install {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"package '{package}' has no file '{relative}'")
    return str(path)


def imagenet_classes() -> Any:
    """`${imagenet_classes:}`: the 1000 ImageNet-1k class ids (WordNet ids, timm's order)."""
    from timm.data import ImageNetInfo

    return OmegaConf.create(list(ImageNetInfo().label_names()))  # a resolver returns a node


def nearest_existing(p: Path) -> Path:
    """`p`, or its nearest ancestor that exists."""
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (alive, or ours to not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def dir_name(name: str, limit: int = 120) -> str:
    """`${dir_name:...}`: a string made safe as ONE directory name (a sweep job's subdir).

    Hydra names a job's dir after its overrides; a path value (`paths.teachers_dir=/x/y`) would
    nest directories and a long override list exceed the file system's 255-byte names. Path
    separators become '_', and a name over `limit` characters keeps its head and a hash of all.
    """
    return shorten(str(name).replace("/", "_").replace("\\", "_"), limit)


def shorten(text: str, limit: int) -> str:
    """`text` within `limit` characters: as it is, or its head and a hash of all of it (so two
    long names that share a head stay apart)."""
    import hashlib

    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11]}-{digest}"


def slurm_tasks(devices: Any) -> int:
    """`${slurm_tasks:${trainer.devices}}`: SLURM tasks per node for Lightning's SLURM
    environment, one per device. 'auto', -1 or a device list cannot be counted before the job
    lands on a node, so they are refused here, at composition."""
    if isinstance(devices, bool) or not isinstance(devices, int | str):
        raise ValueError(
            f"trainer.devices={devices!r}: with hydra/launcher=slurm give a device count (e.g. "
            "trainer.devices=4); SLURM's tasks_per_node and gpus_per_node are set from it"
        )
    try:
        n = int(devices)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(
            f"trainer.devices={devices!r}: with hydra/launcher=slurm give a device count (e.g. "
            "trainer.devices=4); SLURM's tasks_per_node and gpus_per_node are set from it"
        )
    return n


def slurm_gpus(accelerator: Any, devices: Any) -> int:
    """`${slurm_gpus:${trainer.accelerator},${trainer.devices}}`: GPUs per node to ask SLURM
    for: one per device, none for a CPU trainer."""
    return 0 if str(accelerator) == "cpu" else slurm_tasks(devices)


OmegaConf.register_new_resolver("slurm_tasks", slurm_tasks, replace=True)
OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus, replace=True)
OmegaConf.register_new_resolver("pkg_file", package_file, replace=True)
OmegaConf.register_new_resolver("dir_name", dir_name, replace=True)
OmegaConf.register_new_resolver("imagenet_classes", imagenet_classes, replace=True)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence warnings that are expected by design (frozen teachers in eval mode, ...)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    for pattern in (
        r".*module\(s\) in eval mode.*",
        r".*does not have many workers.*",
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` in a dict-shaped config group."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def finish_loggers(loggers: list[Any], failed: bool = False) -> None:
    """Close every logger; a wandb run is always finished so sweep jobs never merge."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)
        elif hasattr(lg, "finalize"):
            try:
                lg.finalize("failed" if failed else "success")
            except Exception:
                log.exception("logger %s failed to finalise", type(lg).__name__)
