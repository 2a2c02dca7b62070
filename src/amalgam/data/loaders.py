"""amalgam's training loaders: `WorkerInit` (workers leave the preemption signals to the main
process) and `ResumableLoader` (a resumed run starts at its checkpoint's position in the epoch).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class WorkerInit:
    """`worker_init_fn` of amalgam's DataLoaders: workers leave the preemption signals to the
    main process.

    SLURM's preemption and `scancel`, and `kill -- -<pgid>`, signal every process of the run,
    DataLoader workers included. A torch worker dies on a SIGTERM that its parent did not send,
    and the main process then raises "DataLoader worker ... is killed by signal" in the middle of
    a step: the run crashes before `Preemption` can save `last.ckpt` (and a Hydra multirun goes
    on with its next job). So each worker blocks SIGTERM / SIGUSR1 / SIGUSR2 and a daemon thread
    takes them with `sigwaitinfo`: sent by the worker's parent (DataLoader shutdown,
    multiprocessing's exit terminating daemonic workers), the worker exits as torch's own handler
    makes it; sent by anyone else, it is dropped, and the main process, which got the same
    signal, saves and stops. A worker whose parent dies exits through torch's watchdog.

    With `seed_everything(workers=True)` it also seeds the worker as Lightning's
    `pl_worker_init_function` (which Lightning adds only to loaders without a worker_init_fn).
    """

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        wanted = {getattr(signal, n) for n in PREEMPTION_SIGNALS if hasattr(signal, n)}
        if wanted and hasattr(signal, "sigwaitinfo"):
            parent = os.getppid()
            signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

            def wait() -> None:
                while True:
                    info = signal.sigwaitinfo(wanted)
                    if info.si_pid == parent:
                        os._exit(0)

            threading.Thread(target=wait, name="amalgam-worker-signals", daemon=True).start()
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


class ResumableLoader(DataLoader):
    """A DataLoader that a resumed fit continues mid-epoch where the interrupted one stood.

    On a resume from a mid-epoch checkpoint (Preemption's `last.ckpt`), Lightning restarts a
    plain DataLoader's epoch at its first batch and runs the number of batches the epoch had left:
    the resumed run trained on the epoch's first batches again instead of its last ones. This
    loader is stateful for Lightning (`state_dict` / `load_state_dict`, kept in the fit loop's
    state of every checkpoint): it records the sampler's epoch and the batches handed out in it,
    and the resumed epoch skips those batches' indices (their images are not loaded).

    Its iterator is made at the first `next()`, not at `iter()`: Lightning calls `iter()` when a
    fit starts, before `set_epoch`, and with workers a DataLoader iterator draws its indices at
    once, so a resumed run with `num_workers > 0` read the order of epoch 0 in its first epoch,
    whatever epoch it resumed in. Exact for samplers whose order is a function of the epoch
    (`set_epoch`: `EpochShuffle`, Lightning's DDP wrapper of it); other samplers restart the
    epoch as a plain DataLoader does. No `__init__` of its own: Lightning re-creates loaders
    (DDP samplers) from DataLoader's arguments.
    """

    _position: tuple[int, int] = (-1, 0)  # (sampler epoch, batches handed out) of this epoch
    _resume: tuple[int, int] | None = None  # a checkpoint's position, used by the next epoch
    _skip = 0  # set only while the iterator of a resumed epoch is made

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _LazyEpoch(self)

    @property
    def _index_sampler(self) -> Any:  # where torch's iterators draw the (batch) indices from
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def _begin(self) -> Iterator[Any]:
        """The DataLoader iterator of the epoch that starts now, past the batches a resumed
        epoch had already trained on."""
        epoch = _sampler_epoch(self)
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and epoch is not None and resume[0] == epoch else 0
        self._position = (-1 if epoch is None else epoch, skip)
        # Making a DataLoader iterator draws its workers' seed from torch's RNG. An uninterrupted
        # run draws it when an epoch starts, before a mid-epoch checkpoint, and with persistent
        # workers once, in its first epoch: those iterators are made without a draw, in a
        # resumed run and (persistent workers) in a fresh one, so both runs draw alike.
        persistent = self.persistent_workers and self.num_workers > 0
        no_draw = skip > 0 or (persistent and self._iterator is None)
        self._skip = skip
        try:
            with torch.random.fork_rng(devices=[]) if no_draw else contextlib.nullcontext():
                return super().__iter__()
        finally:
            self._skip = 0

    def _handed_out(self) -> None:
        epoch, batches = self._position
        self._position = (epoch, batches + 1)


class _LazyEpoch(Iterator[Any]):
    """One epoch of a ResumableLoader; the DataLoader iterator is made at the first `next()`."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._begin()
        batch = next(self.iterator)
        self.loader._handed_out()
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "iterator": None}  # torch's iterators cannot be pickled


class _SkipFirst:
    """An index (or batch) sampler whose first iteration leaves out its first `n` items."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler = sampler
        self.n = n

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        # a generator: this runs at the first next(), not at iter() (a worker iterator calls
        # iter() twice when it is made), and later epochs (persistent workers) get all items
        n, self.n = self.n, 0
        yield from itertools.islice(self.sampler, n, None)


def _sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch of the loader's epoch-seeded sampler (the one Lightning calls `set_epoch` on)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (loader.sampler, getattr(batch_sampler, "sampler", None)):
        epoch = getattr(sampler, "epoch", None)
        if callable(getattr(sampler, "set_epoch", None)) and isinstance(epoch, int):
            return epoch
    return None
