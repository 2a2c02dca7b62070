"""What a run knows about how it was launched: its variant name, loggers, resume, DDP checks."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn

from amalgam import rundir
from amalgam.checkpoint import read_checkpoint
from amalgam.errors import ConfigError
from amalgam.utils import log, shorten, to_dict
from amalgam.validate import check_checkpoint, check_run_dirs, check_seed, check_writable_dir


def hydra_mode() -> RunMode | None:
    return HydraConfig.get().mode if HydraConfig.initialized() else None


def one_line_errors(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """An entry point's task function whose ConfigError ends the run with its message alone, on
    one line of stderr, and exit status 2 (a usage error), instead of Hydra's "Error executing
    job with overrides" block. HYDRA_FULL_ERROR=1 shows the traceback; in a multirun the error
    stays the job's (its failure record and the sweep report name it)."""

    @functools.wraps(main)
    def task(cfg: DictConfig) -> Any:
        try:
            return main(cfg)
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or hydra_mode() == RunMode.MULTIRUN:
                raise
            print(f"Error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return task


def method_name(cfg: DictConfig) -> str:
    """The method's `name` in its config, else its class name."""
    return str(cfg.method.get("name") or cfg.method._target_.rsplit(".", 1)[-1])


# Keys that say where a run writes, logs and loads, not what it computes: neither a resumed run's
# config change (RESUME_IGNORED) nor a sweep's variant (NOT_VARIANT). A key covers every key below
# it (`under`).
RUN_PLACE = (
    "ckpt_path",
    "resume_changes",
    "trust_targets",
    "paths",
    "hydra",
    "logger",
    "teacher_cache.dir",
    "data.num_workers",
    "data.persistent_workers",
    "data.pin_memory",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "optimized_metric",
)


def under(key: str, keys: Sequence[str]) -> bool:
    """Whether `key` is one of `keys` or lies below one (`a.b.c` is under `a.b`)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


# Overrides that say where or how a run executes, not what it computes: they neither split a
# sweep's variants nor appear in its report rows. NOT_VARIANT: the key or any key below it
# (`logger` covers `logger=wandb` and `logger.wandb.offline=true`); NOT_VARIANT_CHOICE: the group
# choice alone (`trainer=gpu` is where it runs, `trainer.max_epochs=9` is a variant). Hydra's
# own exclude_keys (hydra.job.config.override_dirname.exclude_keys: seed, experiment, ...) are
# left out as well.
NOT_VARIANT = (
    *RUN_PLACE,
    "callbacks.model_checkpoint",
    "callbacks.progress",
    "callbacks.lr_monitor",
    "callbacks.preemption",
    "callbacks.console",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "tags",
    "console",
    "seed",
)
NOT_VARIANT_CHOICE = ("trainer", "callbacks")


def _override_key(override: str) -> str:
    """The key of one command-line override: `+a.b=1` -> `a.b`, `hydra/launcher=x` -> `hydra`."""
    key = override.split("=", 1)[0].lstrip("~+").split("@", 1)[0]
    return key.replace("/", ".")


def is_variant_key(key: str, excluded: Sequence[str] = ()) -> bool:
    """Whether an override of `key` changes the experiment (and so names a variant)."""
    if key in NOT_VARIANT_CHOICE or key in excluded:
        return False
    return not under(key, NOT_VARIANT)


def variant_of(overrides: Sequence[str], excluded: Sequence[str] = ()) -> str:
    """The variant name of a job's overrides: those that change the experiment, sorted, joined
    with ',' (as Hydra's override_dirname); '' when none does."""
    kept = [o for o in overrides if is_variant_key(_override_key(o), excluded)]
    return ",".join(sorted(kept))


def variant_name(cfg: DictConfig) -> str:
    """The job's overrides that change the experiment (`variant_of`), else the method name."""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        excluded = list(hc.job.config.override_dirname.exclude_keys or [])
        name = variant_of(list(hc.overrides.task), excluded)
        if name:
            return name
    return method_name(cfg)


def check_launch(cfg: DictConfig) -> None:
    """Refuse a DDP trainer that would spawn children inside a Hydra multirun (STACK.md), and
    directories the run cannot write."""
    check_seed(cfg.get("seed", 0))  # before anything seeds the RNGs with it
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
    c = read_checkpoint(path, key="ckpt_path")
    return ResumeState(step=c.global_step, wandb_id=c.record.wandb_id, rule_fitted=c.rule_fitted())


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
    """Instantiate the logger group; wandb runs are grouped by variant and resume their id.

    wandb: group `<task_name>/<variant>` and name `<variant>/seed<seed>` unless set; the run's
    tags plus the task and the method; `log_model` is amalgam's (one artifact of final.ckpt and
    the results files at the end, `log_artifacts`), not Lightning's per-checkpoint upload.
    """
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if not lcfg or "_target_" not in lcfg:
            continue
        kwargs: dict[str, Any] = {}
        log_model = False
        if str(lcfg._target_).endswith("WandbLogger"):
            if not lcfg.get("group"):
                kwargs["group"] = shorten(f"{cfg.task_name}/{variant}", 128)
            if not lcfg.get("name"):
                kwargs["name"] = shorten(f"{variant}/seed{cfg.seed}", 128)
            tags = [str(t) for t in (lcfg.get("tags") or [])]
            tags += [str(cfg.task_name), method_name(cfg)] if "method" in cfg else []
            kwargs["tags"] = [shorten(t, 64) for t in dict.fromkeys(tags)]
            log_model = bool(lcfg.get("log_model"))
            kwargs["log_model"] = False
            run_id = wandb_id_of(resume_from)
            if run_id:
                kwargs |= {"id": run_id, "resume": "allow"}
                log.info("resuming wandb run %s", run_id)
        if lcfg._target_ == "amalgam.csv_logger.CSVLogger" and resume_from is not None:
            kwargs["resume_step"] = step_of(resume_from)  # keep the rows logged before it
        logger = hydra.utils.instantiate(lcfg, **kwargs)
        if log_model:
            logger._amalgam_log_model = True
        loggers.append(logger)
    return loggers


def log_hyperparams(loggers: list[Any], config: Mapping[str, Any] | None) -> None:
    """The run's resolved config as every logger's hyper-parameters: wandb's run config (nested,
    so its table sorts and filters by `method.weights.mmd`), the CSV logger's hparams.yaml."""
    if not config:
        return
    for lg in loggers:
        lg.log_hyperparams(dict(config))


def log_artifacts(loggers: list[Any], out_dir: Path, files: Sequence[Path]) -> None:
    """With `logger.wandb.log_model=true`: one wandb artifact (type model) of the final
    checkpoint and the results files, aliased `final`, with the run's test accuracies."""
    for lg in loggers:
        if not getattr(lg, "_amalgam_log_model", False):
            continue
        import wandb

        run = lg.experiment
        art = wandb.Artifact(f"run-{run.id}", type="model", description=str(out_dir))
        for f in files:
            if Path(f).is_file():
                art.add_file(str(f), name=Path(f).name)
        run.log_artifact(art, aliases=["final"])


def wandb_id(loggers: list[Any]) -> str | None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            return str(lg.experiment.id)  # starts the run now, so the id is known
    return None


# ------------------------------------------------------------------------------ the run dir


def resume_path_of(cfg: DictConfig, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `ckpt_path` names (None: a fresh run; `last` without a file: fresh)."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if str(ckpt) == "last":
        path = Path(run_dir) / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    return Path(str(ckpt))


def claim_run_dir(cfg: DictConfig, run_dir: str | os.PathLike, key: str) -> None:
    """Writable, not in use by another process, and not a finished run a new run would
    overwrite (`key`: the config key that sets `run_dir`, for the messages)."""
    check_writable_dir(run_dir, key, run_dir)
    rundir.claim_for_run(run_dir, resume_path_of(cfg, run_dir))


class Preflight(Callback):
    """Hydra callback: checks the run dir of an amalgamation run before Hydra writes into it.

    Hydra creates the run dir and writes `.hydra/` before the task function runs, so a
    read-only dir, a dir under a regular file or a dir held by another run would otherwise end
    in Hydra's raw OSError, or in a second run overwriting the first's stored config. A sweep
    dir is checked for writability at the multirun's start; each job's dir by the job itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = str(config.hydra.run.dir)
        with _exit_on_config_error():
            if kwargs.get("config_name") == "amalgamate":  # the others write no checkpoints
                claim_run_dir(config, run_dir, "hydra.run.dir")
            else:
                check_writable_dir(run_dir, "hydra.run.dir", run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        with _exit_on_config_error():
            check_writable_dir(sweep_dir, "hydra.sweep.dir", sweep_dir)


@contextlib.contextmanager
def _exit_on_config_error() -> Iterator[None]:
    """Hydra turns an exception in a callback into a warning and runs on; a refusal must stop
    the run: its message on stderr, one line, and exit status 2 (a usage error)."""
    try:
        yield
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def checkpoint_bytes(module: nn.Module) -> int:
    """Disk a run's checkpoints take: weights and optimizer state (Adam: two moments) of every
    saved tensor, for last.ckpt, final.ckpt, the best epoch's file and one temporary copy."""
    tensors = list(module.state_dict().values())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return 4 * 3 * weights


# ------------------------------------------------------------------------------ resume checks

# keys that do not change what a resumed run computes: where it runs, and any callback
RESUME_IGNORED = (*RUN_PLACE, "callbacks")
# a change of these keys means the checkpoint's optimizer state belongs to another optimizer
OPTIMIZER_KEYS = ("optim.name", "optim._target_")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def _ignored(key: str) -> bool:
    if key.startswith("teacher_set.") and key.endswith(".weights"):
        return True  # teacher files are compared by hash (check_checkpoint)
    return under(key, RESUME_IGNORED)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) of every leaf that differs."""
    a, b = dict(_leaves(old)), dict(_leaves(new))
    keys = sorted(k for k in set(a) | set(b) if not _ignored(k))
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys if a.get(k) != b.get(k)]


def _shown(changes: list[tuple[str, Any, Any]], n: int = 8) -> str:
    parts = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:n]]
    more = f" (+{len(changes) - n} more)" if len(changes) > n else ""
    return "; ".join(parts) + more


def state_mismatch(module: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Why `state` (a checkpoint's state_dict) cannot load into `module` (teachers excluded).

    Loads it for real (Lightning loads the same tensors again when the fit starts), so that the
    module's own load hooks (e.g. a full-kernel CFL block read as its centre tap) are honoured.
    """
    try:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        return lines[:3] or [str(e).splitlines()[0][:200]]
    out = [f"missing {k}" for k in missing if not k.startswith("teachers.")][:3]
    return out + [f"unexpected {k}" for k in unexpected if not k.startswith("teachers.")][:3]


def check_resume(cfg: DictConfig, ckpt: Path, module: nn.Module) -> list[tuple[str, Any, Any]]:
    """Compare the checkpoint's stored config and tensors with this run's, before any work.

    Refused: tensors that do not fit the rebuilt student/method, or another optimizer. Any other
    change (learning rate, epochs, loss weights, data) needs `+resume_changes=allow`: the
    resumed run then differs from an uninterrupted one. Returns the allowed changes.
    """
    stored = read_checkpoint(ckpt, key="ckpt_path")
    old = stored.record.config
    new = to_dict(cfg)
    # a run built from Python objects stores only some groups: compare those
    new = {k: v for k, v in new.items() if old.get(k) is not None}
    changes = config_changes(old, new)
    fresh = "start afresh with ckpt_path=null (in a new run dir)"
    mismatch = state_mismatch(module, stored.state_dict)
    other_optim = [c for c in changes if c[0] in OPTIMIZER_KEYS]
    if mismatch or other_optim:
        why = (
            f"its tensors do not fit this run's student and method ({', '.join(mismatch)})"
            if mismatch
            else "its optimizer state belongs to another optimizer"
        )
        raise ConfigError(
            f"ckpt_path '{ckpt}' cannot be resumed with this config: {why}. Changed since the "
            f"checkpoint: {_shown(changes) or 'nothing in the config'}. Resume with the config "
            f"it was trained with, or {fresh}"
        )
    if changes and str(cfg.get("resume_changes", "")) != "allow":
        raise ConfigError(
            f"ckpt_path '{ckpt}' was trained with another config; changed: {_shown(changes)}. "
            "A resume continues that run as it was: drop these overrides, or add "
            f"+resume_changes=allow to resume with them (the result then differs from an "
            f"uninterrupted run), or {fresh}"
        )
    if changes:
        log.warning("resuming %s with changes (resume_changes=allow): %s", ckpt, _shown(changes))
    return changes
