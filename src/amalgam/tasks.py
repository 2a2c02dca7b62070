"""Task partitions: each teacher's ordered class list, and the student's union label space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from amalgam.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]


def resolve_classes(
    spec: Sequence[str | int], dataset_classes: Sequence[str], task: str
) -> tuple[str, ...]:
    """Turn a task's class list (names or indices into the data set) into class names."""
    if spec is None or len(spec) == 0:
        raise ConfigError(
            f"task '{task}' has an empty class list: give it at least one class "
            f"(names or indices of {list(dataset_classes)[:10]}...)"
        )
    names: list[str] = []
    for c in spec:
        if isinstance(c, bool):
            raise ConfigError(f"task '{task}': class {c!r} is neither a name nor an index")
        if isinstance(c, int):
            if not 0 <= c < len(dataset_classes):
                raise ConfigError(
                    f"task '{task}': class index {c} is out of range for a data set "
                    f"with {len(dataset_classes)} classes (0..{len(dataset_classes) - 1})"
                )
            names.append(dataset_classes[c])
        else:
            name = str(c)
            if name not in dataset_classes:
                raise ConfigError(
                    f"task '{task}': class '{name}' is not in the data set; "
                    f"its classes are {list(dataset_classes)}. Fix the class list or the data set."
                )
            names.append(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"task '{task}': duplicate classes {dupes}; list each class once")
    return tuple(names)


@dataclass
class LabelSpace:
    """The ordered union of every task's classes (order of first appearance)."""

    tasks: tuple[Task, ...]
    classes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("no tasks given: a teacher set needs at least one teacher")
        seen: dict[str, None] = {}
        for t in self.tasks:
            if not t.classes:
                raise ConfigError(f"task '{t.name}' has an empty class list")
            for c in t.classes:
                seen.setdefault(c, None)
        self.classes = tuple(seen)

    @classmethod
    def from_mapping(cls, tasks: Mapping[str, Sequence[str]]) -> LabelSpace:
        return cls(tuple(Task(str(n), tuple(str(c) for c in cs)) for n, cs in tasks.items()))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task '{name}'; tasks are {self.names}")

    def indices(self, name: str) -> list[int]:
        """Union index of each class of task `name`, in the task's order."""
        pos = {c: i for i, c in enumerate(self.classes)}
        return [pos[c] for c in self.task(name).classes]

    @property
    def disjoint(self) -> bool:
        return sum(len(t.classes) for t in self.tasks) == len(self.classes)

    def as_dict(self) -> dict[str, list[str]]:
        return {t.name: list(t.classes) for t in self.tasks}
