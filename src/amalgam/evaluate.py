"""`python -m amalgam.evaluate ckpt_path=...`: rebuild a student checkpoint and report on it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from amalgam.amalgamate import final_report
from amalgam.build import build_amalgamation, to_dict
from amalgam.launch import method_name, one_line_errors
from amalgam.module import AmalgamModule
from amalgam.tasks import ConfigError
from amalgam.teachers.io import torch_load_safely
from amalgam.trust import check_untrusted_config, trust_list
from amalgam.utils import CONF_DIR, quiet_known_warnings


def read_checkpoint(path: str | Path, trust_targets: Iterable[str] = ()) -> dict[str, Any]:
    """A student checkpoint of amalgam.amalgamate, loaded with weights_only=True.

    Its amalgam record (stored config, teacher metadata) is untrusted data: every `_target_`
    in it must be on amalgam's allow-list (`amalgam.trust`) or in `trust_targets`.
    """
    path = Path(path)
    hint = "pass <run dir>/checkpoints/final.ckpt (or last.ckpt) of an amalgam.amalgamate run"
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{path}' not found: {hint}")
    ckpt = torch_load_safely(path, "checkpoint", f"Give {hint[5:]}.")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("amalgam"), dict):
        raise ConfigError(
            f"checkpoint '{path}' was not written by amalgam.amalgamate (no 'amalgam' record): "
            f"{hint}"
        )
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"checkpoint '{path}' holds no state_dict: {hint}")
    check_untrusted_config(ckpt["amalgam"], f"checkpoint '{path}'", trust_targets, "amalgam")
    return ckpt


def load_amalgamation(
    ckpt_path: str | Path,
    overrides: dict[str, Any] | None = None,
    trust_targets: Iterable[str] = (),
) -> tuple[DictConfig, Any, AmalgamModule]:
    """(config, datamodule, eval-mode module) rebuilt from a checkpoint; teachers hash-checked.

    `overrides` come from the caller (trusted); the stored config is checked by read_checkpoint.
    """
    ckpt = read_checkpoint(ckpt_path, trust_targets)
    rec = ckpt["amalgam"]
    cfg = OmegaConf.create(rec["config"])
    for name, t in rec["teachers"].items():
        cfg.teacher_set[name].weights = t["path"]
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    # the checkpoint holds the rules' statistics and every student tensor
    dm, module = build_amalgamation(cfg, fit_rules=False, init_student=False)
    hashes = module.teachers.hashes()
    for name, t in rec["teachers"].items():
        if hashes[name] != t["meta"]["sha256"]:
            raise ConfigError(
                f"teacher '{name}' at '{t['path']}' has changed since the checkpoint was written "
                f"(hash {hashes[name][:12]} != {t['meta']['sha256'][:12]})"
            )
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("teachers.")]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.eval()
    return cfg, dm, module


def evaluate_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    trust_targets: Iterable[str] = (),
) -> dict[str, Any]:
    """Rebuild teachers (hash-checked), student and method from a checkpoint; evaluate."""
    quiet_known_warnings()
    cfg, dm, module = load_amalgamation(ckpt_path, overrides, trust_targets)
    hashes = module.teachers.hashes()
    extra = {
        "method": method_name(cfg),
        "seed": int(cfg.seed),
        "checkpoint": str(ckpt_path),
        "student_arch": str(cfg.student.arch),
        "teacher_hashes": hashes,
    }
    out = Path(out_dir) if out_dir else Path(ckpt_path).parent.parent / "eval"
    return final_report(module, dm, out, extra)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    overrides = OmegaConf.to_container(cfg.overrides) if cfg.get("overrides") else None
    trusted = trust_list(to_dict(cfg.get("trust_targets")))
    evaluate_checkpoint(cfg.ckpt_path, cfg.get("output_dir"), overrides, trusted)


if __name__ == "__main__":
    main()
