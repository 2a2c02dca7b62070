"""`python -m amalgam.amalgamate experiment=<name>`: amalgamate teachers into a student.

The CLI and the Python API share one code path: `Amalgamation.from_config(cfg).fit()`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from amalgam.api import Amalgamation, attach_cache, final_report
from amalgam.errors import ConfigError
from amalgam.launch import one_line_errors
from amalgam.utils import CONF_DIR

__all__ = ["amalgamate", "attach_cache", "final_report", "main", "objective"]


def amalgamate(cfg: DictConfig) -> dict[str, Any]:
    """Train the student on unlabeled images; evaluate and report on rank 0."""
    return Amalgamation.from_config(cfg).fit()


def objective(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The value a sweeper optimises: results["val"][<key>] for `optimized_metric: val/<key>`.

    None without `optimized_metric` (or on ranks other than 0, which report nothing).
    """
    name = cfg.get("optimized_metric")
    if not name or not results:
        return None
    name = str(name)
    val = results.get("val") or {}
    if not name.startswith("val/"):
        raise ConfigError(
            f"optimized_metric='{name}': a search optimises a validation metric, never the test "
            f"split; choose one of {[f'val/{k}' for k in val] or ['val/task_mean_acc']}"
        )
    if name[4:] not in val:
        why = (
            f"the run logged {[f'val/{k}' for k in val]}"
            if val
            else "validation never ran (trainer.limit_val_batches=0 or no val epoch)"
        )
        raise ConfigError(
            f"optimized_metric='{name}' is not among the run's validation metrics: {why}; "
            "set optimized_metric to one of them, and let validation run"
        )
    return float(val[name[4:]])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="amalgamate")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return objective(cfg, amalgamate(cfg))


if __name__ == "__main__":
    main()
