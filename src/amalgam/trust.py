"""What a config read back from disk may name as a callable.

A checkpoint's stored config, a teacher's metadata file or a stored run config is data, not
code: a `_target_` in it is resolved (imported and called) only when it is on the allow-list,
and checked before anything is imported. Allowed are

- the torch / timm / Lightning / Hydra classes that amalgam's shipped configs name
  (`SHIPPED_TARGETS`), and
- amalgam's own extension points: the methods, target rules, data modules, data sources,
  callbacks, loggers and checkpoint IO classes defined inside the `amalgam` package (resolved by
  importing amalgam's own modules only, and then checked by what the object is: a helper like
  `amalgam.utils.os.system` or `amalgam.files.atomic_write_text` is refused).

Anything else (`logging.basicConfig`, `os.system`, a class of your own) is refused with a
message naming the key; a target you trust is added with `trust_targets=[...]` on the command
line (`python -m amalgam.evaluate ... trust_targets=[mylab.methods.Mine]`) or in the Python API
(`amalgam.load(path, trust_targets=[...])`): the command line is yours, the file is not.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from amalgam.errors import ConfigError

# every `_target_` outside amalgam that a file under conf/ names (tests/test_trust.py checks
# that this list covers conf/)
SHIPPED_TARGETS = frozenset(
    {
        "lightning.Trainer",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.RichProgressBar",
        "lightning.pytorch.loggers.WandbLogger",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.plugins.environments.SLURMEnvironment",
        "optuna.samplers.TPESampler",
    }
)
PACKAGE = "amalgam"
# amalgam classes that moved to another module: a config stored before the move names them by
# the old path; they stay allowed, as the class they name now
MOVED = {
    "amalgam.reliability.AtomicCheckpointIO": "amalgam.checkpoint_io.AtomicCheckpointIO",
    "amalgam.reliability.CSVLogger": "amalgam.csv_logger.CSVLogger",
    "amalgam.reliability.Preemption": "amalgam.preemption.Preemption",
    "amalgam.reliability.NanGuard": "amalgam.nan_guard.NanGuard",
}
FIX = (
    "if you trust this file and the callable, allow it with trust_targets=[{target}] on the "
    "command line (Python: trust_targets=['{target}'])"
)


def _extension_bases() -> tuple[type, ...]:
    """The classes whose amalgam subclasses a config may name."""
    from hydra.experimental.callback import Callback as HydraCallback
    from lightning.pytorch import Callback, LightningDataModule
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins.io import CheckpointIO

    from amalgam.methods.base import Method
    from amalgam.targets import TargetRule

    return (Method, TargetRule, LightningDataModule, Callback, Logger, CheckpointIO, HydraCallback)


def _amalgam_object(target: str) -> Any:
    """Resolve `amalgam.<module>.<name>` by importing amalgam's own modules only; None when it
    does not resolve to an attribute of an amalgam module."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if inspect.ismodule(obj) and not obj.__name__.startswith(PACKAGE + "."):
                return None  # walked out of amalgam (amalgam.utils.os...)
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def is_amalgam_extension(target: str) -> bool:
    """An amalgam class of an extension point, or a data-source function of amalgam."""
    if not (target.startswith(PACKAGE + ".") and all(p.isidentifier() for p in target.split("."))):
        return False
    obj = _amalgam_object(target)
    defined_here = str(getattr(obj, "__module__", "")).startswith(PACKAGE + ".")
    if inspect.isclass(obj):
        return defined_here and issubclass(obj, _extension_bases())
    if inspect.isfunction(obj):
        from amalgam.data import benchmarks, sources

        returns = inspect.signature(obj).return_annotation
        home = obj.__module__ in (sources.__name__, benchmarks.__name__)
        return home and returns in (sources.Source, "Source")
    return False


def allowed(target: Any, trusted: Iterable[str] = ()) -> bool:
    """Whether a `_target_` read from a file may be resolved (decided before any import of
    modules outside amalgam)."""
    if not isinstance(target, str):
        return False
    target = MOVED.get(target, target)
    return target in SHIPPED_TARGETS or target in set(trusted) or is_amalgam_extension(target)


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(key path, key, value) of every entry in nested mappings and lists."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, k, v
            yield from _walk(v, path)
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        for i, v in enumerate(node):
            path = f"{prefix}[{i}]"
            yield path, i, v
            yield from _walk(v, path)


def check_untrusted_config(
    cfg: Any, where: str, trusted: Iterable[str] = (), root: str = ""
) -> None:
    """Refuse a config read back from disk (`where`: the file) that names a callable off the
    allow-list, or that holds an interpolation (stored configs are resolved when written; an
    unresolved `${...}` could call a resolver)."""
    trusted = [str(t) for t in trusted]
    for path, key, value in _walk(cfg, root):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{where}: {path}='{value[:80]}' is an interpolation, and configs stored by "
                "amalgam are resolved when written: refused (the file was edited or is not "
                "amalgam's); restore the file or pass the value as an override"
            )
        if key == "_target_" and not allowed(value, trusted):
            raise ConfigError(
                f"{where}: {path}='{value}' is not a callable amalgam runs from a file read "
                "back from disk (only amalgam's methods, target rules, data, callbacks and "
                "loggers, and the torch/timm/Lightning classes its configs name): refused "
                "before import; " + FIX.format(target=value)
            )


def trust_list(value: Any, key: str = "trust_targets") -> list[str]:
    """The command line's list of extra trusted targets (a string or a list of strings)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key}={value!r}: give a list of dotted names, e.g. {key}=[mylab.Mine]")
