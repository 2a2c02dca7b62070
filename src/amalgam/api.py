"""Python API: amalgamate from a notebook, from a composed config or from Python objects.

    cfg = amalgam.compose(["experiment=tiny"], root=".", output_dir="runs/a")
    am = amalgam.Amalgamation.from_config(cfg)
    results = am.fit()            # the dict the CLI writes to results.json
    am.evaluate()                 # the student as it is now, on the test split
    amalgam.load(am.checkpoint_path).evaluate()

`python -m amalgam.amalgamate` runs `Amalgamation.from_config(cfg).fit()`: one code path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from amalgam import report, rundir
from amalgam.backbone import Backbone
from amalgam.build import assemble, spec_from_config, spec_from_objects
from amalgam.checkpoint import StudentCheckpoint, read_checkpoint
from amalgam.checkpoint_io import AtomicCheckpointIO
from amalgam.console import (
    CONFIG_TREE,
    console_callbacks,
    console_settings,
    show_config,
    trainer_kwargs,
)
from amalgam.csv_logger import CSVLogger
from amalgam.errors import ConfigError
from amalgam.evaluation import model_stats
from amalgam.launch import (
    check_launch,
    check_resume,
    checkpoint_bytes,
    claim_run_dir,
    log_artifacts,
    log_hyperparams,
    make_loggers,
    method_name,
    resume_checkpoint,
    rule_fitted_in,
    step_of,
    variant_name,
    wandb_id,
)
from amalgam.methods.base import Method
from amalgam.module import AmalgamModule
from amalgam.provenance import provenance
from amalgam.rundir import check_free_space
from amalgam.teachers.bank import TeacherBank
from amalgam.teachers.cache import open_or_build
from amalgam.utils import (
    CONF_DIR,
    finish_loggers,
    instantiate_group,
    log,
    quiet_known_warnings,
    to_dict,
)
from amalgam.validate import check_checkpoint

PathLike = str | Path
# conf/trainer/default.yaml, for runs built from Python objects
DEFAULT_TRAINER: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": 5,
    "precision": "32-true",
    "log_every_n_steps": 20,
    "deterministic": False,
    "enable_model_summary": False,
}


# ------------------------------------------------------------------------------ configs


def compose(
    overrides: Sequence[str] = (),
    *,
    root: PathLike | None = None,
    output_dir: PathLike | None = None,
    config_name: str = "amalgamate",
    config_dir: PathLike | None = None,
) -> DictConfig:
    """The config the CLI would run with these overrides, composed outside a Hydra run.

    `root` sets paths.root_dir (data/, teachers/, logs/ under it). `paths.output_dir`, which only
    a Hydra run sets, becomes `output_dir`, else the run dir the CLI would use (hydra.run.dir).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    over = [str(o) for o in overrides]
    if root is not None:
        over.insert(0, f"paths.root_dir={root}")
    conf = Path(config_dir or CONF_DIR).resolve()
    if not (conf / f"{config_name}.yaml").is_file():
        raise ConfigError(
            f"config '{config_name}' not found in '{conf}': pass config_dir= (or AMALGAM_CONF) "
            "pointing at amalgam's conf/ directory"
        )
    backup = get_gh_backup()  # a Hydra app calling compose() keeps its own state
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=over, return_hydra_config=True)
    finally:
        restore_gh_from_backup(backup)
    with open_dict(cfg):
        run_dir = output_dir or OmegaConf.select(cfg, "hydra.run.dir")
        del cfg["hydra"]
        if "paths" in cfg:
            cfg.paths.output_dir = str(run_dir)
    return cfg


def _output_dir(cfg: DictConfig) -> Path:
    try:
        return Path(str(cfg.paths.output_dir))
    except OmegaConfBaseException as e:
        raise ConfigError(
            "paths.output_dir is unset: `${hydra:runtime.output_dir}` exists only inside a Hydra "
            "run. Compose the config with amalgam.compose(..., output_dir=...) or set "
            "cfg.paths.output_dir"
        ) from e


def _timestamped(base: PathLike) -> Path:
    return Path(base) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


# ------------------------------------------------------------------------------ reports


def eval_trainer(device: Any = None) -> L.Trainer:
    """A one-device Trainer for an evaluation outside a fit: float32, no logger, no files."""
    dev = torch.device(device if device is not None else "cpu")
    accelerator = {"cuda": "gpu"}.get(dev.type, dev.type)
    devices = [dev.index] if dev.type == "cuda" and dev.index is not None else 1
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision="32-true",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def once_over_ranks(loader: DataLoader, trainer: L.Trainer) -> DataLoader:
    """The test loader split over the DDP ranks without padding: every test image is counted
    once (Lightning's own sampler repeats images to even out the ranks)."""
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )


def measure(
    module: AmalgamModule, dm: Any, device: Any = None, trainer: L.Trainer | None = None
) -> dict[str, Any]:
    """Student and teacher accuracies on the test split (`trainer.test`: the fit's trainer,
    else a one-device float32 one on `device`), parameter counts, throughput (rank 0).

    Every rank must call it under DDP (the test is a collective); the counts are summed over
    the ranks and every rank gets the same figures.
    """
    trainer = trainer or eval_trainer(device or module.device)
    loader = dm.test_dataloader()
    if trainer.world_size > 1:
        loader = once_over_ranks(loader, trainer)
    trainer.limit_test_batches = 1.0  # the whole test split (data.test_limit sets its size)
    trainer.test(module, dataloaders=loader, verbose=False)
    out = dict(module.test_results or {})
    if trainer.is_global_zero:
        root, was = trainer.strategy.root_device, module.device
        module.to(root)
        try:
            out |= model_stats(module.student, module.teachers, dm.image_size, dm.channels, root)
        finally:
            module.to(was)
    return out


def final_report(
    results: dict[str, Any],
    out_dir: Path,
    loggers: list[Any] = (),
    show: bool = True,
) -> dict[str, Any]:
    """Write, print and log the report of measured `results` (rank 0)."""
    paths = report.write(results, out_dir)
    if show:
        report.show(results)
    report.log_to(list(loggers), results, paths["png"])
    log.info("results written to %s", paths["json"])
    return results


def attach_cache(tc: Mapping[str, Any] | None, dm: Any, module: AmalgamModule) -> None:
    """With tc.enabled, teachers run once over the pool (cached in tc.dir), not every step."""
    if not tc or not tc.get("enabled") or not module.method.uses_teachers:
        return
    views = {}
    if dm.augment:  # K fixed augmented views per image, replayed to the student
        dm.use_cached_views(int(tc.get("views", 4)))
        views = {"view_table": dm.view_table(), "view_fn": dm.apply_view}
    module.cache_spec = functools.partial(
        open_or_build,
        tc["dir"],
        module.teachers,
        dm.cache_key(),
        dm.cache_ids(),
        dm.cache_dataloader,
        **views,
    )


def val_metrics(metrics: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """The last validation epoch's `val/*` metrics (prefix dropped) and `task_mean_acc`: the
    mean over tasks of the student's task-aware validation accuracy. Empty if val never ran."""
    val = {k[4:]: float(v) for k, v in metrics.items() if k.startswith("val/")}
    accs = [val.get(f"acc_{t}") for t in tasks]
    if accs and all(a is not None for a in accs):
        val["task_mean_acc"] = sum(accs) / len(accs)  # type: ignore[arg-type]
    return dict(sorted(val.items()))


# ------------------------------------------------------------------------------ the run


class Amalgamation:
    """Frozen teachers, a student, a method and the data: `.fit()`, `.evaluate()`, `.student`.

    From Python objects (each part as an object or as config):

    - teachers: {name: teacher} or a TeacherBank. A teacher is a weights path, a teacher config
      dict, or a trained timm classifier in memory with its class names in logit order:
      `(model, classes)`, `{"model": model, "classes": classes, ...}` or `Teacher(model,
      classes, mean=, std=, input_size=, feature_indices=)` (amalgam.teachers.bank). Such a
      module is frozen in place (eval, requires_grad False) and never trained; its head must
      have one output per class. It normalises with `mean`/`std`, else its timm data config
      (`pretrained_cfg`), and sees the data's images at their size unless `input_size`. A copy
      is saved under output_dir/teachers/ (named by its hash) for checkpoints to load back;
    - student: a timm model (`timm.create_model(...)`, trained in place: `.student.model` is
      that module; a head of another size is reset to the union classes), a timm arch name, a
      student config dict, or a Backbone over the union classes;
    - data: a Source, a dict of AmalgamDataModule arguments with its `source`, a data config
      with `_target_`, or an AmalgamDataModule whose tasks are the teachers' classes;
    - method: a preset name (conf/method/), a method config, a Method class/partial, or a Method;
    - optim: a preset name (conf/optim/) or an optimiser config dict;
    - trainer: a dict of lightning.Trainer arguments (over DEFAULT_TRAINER) or a Trainer;
    - seed: seeds everything before any part is built (None: leave the RNGs alone);
    - loggers: None for a CSV logger in output_dir, [] for none; callbacks: Lightning callbacks;
    - teacher_cache: a directory to cache teacher outputs in (teachers run once, not per step);
    - verbose: False for a quiet fit: no progress bar, no log lines, no printed table (the
      results files and config_tree.log are written all the same).

    Or `Amalgamation.from_config(cfg)` for a composed config (see `compose`), as the CLI does.
    """

    def __init__(
        self,
        teachers: Mapping[str, Any] | TeacherBank,
        student: Any,
        data: Any,
        method: Any = "cfl",
        optim: str | Mapping[str, Any] = "amalgam_adam",
        trainer: L.Trainer | Mapping[str, Any] | None = None,
        *,
        seed: int | None = 0,
        output_dir: PathLike | None = None,
        loggers: Sequence[Any] | None = None,
        callbacks: Sequence[Any] | None = None,
        teacher_dtype: str = "float32",
        teacher_cache: PathLike | None = None,
        cache_views: int = 4,
        verbose: bool = True,
    ) -> None:
        quiet_known_warnings()
        out_dir = Path(output_dir) if output_dir else _timestamped(Path("logs") / "api" / "runs")
        if isinstance(trainer, L.Trainer) and (loggers is not None or callbacks is not None):
            raise ConfigError(
                "loggers/callbacks: give them to your lightning.Trainer, or pass trainer as a "
                "dict of Trainer arguments"
            )
        spec = spec_from_objects(  # the config checks, on the parts given as config
            teachers,
            student,
            data,
            method,
            optim,
            seed=seed,
            teacher_dtype=teacher_dtype,
            save_dir=out_dir / "teachers",  # in-memory teachers, as files to load back
        )
        if seed is not None:
            L.seed_everything(seed, workers=True)
        built = assemble(spec)  # the one builder, as from_config's
        dm, module = built.datamodule, built.module
        attach_cache(
            {"enabled": teacher_cache is not None, "dir": str(teacher_cache), "views": cache_views},
            dm,
            module,
        )
        label = built.method
        info = {"method": label, "variant": label, "seed": seed, "student_arch": built.student_arch}

        def make_loggers(resume_from: Path | None) -> list[Any]:
            if isinstance(trainer, L.Trainer):
                return list(trainer.loggers)
            if loggers is None:
                step = step_of(resume_from) if resume_from is not None else None
                return [CSVLogger(save_dir=str(out_dir), name="csv", version="", resume_step=step)]
            return list(loggers)

        def make_trainer(lg: list[Any], cb: list[Any]) -> L.Trainer:
            if isinstance(trainer, L.Trainer):
                return trainer
            kwargs = {**DEFAULT_TRAINER, "default_root_dir": str(out_dir), **(trainer or {})}
            if not verbose:
                kwargs["enable_progress_bar"] = False
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])  # crash-safe checkpoints
            return L.Trainer(**kwargs, logger=lg or False, callbacks=cb)

        self._setup(dm, module, out_dir, info, None)
        self._console = {
            "progress_bar": verbose,
            "every_n_steps": None,
            "config_tree": True,
            "log_lines": verbose,
        }
        self._make_loggers = make_loggers
        self._make_callbacks = lambda: console_callbacks(list(callbacks or []), self._console)[0]
        self._make_trainer = make_trainer

    # -------------------------------------------------------------- other constructors

    def _setup(
        self,
        dm: Any,
        module: AmalgamModule,
        out_dir: Path,
        info: dict[str, Any],
        config: DictConfig | None,
        resume_from: Path | None = None,
    ) -> None:
        self.datamodule = dm
        self.module = module
        self.output_dir = out_dir
        self.config = config
        self.trainer: L.Trainer | None = None
        self.checkpoint_path: Path | None = None
        self.results: dict[str, Any] | None = None
        self._info = info
        self._resume_from = resume_from
        self._make_loggers: Callable[[Path | None], list[Any]] | None = None
        self._make_callbacks: Callable[[], list[Any]] = list
        self._make_trainer: Callable[[list[Any], list[Any]], L.Trainer] | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Amalgamation:
        """Build everything a composed amalgamation config names (the CLI's path)."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        quiet_known_warnings()
        check_launch(cfg)
        L.seed_everything(cfg.seed, workers=True)
        out_dir = _output_dir(cfg)
        resume_from = resume_checkpoint(cfg)
        claim_run_dir(cfg, out_dir, "paths.output_dir")  # one run per dir, never over a finished
        try:
            # a resumed run takes the rule's statistics from its checkpoint instead of refitting
            built = assemble(
                spec_from_config(
                    cfg, fit_rules=resume_from is None or not rule_fitted_in(resume_from)
                )
            )
            dm, module = built.datamodule, built.module
            if resume_from is not None:
                check_resume(cfg, resume_from, module)
            check_free_space(out_dir, checkpoint_bytes(module), "paths.output_dir")
        except BaseException:
            rundir.release(out_dir)
            raise
        attach_cache(cfg.get("teacher_cache"), dm, module)
        variant = variant_name(cfg)
        info = {
            "method": built.method,
            "variant": variant,
            "seed": int(cfg.seed),
            "student_arch": built.student_arch,
        }
        self = cls.__new__(cls)
        self._setup(dm, module, out_dir, info, cfg, resume_from)
        self._make_loggers = functools.partial(make_loggers, cfg, variant)
        settings = console_settings(cfg)
        self._console = settings
        self._make_callbacks = lambda: console_callbacks(
            instantiate_group(cfg.get("callbacks")), settings
        )[0]
        self._make_trainer = lambda lg, cb: hydra.utils.instantiate(
            cfg.trainer,
            logger=lg or False,
            callbacks=cb,
            **trainer_kwargs(settings),
        )
        return self

    @classmethod
    def load(
        cls,
        ckpt_path: PathLike,
        overrides: Mapping[str, Any] | None = None,
        trust_targets: Sequence[str] = (),
    ) -> Amalgamation:
        """A trained amalgamation from its checkpoint (teachers hash-checked), for evaluation.

        `overrides` are merged into the config stored in the checkpoint (e.g. {"data":
        {"test_limit": 100}}, or the parts a run built from Python objects could not store).
        The stored config may name only allowed callables (`amalgam.trust`): amalgam's own, the
        ones its configs name, and `trust_targets` (dotted names of your own classes).
        """
        quiet_known_warnings()
        ckpt = read_checkpoint(ckpt_path, trust_targets, "ckpt_path")
        stored = ckpt.record.config
        _check_teacher_files(ckpt_path, ckpt.record.teachers, overrides)
        missing = [
            k for k in ("data", "student", "method", "optim") if not (overrides or {}).get(k)
        ]
        missing = [k for k in missing if not stored.get(k)]
        if missing:
            raise ConfigError(
                f"checkpoint '{ckpt_path}' does not store the config of {missing} (that run was "
                "built from Python objects); pass them as overrides={"
                + ", ".join(f"'{k}': {{...}}" for k in missing)
                + "} or rebuild the Amalgamation and load the state dict"
            )
        cfg, dm, module = rebuild(ckpt, dict(overrides) if overrides else None)
        info = {  # the extra fields of `python -m amalgam.evaluate`
            "method": method_name(cfg),
            "seed": int(cfg.seed) if cfg.get("seed") is not None else None,
            "checkpoint": str(ckpt_path),
            "student_arch": str(cfg.student.arch),
            "teacher_hashes": module.teachers.hashes(),
        }
        self = cls.__new__(cls)
        self._setup(dm, module, Path(ckpt_path).parent.parent, info, cfg)
        self.checkpoint_path = Path(ckpt_path)
        return self

    # -------------------------------------------------------------- what it holds

    @property
    def student(self) -> Backbone:
        """The student network: images in [0, 1] -> logits over `classes`."""
        return self.module.student

    @property
    def teachers(self) -> TeacherBank:
        return self.module.teachers

    @property
    def method(self) -> Method:
        return self.module.method

    @property
    def classes(self) -> tuple[str, ...]:
        """The student's classes: the union of the teachers' classes, in logit order."""
        return self.module.space.classes

    def __repr__(self) -> str:
        tasks = {t.name: len(t.classes) for t in self.module.space.tasks}
        state = "fitted" if self.trainer is not None else "not fitted"
        return (
            f"Amalgamation({self._info.get('method')}: teachers {tasks} -> "
            f"{self._info.get('student_arch')}, {state}, output_dir='{self.output_dir}')"
        )

    # -------------------------------------------------------------- fit and evaluate

    def fit(self, ckpt_path: PathLike | None = None) -> dict[str, Any]:
        """Train the student on unlabeled images; write checkpoints/final.ckpt and the report
        (results.json/.md/.png in output_dir); return the results dict (rank 0; {} elsewhere).

        `ckpt_path` resumes from a checkpoint of a run with the same teachers.
        """
        if self._make_trainer is None or self._make_loggers is None:
            raise ConfigError(
                "this Amalgamation was loaded from a checkpoint for evaluation; to train on, "
                "compose its config with ckpt_path=<checkpoint> and use from_config"
            )
        if self.trainer is not None:
            raise ConfigError("this Amalgamation is fitted already; build a new one to train again")
        resume_from = self._resume_from
        if ckpt_path is not None:
            resume_from = Path(ckpt_path)
            if not resume_from.is_file():
                raise ConfigError(f"ckpt_path '{ckpt_path}' not found: give a checkpoint file")
            check_checkpoint(
                resume_from, {n: {"weights": p} for n, p in self.teachers.paths.items()}
            )
        module, dm = self.module, self.datamodule
        if not rundir.holds(self.output_dir):  # built from Python objects: claim it now
            rundir.claim_for_run(self.output_dir, resume_from)
        try:
            return self._fit(module, dm, resume_from)
        finally:
            rundir.release(self.output_dir)

    def _fit(self, module: AmalgamModule, dm: Any, resume_from: Path | None) -> dict[str, Any]:
        console = getattr(self, "_console", None) or console_settings(None)
        if console.get("log_lines", True):
            log.info("run dir: %s", self.output_dir)
        hparams = to_dict(self.config) if self.config is not None else module.record.config
        if console.get("config_tree", True) and hparams:
            show_config(hparams, self.output_dir, echo=bool(console.get("log_lines", True)))
        loggers = self._make_loggers(resume_from)
        module.record.wandb_id = wandb_id(loggers)
        log_hyperparams(loggers, hparams)
        callbacks = self._make_callbacks()
        trainer = self._make_trainer(loggers, callbacks)
        self.trainer = trainer
        start = time.time()
        failed = True
        quiet = contextlib.ExitStack()
        if not console.get("log_lines", True):  # Lightning's "GPU available" and such
            for name in ("lightning.pytorch", "lightning.fabric"):
                quiet.enter_context(_level(logging.getLogger(name), logging.WARNING))
        try:
            train = (
                dm.labeled_train_dataloader()
                if module.method.uses_labels
                else dm.train_dataloader()
            )
            trainer.fit(module, train, dm.val_dataloader(), ckpt_path=resume_from)
            ckpt = self.output_dir / "checkpoints" / "final.ckpt"
            trainer.save_checkpoint(ckpt, weights_only=False)
            self.checkpoint_path = ckpt
            # read before the test, which resets the trainer's callback metrics
            info = {
                "method": self._info["method"],
                "variant": self._info["variant"],
                "uses_labels": bool(module.method.uses_labels),
                "targets": type(module.method.targets).__name__,
                "seed": self._info["seed"],
                "student_arch": self._info["student_arch"],
                "teacher_archs": {n: m.arch for n, m in module.teachers.metas.items()},
                "teacher_hashes": module.teachers.hashes(),
                "epochs": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "world_size": int(trainer.world_size),
                "resumed_from": str(resume_from) if resume_from else None,
                "train_seconds": round(time.time() - start, 1),
                "checkpoint": str(ckpt),
                "val": val_metrics(trainer.callback_metrics, module.space.names),
            }
            measured = measure(module, dm, trainer=trainer)  # on every rank: a collective
            results: dict[str, Any] = {}
            if trainer.is_global_zero:
                self._info = info | {"provenance": provenance()}
                results = final_report(
                    measured | self._info, self.output_dir, loggers, show=console["log_lines"]
                )
                files = [ckpt, *(self.output_dir / f"results.{x}" for x in ("json", "md", "png"))]
                log_artifacts(loggers, self.output_dir, [*files, self.output_dir / CONFIG_TREE])
            self.results = results
            failed = False
        finally:
            quiet.close()
            finish_loggers(loggers, failed)
        return results

    def evaluate(
        self, out_dir: PathLike | None = None, *, device: Any = None, show: bool = False
    ) -> dict[str, Any]:
        """The student as it is now, and the teachers, on the test split: the results dict
        (the fit's fields included once fitted). Written to `out_dir` as results.* if given."""
        results = measure(self.module, self.datamodule, device) | self._info
        if out_dir is not None:
            report.write(results, out_dir)
        if show:
            report.show(results)
        return results


def rebuild(
    ckpt: StudentCheckpoint, overrides: Mapping[str, Any] | None = None
) -> tuple[DictConfig, Any, AmalgamModule]:
    """(config, datamodule, eval-mode module) rebuilt from a checkpoint read by
    `read_checkpoint`, teachers hash-checked. `overrides` come from the caller (trusted)."""
    rec = ckpt.record
    cfg = OmegaConf.create(rec.config)
    for name, t in rec.teachers.items():
        cfg.teacher_set[name].weights = t["path"]
    if overrides:
        cfg = OmegaConf.merge(cfg, dict(overrides))
    # the checkpoint holds the rules' statistics and every student tensor
    built = assemble(spec_from_config(cfg, fit_rules=False, init_student=False))
    dm, module = built.datamodule, built.module
    hashes = module.teachers.hashes()
    for name, then in rec.teacher_hashes().items():
        if hashes[name] != then:
            raise ConfigError(
                f"teacher '{name}' at '{rec.teachers[name]['path']}' has changed since the "
                f"checkpoint was written (hash {hashes[name][:12]} != {str(then)[:12]})"
            )
    missing, unexpected = module.load_state_dict(ckpt.state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("teachers.")]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.eval()
    return cfg, dm, module


def load_amalgamation(
    ckpt_path: PathLike,
    overrides: Mapping[str, Any] | None = None,
    trust_targets: Sequence[str] = (),
) -> tuple[DictConfig, Any, AmalgamModule]:
    """(config, datamodule, eval-mode module) from a checkpoint file: the stored config checked
    against the allow-list (and `trust_targets`), then `rebuild`."""
    return rebuild(read_checkpoint(ckpt_path, trust_targets, "ckpt_path"), overrides)


def _check_teacher_files(
    ckpt_path: PathLike, teachers: Any, overrides: Mapping[str, Any] | None
) -> None:
    """Refuse a checkpoint naming an in-memory teacher of which no file was saved, unless
    `overrides` give its file."""
    given = (overrides or {}).get("teacher_set") or {}
    teachers = teachers if isinstance(teachers, Mapping) else {}
    no_file = [
        str(n)
        for n, t in teachers.items()
        if not (isinstance(t, Mapping) and t.get("path"))
        and not (isinstance(given.get(n), Mapping) and given[n].get("weights"))
    ]
    if no_file:
        raise ConfigError(
            f"checkpoint '{ckpt_path}': teachers {no_file} were given in memory and no file of "
            "them was saved (timm could not rebuild them from their arch name); write each with "
            "amalgam.teachers.export_teacher and pass overrides={'teacher_set': {"
            + ", ".join(f"'{n}': {{'weights': <file>}}" for n in no_file)
            + "}}"
        )


@contextlib.contextmanager
def _level(logger: logging.Logger, level: int) -> Any:
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def load(
    ckpt_path: PathLike,
    overrides: Mapping[str, Any] | None = None,
    trust_targets: Sequence[str] = (),
) -> Amalgamation:
    """A trained amalgamation from `<run dir>/checkpoints/final.ckpt`: `.evaluate()`,
    `.student`. Same as `Amalgamation.load`."""
    return Amalgamation.load(ckpt_path, overrides, trust_targets)
