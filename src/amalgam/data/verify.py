"""Decode every file of an image folder once, when the data set is built, not mid-epoch.

A file with an image extension that is no image, a truncated JPEG or a file that cannot be
read would otherwise stop a run at the first batch that holds it, possibly hours in.
`find_bad_images` decodes the files in a thread pool (PIL releases the GIL while it decodes)
and remembers the good ones by (path, size, mtime_ns) in a small JSON file under the user cache
dir (`$XDG_CACHE_HOME/amalgam/image-check`, else `~/.cache/amalgam/image-check`), one file per
data directory, so a read-only data directory still works and a second build decodes nothing.
If the cache cannot be written the check simply runs again next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from amalgam.files import atomic_write_text

CACHE_VERSION = 1
CHUNK = 64  # files per pool task: few futures even for a million files

Signature = tuple[int, int]  # (size in bytes, mtime_ns)


def describe_error(e: BaseException) -> str:
    """One line saying why a file could not be decoded."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(e, OSError) and e.errno is not None:
        return f"cannot be read: {e.strerror}"
    text = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def check_image(path: str) -> str | None:
    """None if PIL decodes the file to RGB as `load_image` does, else the reason it fails.

    `Image.verify()` misses truncated JPEGs, so the pixels are decoded; JPEGs at 1/8 scale
    (`draft`), which still reads the whole entropy-coded stream but skips most of the IDCT.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.convert("RGB")
    except Exception as e:  # any failure of an untrusted file is a reason to report
        return describe_error(e)
    return None


# ---------------------------------------------------------------- the cache of good files


def cache_file(directory: Path) -> Path:
    """Where the good files of `directory` are remembered: one JSON file per data directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    resolved = str(Path(directory).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return Path(base) / "amalgam" / "image-check" / f"{Path(resolved).name}-{digest}.json"


def _is_signature(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def read_cache(path: Path) -> dict[str, Signature]:
    """The remembered good files; a missing, unreadable or malformed cache reads as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: (v[0], v[1]) for k, v in files.items() if _is_signature(v)}


def write_cache(path: Path, files: dict[str, Signature]) -> None:
    """Replace the cache atomically; if it cannot be written, do without it."""
    payload = json.dumps({"version": CACHE_VERSION, "files": files}, separators=(",", ":"))
    with contextlib.suppress(OSError):
        atomic_write_text(path, payload)


# ---------------------------------------------------------------- the check


def _signature(path: str) -> Signature | str:
    """(size, mtime_ns) of the file, or why it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        return describe_error(e)
    return (st.st_size, st.st_mtime_ns)


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(32, cores or 1))


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def _check_chunk(paths: Sequence[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


def _decode_all(paths: Sequence[str], label: str) -> list[str | None]:
    """`check_image` of each path, in a thread pool sized to the cores, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    quiet = os.environ.get("LOCAL_RANK", "0") not in ("", "0")  # one bar per machine, not rank
    reasons: list[str | None] = []
    with (
        Progress(*columns, console=Console(stderr=True), disable=quiet) as progress,
        ThreadPoolExecutor(max_workers=_workers()) as pool,
    ):
        task = progress.add_task(label, total=len(paths))
        for chunk in pool.map(_check_chunk, _chunks(paths)):
            reasons += chunk
            progress.advance(task, len(chunk))
    return reasons


def find_bad_images(
    directory: str | Path, paths: Sequence[str], label: str = "checking images"
) -> list[tuple[str, str]]:
    """(path, reason) of each of `paths` (files under `directory`) that does not decode.

    Files whose (path, size, mtime_ns) were found good before are not decoded again.
    """
    cache = cache_file(Path(directory))
    known = read_cache(cache)
    root = str(Path(directory).expanduser())
    bad: list[tuple[str, str]] = []
    good: dict[str, Signature] = {}
    todo: list[tuple[str, str, Signature]] = []
    for p in paths:
        sig = _signature(p)
        if isinstance(sig, str):
            bad.append((p, sig))
            continue
        key = os.path.relpath(p, root)
        if known.get(key) == sig:
            good[key] = sig
        else:
            todo.append((p, key, sig))
    reasons = _decode_all([p for p, _, _ in todo], label) if todo else []
    for (p, key, sig), reason in zip(todo, reasons):
        if reason is None:
            good[key] = sig
        else:
            bad.append((p, reason))
    if good != known:
        write_cache(cache, good)
    return sorted(bad)
