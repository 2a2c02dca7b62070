import os
import tempfile
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from amalgam.utils import CONF_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# the image-folder check's cache (amalgam.data.verify) goes under the test session's tmp dir
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="amalgam-test-cache-")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def make_cfg(
    name: str, overrides: list[str], root: Path, output_dir: Path | None = None
) -> DictConfig:
    """Compose `conf/<name>.yaml` with overrides; all paths under `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=[f"paths.root_dir={root}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or root / "out")
    return cfg


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> Path:
    """Train the two tiny test teachers once per session; returns the root dir."""
    from amalgam.train_teacher import train_teacher

    root = tmp_path_factory.mktemp("tiny")
    for name in ("tiny_a", "tiny_b"):
        cfg = make_cfg(
            "train_teacher",
            [
                f"teacher={name}",
                "experiment=tiny_teachers",
                "logger=none",
                "callbacks=none",
                "+trainer.enable_progress_bar=false",
            ],
            root,
            root / f"out_{name}",
        )
        train_teacher(cfg)
    return root
