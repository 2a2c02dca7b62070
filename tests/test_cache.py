"""Teacher-output cache: exact content, invalidation, corruption detection, cached training."""

import json

import numpy as np
import pytest
import torch

from amalgam.amalgamate import amalgamate
from amalgam.build import build_amalgamation
from amalgam.teachers import cache as tc
from conftest import make_cfg

QUIET = ["~callbacks.progress", "+trainer.enable_progress_bar=false"]


@pytest.fixture()
def setup(tiny_teachers, tmp_path):
    cfg = make_cfg("amalgamate", ["experiment=tiny"], tiny_teachers, tmp_path / "run")
    dm, module = build_amalgamation(cfg)
    return dm, module, tmp_path / "cache"


def open_cache(dm, module, root, **kw):
    return tc.open_or_build(
        root, module.teachers, dm.cache_key(), dm.cache_ids(), dm.cache_dataloader, **kw
    )


def test_cached_outputs_equal_teacher_outputs(setup):
    dm, module, root = setup
    cache = open_cache(dm, module, root)
    batch = next(iter(dm.train_dataloader()))
    got = cache.lookup(batch["index"], "cpu")
    want = module.teachers(batch["image"])
    for g, w in zip(got.logits, want.logits, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-3)  # fp16 storage
    for gs, ws in zip(got.features, want.features, strict=True):
        for g, w in zip(gs, ws, strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-3)
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2  # one directory per teacher
    cache.lookup(dm.indices("val")[:1], "cpu")  # held-out images too: any seed's pool is in
    outside = torch.tensor([len(dm.source.train)])
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup(outside, "cpu")


def test_one_cache_serves_every_seed_of_a_sweep(tiny_teachers, tmp_path, monkeypatch):
    def dm_module(seed, *extra):
        over = ["experiment=tiny", f"seed={seed}", *extra]
        return build_amalgamation(make_cfg("amalgamate", over, tiny_teachers, tmp_path / "run"))

    (dm0, m0), (dm1, m1) = dm_module(0), dm_module(1)
    assert not torch.equal(dm0.indices("train"), dm1.indices("train"))  # the val split moves
    assert dm0.cache_key() == dm1.cache_key()
    union = torch.cat([dm0.indices("train"), dm0.indices("val")]).sort().values
    assert torch.equal(dm0.cache_ids(), union)  # synthetic: every class is in a task
    root = tmp_path / "cache"
    c0 = open_cache(dm0, m0, root)

    def no_build(*a, **k):
        raise AssertionError("seed 1 rebuilt the cache of seed 0")

    monkeypatch.setattr(tc, "fill", no_build)
    c1 = open_cache(dm1, m1, root)
    ids = dm1.indices("train")[:16]
    for a, b in zip(c0.lookup(ids, "cpu").logits, c1.lookup(ids, "cpu").logits, strict=True):
        assert torch.equal(a, b)
    # train_limit draws the pool from the seed: the cache is that pool's own
    (dl0, _), (dl1, _) = dm_module(0, "data.train_limit=100"), dm_module(1, "data.train_limit=100")
    assert torch.equal(dl0.cache_ids(), dl0.indices("train")) and len(dl0.cache_ids()) == 100
    assert dl0.cache_key() != dl1.cache_key()


def test_sharded_build_equals_single_build(setup, tmp_path):
    dm, module, root = setup
    one = open_cache(dm, module, root)
    ids = dm.cache_ids()
    keys = {n: tc.teacher_key(module.teachers, n, dm.cache_key()) for n in module.teachers.names}
    dirs = {n: tmp_path / f"shard-{n}" for n in module.teachers.names}
    for d in dirs.values():
        d.mkdir()
    tc.allocate(module.teachers, next(iter(dm.cache_dataloader()))["image"][:2], len(ids), dirs)
    for rank in (1, 0):  # two "ranks" fill disjoint batches of the same arrays
        tc.fill(module.teachers, dm.cache_dataloader(), ids, dirs, "cpu", rank=rank, world=2)
    for n in module.teachers.names:
        tc.write_manifest(dirs[n], keys[n])
    two = tc.TeacherCache(dirs, ids)

    def arrays(c):
        return c.logits + [f for fs in c.features for f in fs]

    for a, b in zip(arrays(one), arrays(two), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_any_change_of_teacher_data_or_view_changes_the_key(setup):
    dm, module, _ = setup
    base = tc.teacher_key(module.teachers, "tiny_a", dm.cache_key())
    key = dm.cache_key()
    for change in (
        {"image_size": 17},
        {"ids_sha256": "0"},
        {"view": {"kind": "random_augment"}},
        {"source": "other"},
    ):
        assert tc.teacher_key(module.teachers, "tiny_a", {**key, **change}) != base
    meta = module.teachers.metas["tiny_a"]
    old = meta.sha256
    meta.sha256 = "f" * 64
    try:
        assert tc.teacher_key(module.teachers, "tiny_a", key) != base
    finally:
        meta.sha256 = old


@pytest.fixture()
def views_setup(tiny_teachers, tmp_path):
    over = ["experiment=tiny", "data.augment=true"]
    cfg = make_cfg("amalgamate", over, tiny_teachers, tmp_path / "run")
    dm, module = build_amalgamation(cfg)
    dm.use_cached_views(3)
    return dm, module, tmp_path / "cache"


def open_views(dm, module, root):
    return open_cache(dm, module, root, view_table=dm.view_table(), view_fn=dm.apply_view)


def test_cached_views_replay_exactly_what_the_teachers_saw(views_setup):
    dm, module, root = views_setup
    cache = open_views(dm, module, root)
    n = len(dm.indices("train"))
    assert cache.views == 3 and np.asarray(cache.logits[0]).shape[0] == 3 * n
    d = next(p for p in root.iterdir() if p.name.startswith("tiny_a"))
    assert np.array_equal(np.load(d / "views.npy"), dm.view_table().numpy())
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "index", "view"} and batch["view"].max() < 3
    # the student's images are augmented views, not the plain pool images
    plain = torch.cat([b["image"] for b in dm.pool_dataloader()])
    rows = tc.row_index(dm.indices("train"))[batch["index"]]
    assert not torch.allclose(batch["image"], plain[rows])
    got = cache.lookup(batch["index"], "cpu", view=batch["view"])
    want = module.teachers(batch["image"])
    for g, w in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-3)
    for gs, ws in zip(got.features, want.features, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-3)
    # another view of the same images has other teacher outputs
    other = cache.lookup(batch["index"], "cpu", view=(batch["view"] + 1) % 3)
    assert not torch.allclose(other.logits[0], got.logits[0], atol=1e-2)
    with pytest.raises(KeyError, match="views per image"):
        cache.lookup(batch["index"], "cpu")


def test_view_choice_is_per_epoch_and_reproducible(views_setup):
    from amalgam.data.datamodule import ViewShuffle

    s = ViewShuffle(500, seed=3, views=4)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and e0 != e1
    assert sorted(p for p, _ in e1) == list(range(500))
    counts = np.bincount([v for _, v in e0], minlength=4)
    assert counts.min() > 80  # every view is used


def test_view_table_change_invalidates_the_cache(views_setup, tmp_path):
    dm, module, root = views_setup
    key3 = tc.teacher_key(module.teachers, "tiny_a", dm.cache_key())
    dm.use_cached_views(2)
    assert tc.teacher_key(module.teachers, "tiny_a", dm.cache_key()) != key3
    dm.use_cached_views(3)
    assert tc.teacher_key(module.teachers, "tiny_a", dm.cache_key()) == key3
    open_views(dm, module, root)
    d = next(p for p in root.iterdir() if p.name.startswith("tiny_a"))
    assert tc.verify(d, key3)
    table = np.load(d / "views.npy")
    table[0, 0, 0] = (table[0, 0, 0] + 1) % 9  # views.npy no longer made these outputs
    np.save(d / "views.npy", table)
    assert not tc.verify(d, key3)


@pytest.mark.parametrize("damage", ["no_manifest", "truncate", "flip_byte", "wrong_key"])
def test_partial_or_corrupt_cache_is_rebuilt(setup, damage):
    dm, module, root = setup
    open_cache(dm, module, root)
    d = next(p for p in root.iterdir() if p.name.startswith("tiny_a"))
    key = tc.teacher_key(module.teachers, "tiny_a", dm.cache_key())
    assert tc.verify(d, key)
    logits = d / "logits.npy"
    good = np.load(logits).copy()
    if damage == "no_manifest":
        (d / "manifest.json").unlink()
    elif damage == "truncate":
        logits.write_bytes(logits.read_bytes()[:-10])
    elif damage == "flip_byte":
        raw = bytearray(logits.read_bytes())
        raw[-3] ^= 0xFF
        logits.write_bytes(bytes(raw))
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["key"]["data"]["n"] += 1
        (d / "manifest.json").write_text(json.dumps(m))
    assert not tc.verify(d, key)
    cache = open_cache(dm, module, root)
    assert tc.verify(d, key)
    assert np.array_equal(np.asarray(cache.logits[0]), good)


@pytest.mark.slow
def test_cached_training_runs_without_teacher_forward_in_steps(
    tiny_teachers, tmp_path, monkeypatch
):
    from amalgam.teachers.bank import TeacherBank

    calls = {"n": 0}
    original = TeacherBank.forward

    def counting(self, x, features=True):
        calls["n"] += 1
        return original(self, x, features)

    monkeypatch.setattr(TeacherBank, "forward", counting)
    over = [
        "experiment=tiny",
        "debug=quick",
        "teacher_cache.enabled=true",
        f"teacher_cache.dir={tmp_path / 'cache'}",
        "trainer.limit_val_batches=0",
        *QUIET,
    ]
    cfg = make_cfg("amalgamate", over, tiny_teachers, tmp_path / "run")
    res = amalgamate(cfg)
    pool_batches = -(-len(build_amalgamation(cfg)[0].indices("train")) // 256)
    test_batches = -(-res["joint"]["n_test"] // 256)
    assert res["global_step"] == 8
    # first run: teachers ran over the pool (cache build) and the test set only, never per step
    assert calls["n"] == pool_batches + 1 + test_batches
    # second run: cache reused, so teachers run only for the final evaluation
    calls["n"] = 0
    cfg2 = make_cfg("amalgamate", over, tiny_teachers, tmp_path / "run2")
    res2 = amalgamate(cfg2)
    assert calls["n"] == test_batches
    assert res2["tasks"] == res["tasks"]
    # augmented training: K = 2 cached views, built once, replayed with their view ids
    calls["n"] = 0
    aug = [*over, "data.augment=true", "teacher_cache.views=2"]
    res3 = amalgamate(make_cfg("amalgamate", aug, tiny_teachers, tmp_path / "run3"))
    assert res3["global_step"] == 8
    assert calls["n"] == 2 * pool_batches + 1 + test_batches


def test_bench_precision_is_the_trainers():
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

    from amalgam.bench import precision_plugin

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    cpu = torch.device("cpu")
    bf16 = precision_plugin("bf16-mixed", cpu)
    assert isinstance(bf16, MixedPrecision) and bf16.device == "cpu"
    with bf16.forward_context():
        assert (a @ b).dtype == torch.bfloat16
        # the float64 Gram matrix of the MMD is not cast
        assert (a.double() @ b.double()).dtype == torch.float64
        # Lightning's region: autocast without its weight-cast cache
        assert not torch.is_autocast_cache_enabled()
    # fp16 AMP is not supported on a CPU: Lightning (and so the bench) runs bf16 instead
    assert precision_plugin("16-mixed", cpu).precision == "bf16-mixed"
    for p in ("32-true", 32):
        plugin = precision_plugin(p, cpu)
        assert plugin.precision == "32-true"
        with plugin.forward_context():
            assert (a @ b).dtype == torch.float32
    # *-true half precision: the module's weights and the inputs are converted, as in training
    half = precision_plugin("bf16-true", cpu)
    assert isinstance(half, HalfPrecision)
    net = half.convert_module(torch.nn.Linear(8, 3))
    assert net.weight.dtype == torch.bfloat16
    assert half.convert_input(a).dtype == torch.bfloat16


@pytest.mark.slow
def test_bench_prints_and_writes_all_figures(tiny_teachers, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "PERF.md"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "amalgam.bench",
            "experiment=tiny",
            "bench.steps=2",
            "bench.rounds=2",
            "trainer.precision=bf16-mixed",
            "student.channels_last=true",
            "teacher_channels_last=true",
            f"bench.write={out}",
            f"paths.root_dir={tiny_teachers}",
            f"teacher_cache.dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "full / bound =" in p.stdout and "cached / full =" in p.stdout
    md = out.read_text()
    for row in (
        "(a) teachers' forward",
        "(b) student train step alone",
        "(c) full",
        "(d) full",
        "c / bound",
        "peak memory",
        "precision bf16-mixed; student channels_last True; teachers in float32, channels_last;",
    ):
        assert row in md
    # each timed phase: its median round lies inside the slowest-fastest range of its rounds
    phases = [ln for ln in md.splitlines() if ln.startswith("| (")]
    assert len(phases) == 4
    for ln in phases:
        median, spread = [c.strip() for c in ln.strip("|").split("|")][1:3]
        lo, hi = (float(v) for v in spread.split("-"))
        assert 0 < lo <= float(median) <= hi
