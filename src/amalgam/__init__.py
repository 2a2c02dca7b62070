"""amalgam: knowledge amalgamation of heterogeneous teachers into one student, label-free.

From Python (a notebook): `amalgam.compose`, `amalgam.Amalgamation`, `amalgam.load`
(docs/API.md). They are imported on first use, so `import amalgam.<module>` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Amalgamation": "amalgam.api",
    "compose": "amalgam.api",
    "load": "amalgam.api",
    "preset": "amalgam.build",
    "ConfigError": "amalgam.errors",
    "AmalgamDataModule": "amalgam.data",
    "Teacher": "amalgam.teachers.bank",
    "TeacherBank": "amalgam.teachers.bank",
    "load_teacher_bank": "amalgam.teachers.bank",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'amalgam' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
