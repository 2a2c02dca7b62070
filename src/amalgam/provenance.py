"""What produced a result: the code (amalgam's version, git commit, uncommitted changes), the
packages and the machine. Recorded in every run's results.json and every teacher's metadata,
so that two files that should agree and do not can be traced to the code that wrote them.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "lightning", "timm", "hydra-core", "numpy")
PACKAGE_DIR = Path(__file__).resolve().parent


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """amalgam's version and, for a git checkout of amalgam, the commit and whether tracked files
    differ from it (`git_dirty`). Both git fields are None for an installed wheel or without git.
    Read anew on every call: a long-lived process (a notebook) may commit or edit between runs.
    """
    from amalgam import __version__

    out: dict[str, Any] = {"amalgam": __version__, "git_commit": None, "git_dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], package_dir)
    # only amalgam's own repository: not a repository that merely contains site-packages
    if top is None or (Path(top) / "src" / "amalgam").resolve() != package_dir:
        return out
    out["git_commit"] = _git(["rev-parse", "HEAD"], package_dir)
    status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    out["git_dirty"] = None if status is None else bool(status)
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Package versions, Python, and the machine: CPU, threads, and the GPU when there is one."""
    env: dict[str, Any] = {p: _version(p) for p in PACKAGES}
    env["torch"] = torch.__version__  # the build tag (+cpu / +cu130) matters for numerics
    env["python"] = platform.python_version()
    env["cpu"] = cpu_name()
    env["threads"] = torch.get_num_threads()
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


# The code this process runs is the code it imported: a sweep process that outlives a commit (or
# an edit) keeps running what it started with, so the commit recorded is the one at import.
AT_IMPORT: dict[str, Any] = code_version()


def provenance() -> dict[str, Any]:
    """The code at import, and environment(), in one dict (the `provenance` field of results).

    When the checkout changed between this process's import and now (a commit or an edit landed
    while a sweep ran), `git_at_write` adds the commit and dirty flag read now, so the record
    shows both what ran and what the tree held when the file was written.
    """
    out = {**AT_IMPORT, **environment()}
    now = code_version()
    if (now["git_commit"], now["git_dirty"]) != (AT_IMPORT["git_commit"], AT_IMPORT["git_dirty"]):
        out["git_at_write"] = {"git_commit": now["git_commit"], "git_dirty": now["git_dirty"]}
    return out
