"""`python -m amalgam.amalgamate experiment=<name>`: amalgamate teachers into a student."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from amalgam import report
from amalgam.build import build_amalgamation
from amalgam.evaluation import evaluate, model_stats
from amalgam.launch import (
    check_launch,
    make_loggers,
    method_name,
    resume_checkpoint,
    variant_name,
    wandb_id,
)
from amalgam.module import AmalgamModule
from amalgam.teachers.cache import open_or_build
from amalgam.utils import CONF_DIR, finish_loggers, instantiate_group, log, quiet_known_warnings


def final_report(
    module: AmalgamModule, dm: Any, out_dir: Path, extra: dict[str, Any], loggers: list[Any] = ()
) -> dict[str, Any]:
    """Evaluate student and teachers on the test split; write, print and log the report."""
    device = module.device
    results = evaluate(module.student, module.teachers, dm.test_dataloader(), module.space, device)
    results |= model_stats(module.student, module.teachers, dm.image_size, dm.channels, device)
    results |= extra
    paths = report.write(results, out_dir)
    report.show(results)
    report.log_to(list(loggers), results, paths["png"])
    log.info("results written to %s", paths["json"])
    return results


def attach_cache(cfg: DictConfig, dm: Any, module: AmalgamModule) -> None:
    """With teacher_cache.enabled, teachers run once over the pool instead of every step."""
    tc = cfg.get("teacher_cache")
    if not tc or not tc.get("enabled") or not module.method.uses_teachers:
        return
    views = {}
    if dm.augment:  # K fixed augmented views per image, replayed to the student
        dm.use_cached_views(int(tc.get("views", 4)))
        views = {"view_table": dm.view_table(), "view_fn": dm.apply_view}
    module.cache_spec = functools.partial(
        open_or_build,
        tc.dir,
        module.teachers,
        dm.cache_key(),
        dm.indices("train"),
        dm.pool_dataloader,
        **views,
    )


def amalgamate(cfg: DictConfig) -> dict[str, Any]:
    """Train the student on unlabeled images; evaluate and report on rank 0."""
    quiet_known_warnings()
    check_launch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    resume_from = resume_checkpoint(cfg)
    dm, module = build_amalgamation(cfg)
    attach_cache(cfg, dm, module)
    variant = variant_name(cfg)
    loggers = make_loggers(cfg, variant, resume_from)
    module.record["wandb_id"] = wandb_id(loggers)
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    start = time.time()
    failed = True
    try:
        train = (
            dm.labeled_train_dataloader() if module.method.uses_labels else dm.train_dataloader()
        )
        trainer.fit(module, train, dm.val_dataloader(), ckpt_path=resume_from)
        ckpt = out_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        results: dict[str, Any] = {}
        if trainer.is_global_zero:
            extra = {
                "method": method_name(cfg),
                "variant": variant,
                "uses_labels": bool(module.method.uses_labels),
                "seed": int(cfg.seed),
                "student_arch": str(cfg.student.arch),
                "teacher_archs": {n: m.arch for n, m in module.teachers.metas.items()},
                "teacher_hashes": module.teachers.hashes(),
                "epochs": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "world_size": int(trainer.world_size),
                "resumed_from": str(resume_from) if resume_from else None,
                "train_seconds": round(time.time() - start, 1),
                "checkpoint": str(ckpt),
            }
            results = final_report(module, dm, out_dir, extra, loggers)
        failed = False
    finally:
        finish_loggers(loggers, failed)
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="amalgamate")
def main(cfg: DictConfig) -> None:
    amalgamate(cfg)


if __name__ == "__main__":
    main()
