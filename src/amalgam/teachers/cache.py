"""Teacher-output cache: each frozen teacher's logits and feature maps over the unlabeled pool,
computed once and stored as fp16 memory-mapped arrays, one directory per teacher.

A directory's name is a hash of everything that determines its content: the teacher's weight
hash and preprocessing, the feature levels, the data set, the image ids and the view transform.
Its `manifest.json` is written last (a completion marker) and records shapes and checksums; a
partial or corrupt cache fails verification and is rebuilt, never used.

Jobs that share a cache (a sweep, a SLURM array) build each directory once: its builder holds
`.<dir>.lock` next to it (an OS file lock: released when the process ends, however it ends) and
builds in a temporary `<dir>.building.<host>.<pid>.<random>`, renamed into place when complete.
The others wait on the lock and then reuse what it built; a killed builder's lock is free at
once, and its temporary directory is removed by the next job that takes the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from rich.progress import Progress

from amalgam.files import HOST, atomic_write_text
from amalgam.teachers.bank import TeacherBank, TeacherOutputs
from amalgam.utils import log, pid_alive

FORMAT = 2
ARRAYS = "[lf]*.npy"  # logits.npy, feat<j>.npy (not the view table)
IN_MEMORY_BYTES = 2 << 30  # arrays below this size are read into RAM instead of memory-mapped
BUILDING = ".building"  # a cache dir's temporary build dirs: <dir>.building.<host>.<pid>.<random>
LOCK_POLL_S = 5.0  # a waiting rank 0 retries a build lock this often; its ranks meet in between


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def teacher_key(bank: TeacherBank, name: str, data_key: Mapping[str, Any]) -> dict[str, Any]:
    t = bank.teachers[name]
    meta = asdict(bank.metas[name])
    return {
        "format": FORMAT,
        "teacher_sha256": meta["sha256"],
        "arch": meta["arch"],
        "preprocess": {"in_chans": t.in_chans, "input_size": t.input_size, "norm": t.norm},
        "feature_indices": list(t.feature_indices),
        "dtype": str(bank.dtype),
        "data": dict(data_key),
    }


def cache_dir(root: Path, bank: TeacherBank, name: str, key: Mapping[str, Any]) -> Path:
    """The directory of teacher `name`'s cache for `key` (its teacher_key) under `root`."""
    return root / f"{name}-{bank.metas[name].sha256[:12]}-{digest(key)[:16]}"


def row_index(ids: torch.Tensor) -> torch.Tensor:
    """Row of each image id in the cache arrays (-1 for ids outside the pool)."""
    row = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    row[ids] = torch.arange(len(ids))
    return row


ViewFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Broadcast = Callable[[Any], Any]  # an object -> rank 0's object (every rank calls it)


def _same(obj: Any) -> Any:
    """The broadcast of a single process."""
    return obj


class TeacherCache:
    """Row lookup of cached teacher outputs by image id (and view): a source of TeacherOutputs.

    With K cached views, the arrays hold K blocks of len(ids) rows: view k of pool row r is at
    row k * len(ids) + r.
    """

    def __init__(self, dirs: Mapping[str, Path], ids: torch.Tensor, views: int = 1) -> None:
        self.dirs = dict(dirs)
        self.n, self.views = len(ids), views
        self.logits: list[np.ndarray] = []
        self.features: list[list[np.ndarray]] = []
        for d in self.dirs.values():
            m = json.loads((d / "manifest.json").read_text())
            self.logits.append(self._open(d / "logits.npy"))
            self.features.append([self._open(d / f"feat{i}.npy") for i in range(m["levels"])])
        self.row_of = row_index(ids)

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        small = path.stat().st_size < IN_MEMORY_BYTES
        return np.load(path) if small else np.load(path, mmap_mode="r")

    def rows(self, index: torch.Tensor, view: torch.Tensor | None = None) -> np.ndarray:
        index = index.cpu()
        known = (index >= 0) & (index < len(self.row_of))
        r = self.row_of[torch.where(known, index, 0)].masked_fill(~known, -1)
        if (r < 0).any():
            raise KeyError("an image id is not in the teacher cache: the pool changed; rebuild")
        if self.views > 1 and view is None:
            raise KeyError(f"the cache holds {self.views} views per image: give each row's view")
        if view is not None:
            v = view.cpu().long()
            if ((v < 0) | (v >= self.views)).any():
                raise KeyError(f"view out of range: the cache holds {self.views} views")
            r = r + v * self.n
        return r.numpy()

    def lookup(
        self,
        index: torch.Tensor,
        device: torch.device | str,
        features: bool = True,
        view: torch.Tensor | None = None,
    ) -> TeacherOutputs:
        """TeacherOutputs (float32) for the images with ids `index` (in views `view`)."""
        r = self.rows(index, view)

        def take(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[r])).to(device).float()

        return TeacherOutputs(
            [take(a) for a in self.logits],
            [[take(f) for f in fs] if features else [] for fs in self.features],
        )


def verify(d: Path, key: Mapping[str, Any], checksums: bool = True) -> bool:
    """True when `d` holds a complete cache for exactly `key` whose files are intact."""
    mf = d / "manifest.json"
    if not mf.is_file():
        return False
    try:
        m = json.loads(mf.read_text())
        if m.get("key") != json.loads(json.dumps(dict(key), default=str)):
            return False
        for name, info in m["files"].items():
            p = d / name
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return False
            if checksums and file_checksum(p) != info["checksum"]:
                return False
            arr = np.load(p, mmap_mode="r")
            if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
                return False
        view = m["key"].get("data", {}).get("view", {})
        if isinstance(view, dict) and "params_sha256" in view:
            table = np.load(d / "views.npy").astype(np.int64)
            if hashlib.sha256(table.tobytes()).hexdigest() != view["params_sha256"]:
                return False
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False
    return True


@torch.no_grad()
def allocate(bank: TeacherBank, sample: torch.Tensor, n: int, dirs: Mapping[str, Path]) -> None:
    """Create each teacher's fp16 arrays ([n rows, ...]) with shapes read off one sample batch."""
    out = bank(sample)
    for i, name in enumerate(bank.names):
        shapes = {"logits.npy": (n, out.logits[i].shape[1])}
        shapes |= {f"feat{j}.npy": (n, *f.shape[1:]) for j, f in enumerate(out.features[i])}
        for fname, shape in shapes.items():
            a = np.lib.format.open_memmap(
                dirs[name] / fname, mode="w+", dtype=np.float16, shape=shape
            )
            a.flush()
            del a


@torch.no_grad()
def fill(
    bank: TeacherBank,
    loader: Iterable[dict[str, torch.Tensor]],
    ids: torch.Tensor,
    dirs: Mapping[str, Path],
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    views: int = 1,
    view_fn: ViewFn | None = None,
) -> None:
    """Write the rows of the batches this rank owns (batch b belongs to rank b % world).

    With `views` > 1, each batch is run through the teachers once per view, as made by
    `view_fn(images, pool_rows, k)`, and stored in block k.
    """
    row = row_index(ids)
    n = len(ids)
    arrays = {
        name: {p.name: np.load(p, mmap_mode="r+") for p in sorted(dirs[name].glob(ARRAYS))}
        for name in bank.names
    }
    total = len(loader) if hasattr(loader, "__len__") else None
    with Progress(disable=rank != 0, transient=True) as bar:
        task = bar.add_task("caching teacher outputs", total=total)
        for b, batch in enumerate(loader):
            bar.advance(task)
            if b % world != rank:
                continue
            x = batch["image"].to(device)
            rows = row[batch["index"]]
            for k in range(views):
                out = bank(view_fn(x, rows, k) if view_fn is not None else x)
                r = (rows + k * n).numpy()
                for i, name in enumerate(bank.names):
                    a = arrays[name]
                    a["logits.npy"][r] = out.logits[i].float().cpu().numpy()
                    for j, f in enumerate(out.features[i]):
                        a[f"feat{j}.npy"][r] = f.float().cpu().numpy()
    for per in arrays.values():
        for a in per.values():
            a.flush()


def write_manifest(d: Path, key: Mapping[str, Any], views: int = 1) -> None:
    files = {}
    levels = 0
    for p in sorted(d.glob("*.npy")):
        arr = np.load(p, mmap_mode="r")
        files[p.name] = {
            "bytes": p.stat().st_size,
            "checksum": file_checksum(p),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
        }
        levels += p.name.startswith("feat")
    manifest = {"key": dict(key), "files": files, "levels": levels, "views": views}
    atomic_write_text(d / "manifest.json", json.dumps(manifest, indent=2, default=str))


def lock_path(d: Path) -> Path:
    """The build lock of cache dir `d`: a hidden file next to it, never deleted (every job must
    lock the same file)."""
    return d.with_name(f".{d.name}.lock")


def new_build_dir(d: Path) -> Path:
    """A fresh temporary directory name to build `d` in, naming this host and process."""
    return d.with_name(f"{d.name}{BUILDING}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}")


def build_dirs(d: Path) -> list[tuple[Path, str, int]]:
    """The temporary build dirs of `d` there are now, each with the host and pid that made it."""
    pattern = re.compile(rf"^{re.escape(d.name + BUILDING)}\.([A-Za-z0-9_-]+)\.(\d+)\.[0-9a-f]+$")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(d.parent):
            if m := pattern.match(entry.name):
                found.append((Path(entry.path), m.group(1), int(m.group(2))))
    return found


def remove_stale_builds(d: Path) -> list[Path]:
    """Delete the build dirs of `d` that killed jobs on this host left (their pid is gone), and
    the fixed `<dir>.building` of earlier versions; returns them. Call it holding d's lock.
    Build dirs of other hosts are kept: whether their process lives cannot be told from here."""
    stale = [
        p
        for p, host, pid in build_dirs(d)
        if host == HOST and pid != os.getpid() and not pid_alive(pid)
    ]
    legacy = d.with_name(d.name + BUILDING)
    stale += [legacy] if legacy.is_dir() else []
    for p in stale:
        log.info("teacher cache: removing %s, left by a build that was killed", p)
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _holder(d: Path) -> str:
    """Who builds `d`, as its build dirs tell: 'host <h>, pid <p>' (or that no dir is made yet)."""
    jobs = [f"host {host}, pid {pid}" for _, host, pid in build_dirs(d)]
    return "; ".join(jobs) or "no build dir made yet"


def _try_lock(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=LOCK_POLL_S)
    except Timeout:
        return False
    return True


def acquire_build_lock(d: Path, rank: int, broadcast: Broadcast) -> FileLock | None:
    """Take the build lock of cache dir `d` on rank 0 (returned; None on the other ranks),
    however long another job holds it.

    No timeout: the lock is the operating system's, freed when its holder ends, however it ends,
    so the wait ends when the other build is done or dead; a build can take hours, and a timeout
    would fail healthy jobs. A wait is logged once, naming the holder. The ranks of a DDP job
    meet in `broadcast` after each try of LOCK_POLL_S seconds, so none of its collectives waits
    longer than that (a single long one would hit the process group's timeout).
    """
    lock = FileLock(lock_path(d)) if rank == 0 else None
    waiting = False
    while not broadcast(lock is not None and _try_lock(lock)):
        if lock is not None and not waiting:
            log.info("teacher cache: waiting for %s, built by another job (%s)", d, _holder(d))
            waiting = True
    return lock


def manifest_stamp(d: Path) -> tuple[int, int, int] | None:
    """Identifies the manifest of `d` (inode, mtime, size; None without one): a new one means
    another job has written the cache since."""
    try:
        st = (d / "manifest.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def failing(
    dirs: Mapping[str, Path], keys: Mapping[str, Mapping[str, Any]]
) -> dict[str, tuple[int, int, int] | None]:
    """The caches that fail verification, each with its manifest_stamp from before the check."""
    stamps = {n: manifest_stamp(d) for n, d in dirs.items()}
    return {n: stamps[n] for n in dirs if not verify(dirs[n], keys[n])}


def lock_missing(
    dirs: Mapping[str, Path],
    keys: Mapping[str, Mapping[str, Any]],
    seen: Mapping[str, tuple[int, int, int] | None],
    rank: int,
    broadcast: Broadcast,
) -> tuple[dict[str, Path], list[FileLock]]:
    """Lock the caches that failed verification (`seen`: their manifest_stamp then) and keep
    those still missing: a job we waited for built the others.

    Locks are taken in path order, so that two jobs never hold one each and wait for the other.
    A cache with a new manifest is checked without checksums while its lock is held (the job
    that wrote it just computed them), so that many waiting jobs pass the lock on in turn in
    moments, not one full read of the cache each. Returns the temporary build dir of each cache
    to build (rank 0's names, on every rank) and the locks rank 0 holds for them.
    """
    locks: list[FileLock] = []
    missing = set()
    try:
        for n in sorted(seen, key=lambda n: dirs[n].name):
            lock = acquire_build_lock(dirs[n], rank, broadcast)
            if lock is None:
                continue
            remove_stale_builds(dirs[n])
            new = manifest_stamp(dirs[n]) not in (None, seen[n])
            if verify(dirs[n], keys[n], checksums=not new):
                lock.release()
            else:
                locks.append(lock)
                missing.add(n)
        tmp = {n: new_build_dir(dirs[n]) for n in seen if n in missing} if rank == 0 else None
        return broadcast(tmp), locks
    except BaseException:
        for lock in locks:
            lock.release()
        raise


def build(
    bank: TeacherBank,
    keys: Mapping[str, Mapping[str, Any]],
    dirs: Mapping[str, Path],
    tmp: Mapping[str, Path],
    ids: torch.Tensor,
    loader_factory: Callable[[], Iterable[dict[str, torch.Tensor]]],
    device: torch.device | str,
    rank: int,
    world: int,
    barrier: Callable[[], None],
    view_table: torch.Tensor | None = None,
    view_fn: ViewFn | None = None,
) -> None:
    """Build the caches `dirs[n]` for n in `tmp` in their build dirs `tmp[n]`, over all ranks,
    and rename them into place. Rank 0 holds their locks; a failed build's dirs are removed."""
    todo = list(tmp)
    views = 1 if view_table is None else int(view_table.shape[0])
    t0 = time.perf_counter()
    try:
        if rank == 0:
            for n in todo:
                if dirs[n].exists():
                    log.warning("teacher cache %s is partial or corrupt: rebuilding", dirs[n])
                shutil.rmtree(dirs[n], ignore_errors=True)
                tmp[n].mkdir(parents=True)
        barrier()
        sub = TeacherBank(
            {n: bank.teachers[n] for n in todo},
            {n: bank.metas[n] for n in todo},
            {n: bank.paths[n] for n in todo},
        )
        loader = loader_factory()
        if rank == 0:
            sample = next(iter(loader))["image"][:2].to(device)
            if sample.ndim == 5:  # every view of each image at once: shapes are one view's
                sample = sample[:, 0]
            allocate(sub, sample, views * len(ids), tmp)
            if view_table is not None:
                for n in todo:
                    np.save(tmp[n] / "views.npy", view_table.numpy().astype(np.int16))
        barrier()
        fill(sub, loader, ids, tmp, device, rank, world, views, view_fn)
        barrier()
        if rank == 0:
            for n in todo:
                write_manifest(tmp[n], keys[n], views)
                os.replace(tmp[n], dirs[n])
        barrier()
    except BaseException:
        if rank == 0:
            for p in tmp.values():
                shutil.rmtree(p, ignore_errors=True)
        raise
    log.info(
        "teacher cache: built %s over %d images x %d view(s) in %.1f s",
        ", ".join(todo),
        len(ids),
        views,
        time.perf_counter() - t0,
    )


def open_or_build(
    root: str | Path,
    bank: TeacherBank,
    data_key: Mapping[str, Any],
    ids: torch.Tensor,
    loader_factory: Callable[[], Iterable[dict[str, torch.Tensor]]],
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    view_table: torch.Tensor | None = None,
    view_fn: ViewFn | None = None,
    broadcast: Broadcast = _same,
) -> TeacherCache:
    """Reuse each teacher's valid cache; (re)build the missing or broken ones, over all ranks.

    `view_table` ([K, len(ids), 3]) and `view_fn` cache K augmented views per image: the table
    (the parameters that made the views) is stored next to the outputs as `views.npy`, and
    `data_key` must identify it (the data module's cache_key does).
    Rank 0 decides (it verifies, takes the build locks, names the build dirs) and `broadcast`
    (an object -> rank 0's object, e.g. a Lightning strategy's) tells the other ranks.
    """
    views = 1 if view_table is None else int(view_table.shape[0])
    if (view_table is None) != (view_fn is None):
        raise ValueError("give view_table and view_fn together")
    if world > 1 and broadcast is _same:
        raise ValueError("give broadcast with world > 1: the ranks must agree on the build dirs")
    root = Path(root)
    keys = {n: teacher_key(bank, n, data_key) for n in bank.names}
    dirs = {n: cache_dir(root, bank, n, k) for n, k in keys.items()}
    seen = broadcast(failing(dirs, keys) if rank == 0 else None)
    built: dict[str, Path] = {}
    if seen:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
        built, locks = lock_missing(dirs, keys, seen, rank, broadcast)
        try:
            if built:
                build(
                    bank,
                    keys,
                    dirs,
                    built,
                    ids,
                    loader_factory,
                    device,
                    rank,
                    world,
                    barrier,
                    view_table,
                    view_fn,
                )
        finally:
            for lock in locks:
                lock.release()
    reused = [n for n in bank.names if n not in built]
    if reused:
        log.info("teacher cache: reused %s (%d images) from %s", ", ".join(reused), len(ids), root)
    return TeacherCache(dirs, ids, views)
