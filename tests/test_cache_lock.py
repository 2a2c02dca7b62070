"""Jobs that share a teacher cache: one builds it, the others wait and reuse it; a killed builder
blocks no one and its temporary build dir is removed; the ranks of a job agree on one build dir."""

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout
from torch import nn

from amalgam.backbone import Backbone
from amalgam.teachers import TeacherBank, TeacherMeta
from amalgam.teachers import cache as tc

N, BATCH, SIZE = 64, 8, 8
IMAGES = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
IDS = torch.arange(N)
KEY = {"source": "lock-test", "n": N}
JOB = """
import sys
sys.path.insert(0, sys.argv[1])
import test_cache_lock
test_cache_lock.job(sys.argv[2])
"""


class Tiny(nn.Module):
    """A one-conv classifier with timm's forward_features / forward_head split."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, k)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def tiny_bank() -> TeacherBank:
    """Two tiny teachers, the same in every process."""
    torch.manual_seed(0)
    teachers, metas = {}, {}
    for name, k in (("a", 3), ("b", 2)):
        teachers[name] = Backbone(Tiny(k), input_size=SIZE)
        classes = [f"{name}{i}" for i in range(k)]
        metas[name] = TeacherMeta(name, "tiny", classes, input_size=SIZE, sha256=name * 64)
    return TeacherBank(teachers, metas, {n: "memory" for n in teachers})


class Loader:
    """The pool in batches, `pause` s each; touches `started` at the first batch; with `hold`,
    waits at the second batch of an epoch until that file exists (a build stopped half-way)."""

    def __init__(self, pause: float = 0.0, started: str | None = None, hold: str | None = None):
        self.pause, self.started, self.hold = pause, started, hold

    def __len__(self) -> int:
        return N // BATCH

    def __iter__(self):
        for i, b in enumerate(range(0, N, BATCH)):
            if self.started:
                Path(self.started).touch()
            while self.hold and i == 1 and not Path(self.hold).exists():
                time.sleep(0.01)
            time.sleep(self.pause)
            yield {"image": IMAGES[b : b + BATCH], "index": IDS[b : b + BATCH]}


def arrays(cache: tc.TeacherCache) -> list[np.ndarray]:
    return [np.asarray(a) for a in cache.logits + [f for fs in cache.features for f in fs]]


def job(spec_json: str) -> None:
    """One training job's cache opening, in a child process (see `start_job`)."""
    spec = json.loads(spec_json)
    logger = logging.getLogger("amalgam")
    logger.addHandler(logging.FileHandler(spec["log"]))
    logger.setLevel(logging.INFO)
    bank = tiny_bank()
    Path(spec["ready"]).touch()
    while spec["gate"] and not Path(spec["gate"]).exists():
        time.sleep(0.005)
    loader = Loader(spec["pause"], spec["started"], spec["hold"])
    cache = tc.open_or_build(spec["root"], bank, KEY, IDS, lambda: loader)
    np.savez(spec["out"], *arrays(cache))


def start_job(tmp_path: Path, name: str, **spec) -> tuple[subprocess.Popen, dict]:
    """`job` in a new process, on the cache root tmp_path/cache; spec: gate (a file to wait for
    before opening), pause, started, hold (see Loader)."""
    spec = {
        "root": str(tmp_path / "cache"),
        "log": str(tmp_path / f"{name}.log"),
        "out": str(tmp_path / f"{name}.npz"),
        "ready": str(tmp_path / f"{name}.ready"),
        "gate": None,
        "pause": 0.0,
        "started": None,
        "hold": None,
        **spec,
    }
    err = (tmp_path / f"{name}.err").open("w")
    tests = str(Path(__file__).parent)
    p = subprocess.Popen([sys.executable, "-c", JOB, tests, json.dumps(spec)], stderr=err)
    return p, spec


def wait_for(path: str | Path, p: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` exists; fails if process `p` ends first."""
    end = time.monotonic() + timeout
    while not Path(path).exists():
        assert p.poll() is None, f"the job ended (rc {p.returncode}) before {path} was made"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.01)


def finish(p: subprocess.Popen, spec: dict) -> str:
    """Wait for the job; its log (its stderr in the message if it failed)."""
    rc = p.wait(timeout=120)
    err = Path(spec["log"]).with_suffix(".err").read_text()
    assert rc == 0, f"the job failed (rc {rc}):\n{err[-3000:]}"
    return Path(spec["log"]).read_text()


def assert_teacher_outputs(cache: tc.TeacherCache) -> None:
    def tensors(out):
        return out.logits + [f for fs in out.features for f in fs]

    got, want = tensors(cache.lookup(IDS, "cpu")), tensors(tiny_bank()(IMAGES))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-3)  # fp16 storage


@pytest.mark.slow  # child processes: ~5-10 s of imports each
def test_two_jobs_at_once_build_once_and_read_the_same_cache(tmp_path):
    gate = tmp_path / "go"
    jobs = [start_job(tmp_path, f"job{i}", gate=str(gate), pause=0.1) for i in range(2)]
    for p, spec in jobs:
        wait_for(spec["ready"], p)
    gate.touch()  # both open the missing cache at the same moment
    logs = [finish(p, spec) for p, spec in jobs]
    assert sum("teacher cache: built a, b" in log for log in logs) == 1
    assert all("teacher cache: reused a, b" in log for log in logs if "cache: built" not in log)
    one, two = (np.load(spec["out"]) for _, spec in jobs)
    assert len(one.files) == 4  # logits and one feature map per teacher
    for name in one.files:
        assert np.array_equal(one[name], two[name])
    root = tmp_path / "cache"
    assert sorted(p.name[0] for p in root.iterdir() if not p.name.startswith(".")) == ["a", "b"]


@pytest.mark.slow  # child processes: ~5-10 s of imports each
def test_a_killed_builder_blocks_no_one_and_its_build_dir_is_removed(tmp_path, caplog):
    started = tmp_path / "started"
    never = str(tmp_path / "never")
    p, _ = start_job(tmp_path, "killed", started=str(started), hold=never)
    wait_for(started, p)  # it holds the locks and is filling its build dirs
    root = tmp_path / "cache"
    stale = sorted(root.glob(f"*{tc.BUILDING}.*"))
    assert len(stale) == 2 and all(f".{p.pid}." in s.name for s in stale)
    bank = tiny_bank()
    lock = FileLock(tc.lock_path(tc.cache_dir(root, bank, "a", tc.teacher_key(bank, "a", KEY))))
    with pytest.raises(Timeout):
        lock.acquire(timeout=0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    lock.acquire(timeout=5)  # the OS freed the dead holder's lock
    lock.release()
    with caplog.at_level(logging.INFO, logger="amalgam"):
        cache = tc.open_or_build(root, bank, KEY, IDS, Loader)
    assert "teacher cache: built a, b" in caplog.text
    assert all(f"removing {s}, left by a build that was killed" in caplog.text for s in stale)
    assert not any(s.exists() for s in stale) and not list(root.glob(f"*{tc.BUILDING}*"))
    assert_teacher_outputs(cache)


class OnRecord(logging.Handler):
    """Runs `action` when a log record says `text`."""

    def __init__(self, text: str, action) -> None:
        super().__init__()
        self.text, self.action = text, action

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.action()


@pytest.mark.long  # the two-job test covers reuse inside make test; this one the wait's log
def test_a_waiting_job_reuses_what_the_other_built(tmp_path, caplog, monkeypatch):
    started, hold = tmp_path / "started", tmp_path / "hold"
    p, spec = start_job(tmp_path, "builder", started=str(started), hold=str(hold))
    wait_for(started, p)  # the builder holds the locks until this job waits for them

    def no_build(*a, **k):
        raise AssertionError("the waiting job built the cache again")

    monkeypatch.setattr(tc, "fill", no_build)
    on_wait = OnRecord("waiting for", hold.touch)
    logging.getLogger("amalgam").addHandler(on_wait)
    try:
        with caplog.at_level(logging.INFO, logger="amalgam"):
            cache = tc.open_or_build(tmp_path / "cache", tiny_bank(), KEY, IDS, Loader)
    finally:
        logging.getLogger("amalgam").removeHandler(on_wait)
    assert "teacher cache: built a, b" in finish(p, spec)
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) == 1  # logged once, naming the holder
    assert "built by another job" in waits[0] and f"pid {p.pid}" in waits[0]
    assert "teacher cache: reused a, b" in caplog.text
    saved = np.load(spec["out"])
    for a, name in zip(arrays(cache), saved.files, strict=True):
        assert np.array_equal(a, saved[name])
    assert_teacher_outputs(cache)


class Ranks:
    """The ranks of one job as threads, with a Lightning strategy's barrier and broadcast."""

    def __init__(self, world: int) -> None:
        self.meet = threading.Barrier(world, timeout=60)
        self.slot = None

    def broadcast(self, rank: int):
        def send(obj):
            if rank == 0:
                self.slot = obj
            self.meet.wait()
            got = self.slot
            self.meet.wait()
            return got

        return send


def test_ranks_of_a_job_wait_for_the_lock_and_fill_one_build_dir(tmp_path, monkeypatch):
    root, bank = tmp_path / "cache", tiny_bank()
    first = tc.cache_dir(root, bank, "a", tc.teacher_key(bank, "a", KEY))
    root.mkdir()
    other_job = FileLock(tc.lock_path(first))
    other_job.acquire()
    monkeypatch.setattr(tc, "LOCK_POLL_S", 0.1)  # many rounds of waiting
    filled, fill = {}, tc.fill
    monkeypatch.setattr(tc, "fill", lambda *a, **k: filled.update({a[5]: a[3]}) or fill(*a, **k))
    ranks, caches = Ranks(2), {}

    def run(rank: int) -> None:
        send = ranks.broadcast(rank)
        kw = {"rank": rank, "world": 2, "barrier": ranks.meet.wait, "broadcast": send}
        caches[rank] = tc.open_or_build(root, bank, KEY, IDS, Loader, **kw)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert not filled and all(t.is_alive() for t in threads)  # both wait for the other job
    other_job.release()
    for t in threads:
        t.join(timeout=60)
    assert set(caches) == {0, 1}
    assert filled[0] == filled[1] and all(tc.BUILDING in p.name for p in filled[0].values())
    assert_teacher_outputs(caches[1])
    with pytest.raises(ValueError, match="give broadcast"):
        tc.open_or_build(root, bank, KEY, IDS, Loader, rank=1, world=2)


def test_a_cache_written_while_waiting_is_checked_fast_a_damaged_one_is_rebuilt(
    tmp_path, monkeypatch
):
    root, bank = tmp_path / "cache", tiny_bank()
    tc.open_or_build(root, bank, KEY, IDS, Loader)
    keys = {n: tc.teacher_key(bank, n, KEY) for n in bank.names}
    dirs = {n: tc.cache_dir(root, bank, n, k) for n, k in keys.items()}
    stamps = {n: tc.manifest_stamp(d) for n, d in dirs.items()}
    logits = dirs["a"] / "logits.npy"
    raw = bytearray(logits.read_bytes())
    raw[-3] ^= 0xFF  # same size and shape: only its checksum tells
    logits.write_bytes(bytes(raw))
    assert tc.failing(dirs, keys) == {"a": stamps["a"]}
    # its manifest is the one this job saw fail: checked in full again, so rebuilt
    tmp, locks = tc.lock_missing(dirs, keys, {"a": stamps["a"]}, 0, tc._same)
    assert list(tmp) == ["a"] and len(locks) == 1
    locks[0].release()

    def no_checksum(path):
        raise AssertionError("a cache that another job just wrote was read in full")

    monkeypatch.setattr(tc, "file_checksum", no_checksum)
    tmp, locks = tc.lock_missing(dirs, keys, {"b": None}, 0, tc._same)  # b appeared meanwhile
    assert tmp == {} and locks == []
