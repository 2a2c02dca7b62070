"""`python -m amalgam.train_teacher teacher=<name>`: train a teacher on its task and export it."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from amalgam.backbone import (
    Backbone,
    check_init,
    create_timm,
    data_config,
    offline_arch,
    pretrained_source,
)
from amalgam.build import build_datamodule
from amalgam.classifier import ClassifierModule
from amalgam.console import console_callbacks, console_settings, show_config
from amalgam.launch import log_hyperparams, one_line_errors
from amalgam.provenance import provenance
from amalgam.teachers.io import TeacherMeta, export_teacher, init_from_file
from amalgam.utils import (
    CONF_DIR,
    finish_loggers,
    instantiate_group,
    log,
    quiet_known_warnings,
    to_dict,
)
from amalgam.validate import validate_teacher_training


def init_record(arch: str, pretrained: bool) -> dict[str, str]:
    """meta.extra's record of where a teacher's initial weights came from."""
    if not pretrained:
        return {"init": "random"}
    kind, where, _ = pretrained_source(arch, "teacher.arch")
    if kind == "hf-hub":
        return {"init": f"hf-hub:{where}"}
    return {"init": f"{kind}:{where}" if kind == "local-dir" else where}


def train_teacher(cfg: DictConfig) -> Path:
    """Train `cfg.teacher` on its task with labels; export safetensors + metadata."""
    quiet_known_warnings()
    validate_teacher_training(cfg)  # before any image is read
    L.seed_everything(cfg.seed, workers=True)
    t = cfg.teacher
    name = str(t.name)
    check_init(t, "teacher", "init_weights")
    pretrained = bool(t.get("pretrained", False))
    # classes given: the model first (the random init after the seed, as always); none (the
    # data set's every class): the head's size is known once the data is
    dm = None if t.classes else build_datamodule(cfg.data, {name: None})
    model = create_timm(
        t.arch,
        len(t.classes) if t.classes else len(dm.label_space.task(name).classes),
        t.in_chans,
        "teacher.arch",
        pretrained=pretrained,
        **(to_dict(t.model_kwargs) or {}),
    )
    init = init_record(str(t.arch), pretrained)
    if t.get("init_weights"):
        got = init_from_file(
            model, str(t.init_weights), str(t.get("init_key_map") or "name"), "teacher.init_weights"
        )
        init = {"init": got["file"], "init_sha256": got["sha256"], "init_key_map": got["key_map"]}
    # the exported arch rebuilds with timm alone, offline (no hub, no local dir needed)
    arch, arch_kwargs = offline_arch(str(t.arch), model, "teacher.arch")
    if dm is None:
        dm = build_datamodule(cfg.data, {name: list(t.classes)})
    classes = list(dm.label_space.task(name).classes)
    dm.use_data_config(data_config(model))  # timm mode: the teacher's crop and interpolation
    net = Backbone(
        model,
        t.in_chans,
        t.input_size,
        t.mean,
        t.std,
        feature_indices=(),
        channels_last=bool(cfg.get("channels_last", False)),
    )
    module = ClassifierModule(
        net, len(classes), to_dict(cfg.optim), cfg.get("label_smoothing", 0.0)
    )
    settings = console_settings(cfg)
    out_dir = cfg.paths.get("output_dir") if "paths" in cfg else None
    if settings["log_lines"]:
        log.info("run dir: %s", out_dir)
    if settings["config_tree"]:
        show_config(cfg, out_dir, echo=bool(settings["log_lines"]))
    loggers = instantiate_group(cfg.get("logger"))
    log_hyperparams(loggers, to_dict(cfg))
    callbacks, trainer_kwargs = console_callbacks(instantiate_group(cfg.get("callbacks")), settings)
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, **trainer_kwargs
    )
    start = time.time()
    try:
        trainer.fit(module, dm.task_dataloader(name, "train"), dm.task_dataloader(name, "val"))
        test = trainer.test(module, dm.task_dataloader(name, "test"), verbose=False)
        acc = float(test[0]["test/acc"]) if test else None
        mean, std = net.norm
        meta = TeacherMeta(
            name=name,
            arch=arch,
            classes=classes,
            in_chans=int(t.in_chans),
            input_size=int(t.input_size or dm.image_size),
            mean=mean,
            std=std,
            model_kwargs={**arch_kwargs, **(to_dict(t.model_kwargs) or {})},
            test_acc=acc,
            data=dm.source.name,
            extra={
                **init,
                **({"arch_given": str(t.arch)} if arch != str(t.arch) else {}),
                "data_config": data_config(net.model),  # timm's, for the pretrained weights
                "epochs": int(trainer.current_epoch),
                "seed": int(cfg.seed),
                "train_seconds": round(time.time() - start, 1),
                "provenance": provenance(),
            },
        )
        overwrite = bool(cfg.get("overwrite", False))
        path = export_teacher(net.model, meta, path=Path(str(t.weights)), overwrite=overwrite)
    finally:
        finish_loggers(loggers)
    log.info(
        "teacher '%s' (%s): test accuracy %.4f on %d classes -> %s",
        name,
        t.arch,
        acc or float("nan"),
        len(classes),
        path,
    )
    print(f"teacher {name} ({t.arch}) test_acc={acc:.4f} -> {path}")
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_teacher")
@one_line_errors
def main(cfg: DictConfig) -> None:
    train_teacher(cfg)


if __name__ == "__main__":
    main()
