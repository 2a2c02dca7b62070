"""results.json: one run's results as a typed record, written and read here only.

`Results` is the schema: per task and joint the student's and the teachers' accuracies on the
same test images (fractions in [0, 1]), then what the run was (method, variant, seed, rule,
archs, teacher hashes, steps, timings, provenance). `write_results` checks a results dict
against it before writing (atomically: the old file or the new one, never a torn one);
`read_results` reads a file back as untrusted data (JSON only, nothing resolved) and says why
one cannot be used. Fields the schema does not name are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from amalgam.files import atomic_write_text

FILE = "results.json"


class ResultsError(ValueError):
    """A results dict (or file) that does not fit the schema; the message says where."""


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One teacher's task: its own images, argmax over its classes only."""

    student_acc: float
    teacher_acc: float
    n_test: int | None = None
    classes: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class JointResult:
    """All test images, argmax over the union (teachers: their ensemble under the rule)."""

    student_acc: float
    teacher_ensemble_acc: float
    n_test: int | None = None
    target_rule: str | None = None
    teacher_ensemble_concat_acc: float | None = None  # the reference rule, beside another


@dataclasses.dataclass(frozen=True)
class Results:
    """The schema of results.json (`extra`: the fields it does not name, as they are)."""

    tasks: dict[str, TaskResult]
    joint: JointResult
    method: str | None = None
    variant: str | None = None
    seed: int | None = None
    targets: str | None = None
    uses_labels: bool | None = None
    student_arch: str | None = None
    teacher_archs: dict[str, str] | None = None
    teacher_hashes: dict[str, str] | None = None
    epochs: int | None = None
    global_step: int | None = None
    world_size: int | None = None
    resumed_from: str | None = None
    train_seconds: float | None = None
    checkpoint: str | None = None
    val: dict[str, float] | None = None
    provenance: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    throughput_img_s: dict[str, Any] | None = None
    task_confusion: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Results:
        """The record of a parsed results dict; ResultsError (saying which field) if it does
        not fit the schema."""
        if not isinstance(d, Mapping):
            raise ResultsError("not a JSON object")
        tasks = d.get("tasks")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ResultsError("no 'tasks' entry")
        for name, t in tasks.items():
            if not (_accuracy(_get(t, "student_acc")) and _accuracy(_get(t, "teacher_acc"))):
                raise ResultsError(
                    f"task '{name}' lacks a numeric student_acc or teacher_acc in [0, 1]"
                )
        joint = d.get("joint")
        if not (
            _accuracy(_get(joint, "student_acc")) and _accuracy(_get(joint, "teacher_ensemble_acc"))
        ):
            raise ResultsError("'joint' lacks a numeric student_acc or teacher_ensemble_acc")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        top = known - {"tasks", "joint"}  # those two are records, built below
        kwargs = {k: _typed(d[k], _HINTS[cls][k], k) for k in top if k in d}
        kwargs["tasks"] = {str(n): _record(TaskResult, t, f"tasks.{n}") for n, t in tasks.items()}
        kwargs["joint"] = _record(JointResult, joint, "joint")
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: the schema's fields in order (unset optional ones left out), then
        `extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            if f.name == "tasks":
                value = {n: _plain(t) for n, t in value.items()}
            elif f.name == "joint":
                value = _plain(value)
            out[f.name] = value
        return out | self.extra


def problem(d: Any) -> str | None:
    """Why a parsed results dict does not fit the schema; None when it does."""
    try:
        Results.from_dict(d)
    except ResultsError as e:
        return str(e)
    return None


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Check `results` against the schema and write `out_dir`/results.json atomically; the
    fields come back in the order they were given."""
    Results.from_dict(results)  # a writer's slip fails here, not in every later reader
    path = Path(out_dir) / FILE
    atomic_write_text(path, json.dumps(dict(results), indent=2))
    return path


def read_results(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """(the results dict, None), or (None, why the file is unreadable or does not fit)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        lines = str(e).strip().splitlines()
        return None, f"unreadable ({type(e).__name__}: {lines[0] if lines else ''})"
    why = problem(d)
    return (None, why) if why else (d, None)


# ------------------------------------------------------------------------------ checking


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, Mapping) else None


def _accuracy(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1


def _record(cls: type, d: Mapping[str, Any], where: str) -> Any:
    hints = _HINTS[cls]
    return cls(**{k: _typed(d[k], hints[k], f"{where}.{k}") for k in hints if k in d})


def _plain(record: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` if it has the type `hint` (str, int, float, bool, Any, X | None, list[X],
    dict[str, X]); ResultsError naming `key` if not."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, key)
    ok: bool
    if hint is Any or dataclasses.is_dataclass(hint):
        ok = True
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool):
        ok = isinstance(value, hint)
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            return [_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        ok = isinstance(value, Mapping)
        if ok:
            return {str(k): _typed(v, args[1], f"{key}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - a schema field of a type this checker does not know
        raise TypeError(f"results schema: no check for {hint!r} ({key})")
    if not ok:
        raise ResultsError(f"'{key}' is not {_NAMES.get(hint) or _NAMES.get(origin) or hint}")
    return value


_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}
_HINTS = {c: typing.get_type_hints(c) for c in (TaskResult, JointResult, Results)}
