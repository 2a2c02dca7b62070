"""Every file amalgam writes, written atomically: a temporary file in the target's directory,
fsync, `os.replace`, fsync of the directory. A reader (or a resumed run) sees the old file or the
new one, never a torn one, whatever kills the writer; a full disk is named as such
(`DiskFullError`), with the free space and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from hydra.errors import CompactHydraException

from amalgam.utils import nearest_existing, pid_alive

__all__ = [
    "DiskFullError",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "disk_full",
    "disk_full_error",
    "fsync_dir",
    "megabytes",
    "remove_stale_temps",
]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------ disk full


def megabytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


class DiskFullError(OSError, CompactHydraException):
    """A write failed for want of disk space; the message names the file, the free space and
    what to do (files written before it are intact: every write is atomic)."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full(e: BaseException, path: str | os.PathLike, need_bytes: int = 0) -> bool:
    """Whether `e`, raised while writing `path`, means the disk is full: ENOSPC/EDQUOT, or a
    torch zip-writer error while less than `need_bytes` (plus 1 MB) is free there."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStream" in text):
        try:
            free = shutil.disk_usage(nearest_existing(Path(path).absolute().parent)).free
        except OSError:
            return False
        return free < need_bytes + 2**20
    return False


def disk_full_error(path: str | os.PathLike, need_bytes: int = 0) -> DiskFullError:
    base = nearest_existing(Path(path).absolute().parent)
    try:
        free = megabytes(shutil.disk_usage(base).free)
    except OSError:
        free = "no space"
    need = f", it needs about {megabytes(need_bytes)}" if need_bytes else ""
    return DiskFullError(
        errno.ENOSPC,
        f"writing '{path}' failed: the disk is full ('{base}' has {free} free{need}). The files "
        "written before it are intact. Free space there (old runs under logs/, teacher caches "
        "under cache/) or write elsewhere (hydra.run.dir=<dir on a disk with room>), then "
        "resume with ckpt_path=last",
    )


# ----------------------------------------------------------------------------- atomic files


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path) -> str:
    """`.<name>.<host>.<pid>.`: names the writer, so a later save can spot a dead one's files."""
    return f".{path.name}.{HOST}.{os.getpid()}."


def _new_temp(path: Path, keep_suffix: bool = False) -> tuple[int, Path]:
    """A new temporary file next to `path`: `.<name>.<host>.<pid>.<random>.tmp` (+ the suffix
    of `path` with keep_suffix, for writers that pick the format from it)."""
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    return fd, Path(tmp)


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in `directory` durable (a no-op where the file system cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Delete the temporary files that writers of `path` on this host left when they were killed
    (their process is gone); returns them. Files of live writers and other hosts are kept."""
    path = Path(path)
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.{re.escape(HOST)}\.(\d+)\."
        rf"[^.]+\.tmp({re.escape(path.suffix)})?$"
    )
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)
    remove_stale_temps(path)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes only ('w', 'wb'), got mode '{mode}'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not isinstance(e, DiskFullError) and disk_full(e, path):
            raise disk_full_error(path) from e
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path (same directory and suffix) for writers that want a file name, e.g.
    `fig.savefig(tmp)`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path, keep_suffix=True)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (old or new content, never a torn file)."""
    with atomic_open(path, "wb") as f:
        f.write(text.encode(encoding))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)
