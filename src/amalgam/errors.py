"""The one error type of bad input: `ConfigError`, raised before any heavy work."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class ConfigError(ValueError, CompactHydraException):
    """Bad input found before any heavy work; the message names the key or file and the fix.

    A CompactHydraException: a Hydra entry point prints its message alone, one line, with no
    traceback (HYDRA_FULL_ERROR=1 still shows the traceback).
    """
