"""Schemas of the config groups whose keys amalgam itself reads: `student`, a teacher (`teacher`
and each `teacher_set` entry) and `teacher_cache`, as dataclasses.

`conform(cfg, Schema, prefix)` merges a composed group into its schema with OmegaConf, which
refuses a key the schema does not name and a value of the wrong type; the refusal comes back as
one line that names the key and the fix (a `ConfigError`). The groups whose keys are a class's
arguments (`data`, `data.source`, `method`, `targets`) are checked against that class's own
signature instead (`amalgam.validate`). What a type cannot say (a weights file's header, a
network's shapes on the meta device, class lists against the data) is checked next to the
thing it checks.

They are also in Hydra's ConfigStore, group `schema` (`schema/student`, `schema/teacher`,
`schema/teacher_cache`), for a config of your own that wants them as its base.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from amalgam.errors import ConfigError

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


# OmegaConf reads these annotations at run time: typing's Optional/List/Dict, not `X | None`
@dataclasses.dataclass
class StudentConfig:
    """conf/student/*.yaml: what `build.build_student` reads."""

    arch: str = MISSING
    in_chans: int = 3
    input_size: Optional[int] = None  # noqa: UP045
    mean: Any = None  # a number or one per channel (checked by validate.check_norm)
    std: Any = None
    pretrained: bool = False
    weights: Optional[str] = None  # noqa: UP045
    key_map: str = "name"
    feature_indices: Any = None  # the stages a feature method reads (validate.check_method)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False
    num_classes: Optional[int] = None  # noqa: UP045  # must equal the union's size if set


@dataclasses.dataclass
class TeacherConfig:
    """conf/teacher/*.yaml and teacher_set entries: what `teachers.bank` and `train_teacher`
    read."""

    name: Optional[str] = None  # noqa: UP045
    arch: Optional[str] = None  # noqa: UP045  # None: from the weights file's metadata
    classes: Any = None  # class names or indices of the data, or None: from the metadata
    weights: Optional[str] = None  # noqa: UP045
    in_chans: Optional[int] = None  # noqa: UP045
    input_size: Optional[int] = None  # noqa: UP045
    mean: Any = None
    std: Any = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    feature_indices: Any = None
    class_names: Any = None
    key_map: Optional[str] = None  # noqa: UP045
    pretrained: bool = False  # train_teacher only, as the two below
    init_weights: Optional[str] = None  # noqa: UP045
    init_key_map: str = "name"


@dataclasses.dataclass
class TeacherCacheConfig:
    """`teacher_cache`: teachers run once over the unlabeled pool (amalgam.teachers.cache)."""

    enabled: bool = False
    dir: str = "cache"
    views: int = 4  # with data.augment=true: augmented views cached per image


def keys(schema: type) -> list[str]:
    """The keys a schema takes."""
    return [f.name for f in dataclasses.fields(schema)]


def check_keys(cfg: Mapping[str, Any], allowed: Iterable[str] | None, prefix: str) -> None:
    """Refuse a key `allowed` does not name (a typo that Hydra lets through: yaml or +key)."""
    if allowed is None:
        return
    allowed = set(allowed) | HYDRA_KEYS
    for k in cfg:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" Did you mean '{prefix}.{close[0]}'?" if close else ""
            known = sorted(allowed - HYDRA_KEYS)
            raise ConfigError(
                f"unknown config key '{prefix}.{k}': {prefix} takes {known}.{hint} "
                f"Rename or remove it."
            )


def conform(cfg: Mapping[str, Any], schema: type, prefix: str) -> None:
    """Refuse a key `schema` does not name, or a value of the wrong type (OmegaConf's merge
    into the structured schema), as one ConfigError line naming `prefix.key`."""
    given = {
        k: os.fspath(v) if isinstance(v, os.PathLike) else v
        for k, v in dict(cfg).items()
        if k not in HYDRA_KEYS
    }
    check_keys(given, keys(schema), prefix)  # names a close match, unlike OmegaConf
    try:
        OmegaConf.merge(OmegaConf.structured(schema), given)
    except ConfigKeyError as e:  # pragma: no cover - every unknown key is caught above
        raise ConfigError(f"{prefix}: {e.msg}") from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        value = given.get(str(key).split(".")[0])
        want = _type_name(schema, str(key).split(".")[0])
        raise ConfigError(
            f"{prefix}.{key}={value!r}: must be {want}; fix {prefix}.{key} in the config or "
            "on the command line"
        ) from None


def _type_name(schema: type, key: str) -> str:
    hints = {f.name: f.type for f in dataclasses.fields(schema)}
    text = str(hints.get(key, "another type"))
    for name, words in (
        ("Optional[int]", "an integer or null"),
        ("Optional[str]", "a string (a path) or null"),
        ("int", "an integer"),
        ("bool", "true or false"),
        ("str", "a string"),
        ("dict[str, Any]", "a mapping of keyword arguments"),
    ):
        if text == name:
            return words
    return text


def _store() -> None:
    cs = ConfigStore.instance()
    for name, node in (
        ("student", StudentConfig),
        ("teacher", TeacherConfig),
        ("teacher_cache", TeacherCacheConfig),
    ):
        cs.store(group="schema", name=name, node=node)


_store()
