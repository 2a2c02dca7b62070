"""timm-mode preprocessing: evaluation equals timm's transform, training views are timm's
RandomResizedCrop + flip, a cached view is remade exactly, and teachers and student see one view."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import create_transform

from amalgam.data import AmalgamDataModule
from amalgam.data.datamodule import AllViews, ViewImages
from amalgam.data.sources import image_folder
from amalgam.data.transforms import Preprocess, rrc_box, view_seed
from amalgam.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour image with detail everywhere (so crops and flips show)."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + g.integers(-20, 20, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = 180 + 20 * i, 140 + 10 * i  # sizes differ, none square
                photo(w, h, hash((split, c, i)) % 1000).save(root / split / c / f"{i}.png")
    return root


def dm_of(folder: Path, **kw) -> AmalgamDataModule:
    source = image_folder(str(folder / "train"), str(folder / "test"))
    args = dict(image_size=64, batch_size=4, val_fraction=0.0, augment=True,
                preprocess={"mode": "timm"})  # fmt: skip
    return AmalgamDataModule(source, {"t": ["a", "b"]}, **(args | kw))


def test_evaluation_equals_timms_transform_once_normalised() -> None:
    img = photo(300, 200, 0)
    ours = Preprocess(mode="timm", interpolation="bicubic", crop_pct=0.95).eval_transform(160)
    timms = create_transform(160, interpolation="bicubic", crop_pct=0.95, mean=MEAN, std=STD)
    x = ours(img)
    assert x.shape == (3, 160, 160) and x.min() >= 0 and x.max() <= 1
    normalised = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(normalised, timms(img), atol=1e-5)
    # resize the shorter side to 160 / 0.95 = 168, then the centre 160 x 160
    manual = T.Compose([T.Resize(168, T.InterpolationMode.BICUBIC), T.CenterCrop(160)])(img)
    assert torch.allclose(x, T.functional.to_tensor(manual), atol=1e-6)


def test_the_crop_box_is_torchvisions_random_resized_crop() -> None:
    img = photo(300, 200, 1)
    for seed in range(200):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        got = rrc_box(200, 300, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert got == expected


def test_a_view_is_remade_exactly_from_its_seed_and_views_differ() -> None:
    img = photo(240, 180, 2)
    p = Preprocess(mode="timm")
    a, b = p.view(img, 64, 12345), p.view(img, 64, 12345)
    assert torch.equal(a, b)
    others = [p.view(img, 64, s) for s in range(40)]
    assert all(o.shape == (3, 64, 64) for o in others)
    assert len({o.sum().item() for o in others}) == 40  # 40 different crops
    # flips: about half (p = 0.5) of 400 seeds; crop areas within scale
    g = [torch.Generator().manual_seed(s) for s in range(400)]
    areas = [np.prod(rrc_box(180, 240, (0.08, 1.0), (3 / 4, 4 / 3), gi)[2:]) for gi in g]
    assert min(areas) >= 0.08 * 180 * 240 * 0.9 and max(areas) <= 180 * 240
    flips = [bool(torch.rand((), generator=gi) < 0.5) for gi in g]
    assert 150 < sum(flips) < 250


def test_the_timm_training_transform_is_random_resized_crop_and_flip(folder: Path) -> None:
    dm = dm_of(folder)
    tf = dm._format(True)._transforms[1]
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert "ColorJitter" not in names  # timm's default 0.4 is off unless asked for
    jitter = dm_of(folder, preprocess={"mode": "timm", "color_jitter": 0.4})
    assert "ColorJitter" in [
        type(t).__name__ for t in jitter._format(True)._transforms[1].transforms
    ]
    batch = next(iter(dm.train_dataloader()))
    x = batch["image"]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and set(batch) == {"image", "index"}


def test_evaluation_loaders_centre_crop_every_file(folder: Path) -> None:
    dm = dm_of(folder)
    x, y = next(iter(dm.test_dataloader()))
    src = dm.source.test
    first = dm.indices("test")[0].item()
    expected = Preprocess(mode="timm").eval_transform(64)(Image.open(src.paths[first]))
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert y.tolist() == sorted(y.tolist())  # fixed order, labels with the images


def test_the_cache_fill_makes_the_views_the_student_replays(folder: Path) -> None:
    dm = dm_of(folder)
    dm.use_cached_views(3)
    table = dm.view_table()
    n = len(dm.indices("train"))
    assert table.shape == (3, n, 3) and table.dtype == torch.int16
    filled = next(iter(dm.cache_dataloader()))
    assert filled["image"].shape[1:] == (3, 3, 64, 64)
    replay = dm.train_dataloader().dataset
    assert isinstance(replay, ViewImages)
    for pos in range(len(filled["index"])):
        for k in range(3):
            sample = replay[(pos, k)]
            assert sample["index"] == filled["index"][pos]
            assert torch.equal(sample["image"], filled["image"][pos, k])
            rows = torch.tensor([pos])
            assert torch.equal(dm.apply_view(filled["image"], rows, k)[pos], sample["image"])
    assert not torch.equal(filled["image"][0, 0], filled["image"][0, 1])
    assert isinstance(dm.cache_dataloader().dataset, AllViews)
    # the cache key names the preprocessing, so a change rebuilds the cache
    other = dm_of(folder, preprocess={"mode": "timm", "scale": [0.5, 1.0]})
    other.use_cached_views(3)
    assert dm.cache_key() != other.cache_key()
    assert view_seed(table[0, 0].tolist()) != view_seed(table[1, 0].tolist())


def test_views_that_cannot_be_replayed_are_refused_with_a_cache(folder: Path) -> None:
    dm = dm_of(folder, preprocess={"mode": "timm", "auto_augment": "rand-m9-mstd0.5"})
    with pytest.raises(ConfigError, match="teacher_cache replays RandomResizedCrop"):
        dm.use_cached_views(2)


def test_the_students_timm_data_config_fills_what_the_config_leaves_open(folder: Path) -> None:
    dm = dm_of(folder, image_size=None)
    dm.use_data_config({"input_size": (3, 96, 96), "interpolation": "bicubic", "crop_pct": 0.9})
    assert dm.image_size == 96
    assert (dm.preprocess.interpolation, dm.preprocess.crop_pct) == ("bicubic", 0.9)
    fixed = dm_of(folder, preprocess={"mode": "timm", "crop_pct": 1.0})
    fixed.use_data_config({"input_size": (3, 96, 96), "interpolation": "bicubic", "crop_pct": 0.9})
    assert fixed.image_size == 64 and fixed.preprocess.crop_pct == 1.0  # the config wins


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"mode": "crop"}, "mode must be one of"),
        ({"mode": "timm", "crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"mode": "timm", "scale": [0.5, 0.2]}, "scale must be"),
        ({"mode": "timm", "interpolation": "cubic"}, "interpolation must be one of"),
        ({"mode": "timm", "crop": 1}, "unknown keys"),
    ],
)
def test_bad_preprocessing_is_refused_naming_the_key(folder: Path, bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        dm_of(folder, preprocess=bad)


def test_square_mode_is_unchanged_by_default(folder: Path) -> None:
    source = image_folder(str(folder / "train"), str(folder / "test"))
    dm = AmalgamDataModule(source, {"t": ["a", "b"]}, image_size=32, val_fraction=0.0)
    x, _ = next(iter(dm.test_dataloader()))
    from amalgam.data import to_model_input
    from amalgam.data.sources import load_image

    first = dm.indices("test")[0].item()
    assert torch.equal(x[0], to_model_input(load_image(source.test.paths[first])[None], 3, 32)[0])
