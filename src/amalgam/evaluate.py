"""`python -m amalgam.evaluate ckpt_path=...`: rebuild a student checkpoint and report on it.

The same path as the Python API: `Amalgamation.load(ckpt_path).evaluate(out_dir)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from amalgam.api import Amalgamation
from amalgam.launch import one_line_errors
from amalgam.trust import trust_list
from amalgam.utils import CONF_DIR, log, to_dict


def evaluate_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    trust_targets: Iterable[str] = (),
) -> dict[str, Any]:
    """Rebuild teachers (hash-checked), student and method from a checkpoint; evaluate on the
    test split; write results.* to `out_dir` (default: <run dir>/eval) and print the table."""
    am = Amalgamation.load(ckpt_path, overrides, list(trust_targets))
    out = Path(out_dir) if out_dir else Path(ckpt_path).parent.parent / "eval"
    results = am.evaluate(out, show=True)
    log.info("results written to %s", out / "results.json")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    overrides = OmegaConf.to_container(cfg.overrides) if cfg.get("overrides") else None
    trusted = trust_list(to_dict(cfg.get("trust_targets")))
    evaluate_checkpoint(cfg.ckpt_path, cfg.get("output_dir"), overrides, trusted)


if __name__ == "__main__":
    main()
