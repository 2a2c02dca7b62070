"""A run dir belongs to one run: one process at a time, and a finished run is never overwritten.

- `claim(dir)` takes an exclusive lock in the run dir (`.amalgam.lock`, an OS file lock through
  the `filelock` package: the operating system releases it when the process ends, however it
  ends, so a crashed run never blocks the dir) and records who holds it (`.amalgam.owner.json`:
  pid, host, start time, command). A second process is refused at start, with the dir and the
  holder in the message. An owner record left behind by a dead process is reported and replaced.
- `refuse_finished(dir, resume_from)` refuses a new run (not a resume of this dir's own
  checkpoint) into a dir that holds `results.json` or checkpoints.
- `check_free_space(dir, need)` refuses a run whose checkpoints would not fit on the disk.

The Hydra callback `amalgam.launch.Preflight` runs these before Hydra writes anything into the
dir; `Amalgamation.from_config` runs them again (a no-op for the process that holds the lock),
so the Python API is guarded the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from amalgam.errors import ConfigError
from amalgam.files import atomic_write_text, megabytes
from amalgam.utils import log, nearest_existing, pid_alive

LOCK = ".amalgam.lock"
OWNER = ".amalgam.owner.json"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK")
_HELD: dict[str, FileLock] = {}  # run dirs this process holds


def is_rank_zero() -> bool:
    """False in a DDP child or a SLURM task other than the first: rank 0 holds the run dir for
    all ranks of its run (they write nothing there but what rank 0 coordinates)."""
    for var in RANK_VARIABLES:
        value = os.environ.get(var)
        if value and value.isdigit() and int(value) > 0:
            return False
    return True


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    """The owner record (untrusted: plain JSON, only the fields below are used)."""
    try:
        rec = json.loads((run_dir / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "a process that left no owner record"
    pid, host = owner.get("pid"), owner.get("host")
    since = owner.get("started")
    cmd = str(owner.get("command") or "")[:120]
    return f"pid {pid} on {host}, started {since}" + (f": {cmd}" if cmd else "")


def _write_owner(run_dir: Path) -> None:
    rec = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    atomic_write_text(run_dir / OWNER, json.dumps(rec))


def claim(run_dir: str | os.PathLike) -> None:
    """Hold `run_dir` for this process until `release` or the process's end; refuse when
    another live process holds it."""
    d = Path(run_dir).expanduser().absolute()
    key = str(d)
    if key in _HELD or not is_rank_zero():
        return
    d.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"run dir '{d}' is in use by another run ({describe(read_owner(d))}): two runs in "
            "one dir overwrite each other's checkpoints and metrics. Wait for it to end, or give "
            "this run its own dir (leave hydra.run.dir at its timestamped default, or set "
            "hydra.run.dir=<new dir>)"
        ) from None
    left = read_owner(d)
    if left and left.get("pid") != os.getpid():
        alive = isinstance(left.get("pid"), int) and pid_alive(left["pid"])
        same_host = left.get("host") == socket.gethostname()
        log.warning(
            "run dir %s: a previous run (%s) ended without releasing it%s; taking it over",
            d,
            describe(left),
            "" if alive or not same_host else " (that process is gone)",
        )
    _write_owner(d)
    _HELD[key] = lock


def release(run_dir: str | os.PathLike) -> None:
    """Give `run_dir` back (the owner record is removed, then the lock)."""
    d = Path(run_dir).expanduser().absolute()
    lock = _HELD.pop(str(d), None)
    if lock is None:
        return
    with contextlib.suppress(OSError):
        (d / OWNER).unlink()
    lock.release()


def holds(run_dir: str | os.PathLike) -> bool:
    return str(Path(run_dir).expanduser().absolute()) in _HELD


def claim_for_run(run_dir: str | os.PathLike, resume_from: str | os.PathLike | None) -> None:
    """`claim` the dir, then `refuse_finished` (giving the dir back when refused). Ranks other
    than 0 do neither: rank 0 holds the dir for its run."""
    if not is_rank_zero():
        return
    claim(run_dir)
    try:
        refuse_finished(run_dir, resume_from)
    except ConfigError:
        release(run_dir)
        raise


def finished_files(run_dir: Path) -> list[str]:
    """What in `run_dir` a new run would overwrite: results.json and checkpoints."""
    found = ["results.json"] if (run_dir / "results.json").is_file() else []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in ckpts.glob("*.ckpt"))
    return found


def refuse_finished(run_dir: str | os.PathLike, resume_from: str | os.PathLike | None) -> None:
    """A new run must not overwrite a run dir's results or checkpoints; a resume from one of
    this dir's own checkpoints continues that run and may."""
    d = Path(run_dir).expanduser().absolute()
    if resume_from is not None:
        own = d / "checkpoints"
        if Path(resume_from).expanduser().absolute().parent == own:
            return
    found = finished_files(d)
    if found:
        shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
        how = "a resume of another run's checkpoint" if resume_from else "a new run"
        raise ConfigError(
            f"run dir '{d}' already holds a run ({shown}); {how} would overwrite it. Resume "
            "that run with ckpt_path=last (and the same hydra.run.dir), or give this run its "
            "own dir (hydra.run.dir=<new dir>, or leave it at its timestamped default)"
        )


def check_free_space(run_dir: str | os.PathLike, need_bytes: int, key: str) -> None:
    """Refuse a run whose files would not fit in the free space of `run_dir`'s disk."""
    base = nearest_existing(Path(run_dir).expanduser().absolute())
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    if free < need_bytes:
        raise ConfigError(
            f"{key}='{run_dir}': the disk holding '{base}' has {megabytes(free)} free, but this "
            f"run's checkpoints need about {megabytes(need_bytes)}; free space there (old runs "
            "under logs/, "
            "teacher caches under cache/) or write elsewhere (hydra.run.dir=<dir on a disk with "
            "room>, or paths.log_dir=<dir>)"
        )


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested checkpoint dict."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0
