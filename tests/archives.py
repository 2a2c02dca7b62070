"""Miniature copies of the four fine-grained benchmarks, in their official on-disk layouts.

Each `write_*` puts what unpacking the official archive(s) into `root` gives (the same file
names, list formats and .mat structures, fewer and smaller images) and returns the class names
it wrote, in the data set's class order. Images are JPEGs of varying, non-square sizes
(`size` to `size * 1.35` on each side) whose colour and stripe pattern depend on the class
(and on the data set, so that combined sets stay separable): a tiny model can learn them.
Everything is deterministic; the defaults take a few tens of milliseconds per set.
"""

from __future__ import annotations

import colorsys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CUB_NAMES = [
    "Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani",
    "Crested_Auklet", "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet",
]  # fmt: skip
DOG_NAMES = [
    "n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog",
    "n02086079-Pekinese", "n02086240-Shih-Tzu", "n02086646-Blenheim_spaniel",
]  # fmt: skip
CAR_NAMES = [
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012",
    "Audi TTS Coupe 2012", "BMW M3 Coupe 2012", "Volvo XC90 SUV 2007",
]  # fmt: skip
# in variants.txt order is not alphabetical here on purpose; one name with a space, one with
# a slash, as in the real list
AIRCRAFT_NAMES = [
    "707-320", "Cessna 172", "F/A-18", "A300B4", "737-700", "DHC-8-300", "Falcon 2000", "MD-11",
]  # fmt: skip

# per data set: hue offset and stripe direction of its images
_STYLE = {"cub": (0.0, 0), "dogs": (0.125, 1), "cars": (0.25, 2), "aircraft": (0.375, 3)}


def _names(base: list[str], n: int, fmt: str) -> list[str]:
    return [base[i] if i < len(base) else fmt.format(i=i) for i in range(n)]


def _write_jpeg(path: Path, kind: str, label: int, index: int, size: int) -> None:
    """A JPEG of class `label`: class colour plus class stripes, a little per-image noise."""
    seed = zlib.crc32(f"{kind}/{label}/{index}".encode())
    rng = np.random.default_rng(seed)
    w, h = (int(size + rng.integers(0, max(1, size * 35 // 100) + 1)) for _ in range(2))
    if w == h:
        w += 1
    offset, direction = _STYLE[kind]
    hue = (offset + label * 0.618034) % 1.0
    color = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    yy, xx = np.mgrid[0:h, 0:w]
    coord = [xx, yy, xx + yy, xx - yy][direction]
    period = 8 + 4 * (label % 5)
    stripes = ((coord + rng.integers(0, period)) // (period // 2)) % 2
    img = color[None, None] * (0.6 + 0.4 * stripes[..., None])
    img = img + rng.normal(0, 6, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _lines(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows))


def _order(classes: int, per_class: int) -> list[tuple[int, int]]:
    """(class, index) pairs interleaved across classes, as the real lists mix them."""
    return [(c, i) for i in range(per_class) for c in range(classes)]


# ---------------------------------------------------------------- CUB-200-2011


def write_cub(
    root: str | Path,
    classes: int = 3,
    train_per_class: int = 2,
    test_per_class: int = 1,
    size: int = 224,
) -> list[str]:
    """`<root>/CUB_200_2011/` as CUB_200_2011.tgz unpacks: lists, classes.txt and images/.

    Image ids run class by class (as in the real images.txt); within a class the train and
    test images alternate in train_test_split.txt (the first image of each class is train).
    """
    base = Path(root) / "CUB_200_2011"
    names = [f"{c + 1:03d}.{n}" for c, n in enumerate(_names(CUB_NAMES, classes, "Bird_{i}"))]
    images, labels, split = [], [], []
    image_id = 0
    per_class = train_per_class + test_per_class
    for c, cls in enumerate(names):
        flags = [1] * train_per_class + [0] * test_per_class
        flags = [flags[k] for k in _alternate(train_per_class, test_per_class)]
        for i in range(per_class):
            image_id += 1
            bird = cls.split(".", 1)[1]
            rel = f"{cls}/{bird}_{i + 1:04d}_{100000 + image_id}.jpg"
            _write_jpeg(base / "images" / rel, "cub", c, i, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {flags[i]}")
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", labels)
    _lines(base / "train_test_split.txt", split)
    _lines(base / "classes.txt", [f"{c + 1} {n}" for c, n in enumerate(names)])
    _lines(base / "bounding_boxes.txt", [f"{i + 1} 0.0 0.0 10.0 10.0" for i in range(image_id)])
    (base / "README").write_text("CUB-200-2011 miniature written by tests/archives.py\n")
    return names


def _alternate(n_train: int, n_test: int) -> list[int]:
    """Indices into [train..., test...] that interleave them: t, s, t, s, ..., then the rest."""
    train, test = list(range(n_train)), list(range(n_train, n_train + n_test))
    out = []
    while train or test:
        if train:
            out.append(train.pop(0))
        if test:
            out.append(test.pop(0))
    return out


# ---------------------------------------------------------------- Stanford Dogs


def _cell(strings: list[str]) -> np.ndarray:
    """A MATLAB N x 1 cell array of strings, as in the real lists."""
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = np.array([s])
    return out


def write_dogs(
    root: str | Path,
    classes: int = 3,
    train_per_class: int = 2,
    test_per_class: int = 1,
    size: int = 224,
) -> list[str]:
    """`<root>/stanford_dogs/` holding images.tar's Images/ and lists.tar's .mat lists."""
    import scipy.io

    base = Path(root) / "stanford_dogs"
    names = _names(DOG_NAMES, classes, "n0{i:07d}-Dog_{i}")
    assert names == sorted(names)
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c, i in _order(classes, train_per_class + test_per_class):
        wnid = names[c].split("-", 1)[0]
        rel = f"{names[c]}/{wnid}_{1000 + i}.jpg"
        _write_jpeg(base / "Images" / rel, "dogs", c, i, size)
        lists["train" if i < train_per_class else "test"].append((rel, c + 1))
    everything = lists["train"] + lists["test"]
    for which, rows in (("train", lists["train"]), ("test", lists["test"]), ("file", everything)):
        files = [r for r, _ in rows]
        scipy.io.savemat(
            base / f"{which}_list.mat",
            {
                "file_list": _cell(files),
                "annotation_list": _cell([f.removesuffix(".jpg") for f in files]),
                "labels": np.array([[float(lab)] for _, lab in rows]),
            },
        )
    return names


# ---------------------------------------------------------------- Stanford Cars


def _annotations(rows: list[tuple[str, int]], with_class: bool = True) -> np.ndarray:
    """The `annotations` 1 x N struct array of the devkit's .mat files."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else [])
    dtype = [(f, object) for f in [*fields, "fname"]]
    out = np.empty((1, len(rows)), dtype=dtype)
    for k, (fname, label) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in (5, 6, 200, 150)]
        if with_class:
            values.append(np.array([[label]], dtype=np.uint8))
        out[0, k] = (*values, np.array([fname]))
    return out


def write_cars(
    root: str | Path,
    classes: int = 3,
    train_per_class: int = 2,
    test_per_class: int = 1,
    size: int = 224,
) -> list[str]:
    """`<root>/stanford_cars/` in torchvision's StanfordCars layout.

    devkit/ (car_devkit.tgz: cars_meta.mat, cars_train_annos.mat, cars_test_annos.mat without
    labels), cars_train/ and cars_test/ (numbered JPEGs, each numbered from 00001, so the two
    directories share file names) and cars_test_annos_withlabels.mat.
    """
    import scipy.io

    base = Path(root) / "stanford_cars"
    names = _names(CAR_NAMES, classes, "Make Model {i} Sedan 2012")
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c, i in _order(classes, train_per_class + test_per_class):
        which = "train" if i < train_per_class else "test"
        fname = f"{len(rows[which]) + 1:05d}.jpg"
        _write_jpeg(base / f"cars_{which}" / fname, "cars", c, i, size)
        rows[which].append((fname, c + 1))
    devkit = base / "devkit"
    devkit.mkdir(parents=True, exist_ok=True)
    meta = np.empty((1, len(names)), dtype=object)
    for k, n in enumerate(names):
        meta[0, k] = np.array([n])
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": meta})
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": _annotations(rows["train"])})
    scipy.io.savemat(
        devkit / "cars_test_annos.mat", {"annotations": _annotations(rows["test"], False)}
    )
    scipy.io.savemat(
        base / "cars_test_annos_withlabels.mat", {"annotations": _annotations(rows["test"])}
    )
    (devkit / "README.txt").write_text("Stanford Cars devkit miniature (tests/archives.py)\n")
    return names


# ---------------------------------------------------------------- FGVC-Aircraft


def write_aircraft(
    root: str | Path,
    classes: int = 3,
    train_per_class: int = 2,
    test_per_class: int = 1,
    size: int = 224,
) -> list[str]:
    """`<root>/fgvc-aircraft-2013b/data/` as fgvc-aircraft-2013b.tar.gz unpacks.

    variants.txt, images/<7-digit id>.jpg and the variant lists of the splits: trainval
    (= train + val, halves of `train_per_class` rounded), test; also the family and
    manufacturer files' names the real archive has (contents: one family/manufacturer per class).
    """
    base = Path(root) / "fgvc-aircraft-2013b" / "data"
    names = _names(AIRCRAFT_NAMES, classes, "Variant {i}")
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    image_id = 1025794
    for c, i in _order(classes, train_per_class + test_per_class):
        image_id += 7
        _write_jpeg(base / "images" / f"{image_id:07d}.jpg", "aircraft", c, i, size)
        which = "test" if i >= train_per_class else ("train" if i % 2 == 0 else "val")
        rows[which].append(f"{image_id:07d} {names[c]}")
    _lines(base / "variants.txt", names)
    _lines(base / "families.txt", [f"Family {c}" for c in range(classes)])
    _lines(base / "manufacturers.txt", [f"Maker {c}" for c in range(classes)])
    for which in ("train", "val", "test"):
        _lines(base / f"images_variant_{which}.txt", rows[which])
    # the archive's trainval list is train then val
    _lines(base / "images_variant_trainval.txt", rows["train"] + rows["val"])
    _lines(base / "images_box.txt", [])
    return names
