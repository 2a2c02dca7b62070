"""The four fine-grained benchmarks, read lazily from their official archives, official splits.

| function        | directory under `root` | classes | train  | test  | archive                    |
|-----------------|------------------------|---------|--------|-------|----------------------------|
| `cub200`        | CUB_200_2011/          | 200     | 5,994  | 5,794 | CUB_200_2011.tgz           |
| `stanford_dogs` | stanford_dogs/         | 120     | 12,000 | 8,580 | images.tar + lists.tar     |
| `stanford_cars` | stanford_cars/         | 196     | 8,144  | 8,041 | torchvision's layout       |
| `fgvc_aircraft` | fgvc-aircraft-2013b/   | 100     | 6,667  | 3,333 | fgvc-aircraft-2013b.tar.gz |

Each returns a lazy `Source` (file paths and int64 labels, no pixels in memory) with the
official class names, which do not clash across the four sets: combine them with
`amalgam.data.sources.concat(..., prefix=False)` so a teacher trained on one set alone names
its classes exactly as the combined set does.

Every file the lists name must exist (else one `ConfigError` naming the missing file, the
directory searched, the archive and the command that unpacks it), and every image is decoded
once (`amalgam.data.verify.find_bad_images`: parallel, remembered by size and mtime), so a
half-unpacked archive or a corrupt JPEG stops the build, not an epoch; `check_images=False`
skips the decoding. A parsed source is kept per (data set, directory, list files' size and
mtime) for the life of the process, and the decode check of a second build only stats the
files (changed ones are decoded again), so building twice is cheap.

`root` may also be the data set's own directory (e.g. `<data_dir>/CUB_200_2011` itself).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amalgam.data.sources import Source, Split, class_dirs, list_bad_files
from amalgam.data.verify import find_bad_images
from amalgam.errors import ConfigError


@dataclass(frozen=True)
class Archive:
    """Where a benchmark lives under the data dir and how a user gets it there."""

    name: str  # the Source name
    subdir: str  # its directory under root
    marker: str  # a file that marks `root` itself as that directory
    required: tuple[str, ...]  # files and directories (trailing '/') the parser reads
    image_dir: str  # the directory holding every image ('' = the data set's directory)
    files: str  # the official archive names
    origin: str  # where they come from
    unpack: str  # the shell command, with {root} and {base}

    def how_to_get(self, root: Path) -> str:
        cmd = self.unpack.format(root=root, base=root / self.subdir)
        return f"Get {self.files} from {self.origin} and unpack into {root}: `{cmd}`"


ARCHIVES: dict[str, Archive] = {
    "cub200": Archive(
        "cub200",
        "CUB_200_2011",
        "images.txt",
        ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images/"),
        "images",
        "CUB_200_2011.tgz",
        "https://data.caltech.edu/records/65de6-vzs52",
        "tar -xzf CUB_200_2011.tgz -C {root}",
    ),
    "stanford_dogs": Archive(
        "stanford_dogs",
        "stanford_dogs",
        "train_list.mat",
        ("Images/", "train_list.mat", "test_list.mat"),
        "Images",
        "images.tar and lists.tar",
        "http://vision.stanford.edu/aditya86/ImageNetDogs/",
        "mkdir -p {base} && tar -xf images.tar -C {base} && tar -xf lists.tar -C {base}",
    ),
    "stanford_cars": Archive(
        "stanford_cars",
        "stanford_cars",
        "devkit/cars_meta.mat",
        (
            "devkit/cars_meta.mat",
            "devkit/cars_train_annos.mat",
            "cars_test_annos_withlabels.mat",
            "cars_train/",
            "cars_test/",
        ),
        "",
        "car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat "
        "(torchvision's StanfordCars layout)",
        "a Kaggle mirror, since the Stanford URL is gone "
        "(https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset; the devkit is also "
        "at https://github.com/pytorch/vision/files/11644847/car_devkit.tgz; see "
        "https://github.com/pytorch/vision/issues/7545)",
        "mkdir -p {base} && tar -xzf car_devkit.tgz -C {base} && tar -xzf cars_train.tgz -C "
        "{base} && tar -xzf cars_test.tgz -C {base} && cp cars_test_annos_withlabels.mat {base}/",
    ),
    "fgvc_aircraft": Archive(
        "fgvc_aircraft",
        "fgvc-aircraft-2013b",
        "data/variants.txt",
        (
            "data/variants.txt",
            "data/images_variant_trainval.txt",
            "data/images_variant_test.txt",
            "data/images/",
        ),
        "data/images",
        "fgvc-aircraft-2013b.tar.gz",
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        "tar -xzf fgvc-aircraft-2013b.tar.gz -C {root}",
    ),
}


# ---------------------------------------------------------------- the public sources


def cub200(root: str | None = None, check_images: bool = True) -> Source:
    """Caltech-UCSD Birds-200-2011 from `<root>/CUB_200_2011/` (CUB_200_2011.tgz unpacked).

    Reads images.txt (`<id> <path under images/>`), image_class_labels.txt (`<id> <class>`,
    1-based), train_test_split.txt (`<id> <1 = train, 0 = test>`) and classes.txt
    (`<class> <name>`); class names as in classes.txt (`001.Black_footed_Albatross`, ...).
    Official split: 5,994 train and 5,794 test images of 200 classes.
    """
    return _load("cub200", root, check_images)


def stanford_dogs(root: str | None = None, check_images: bool = True) -> Source:
    """Stanford Dogs from `<root>/stanford_dogs/` (images.tar and lists.tar unpacked there).

    The lists' train_list.mat / test_list.mat give `file_list` (paths under Images/) and
    1-based `labels`; class names are the sorted Images/ sub-directories (`n02085620-Chihuahua`,
    ...), and each file's label must be its directory's position (+1). Official split: 12,000
    train (100 per class) and 8,580 test images of 120 classes.
    """
    return _load("stanford_dogs", root, check_images)


def stanford_cars(root: str | None = None, check_images: bool = True) -> Source:
    """Stanford Cars from `<root>/stanford_cars/` in torchvision's `StanfordCars` layout.

    devkit/cars_meta.mat (`class_names`), devkit/cars_train_annos.mat with cars_train/, and
    cars_test_annos_withlabels.mat with cars_test/ (the `annotations` structs' `fname` and
    1-based `class`; read as torchvision reads them). Class names as in cars_meta
    (`AM General Hummer SUV 2000`, ...). Official split: 8,144 train and 8,041 test images of
    196 classes.
    """
    return _load("stanford_cars", root, check_images)


def fgvc_aircraft(root: str | None = None, check_images: bool = True) -> Source:
    """FGVC-Aircraft 2013b, variant level, from `<root>/fgvc-aircraft-2013b/data/`.

    Class names are the lines of variants.txt in its order (`707-320`, ..., `F/A-18`, ...:
    names hold spaces and slashes); train = images_variant_trainval.txt (6,667 images), test =
    images_variant_test.txt (3,333), 100 variants, as torchvision's
    `FGVCAircraft(split="trainval"/"test", annotation_level="variant")` reads them.

    The images keep the 20-pixel copyright banner at their bottom edge, as is standard practice
    (torchvision, KamalEngine); crop it in your own preprocessing if you want it gone.
    """
    return _load("fgvc_aircraft", root, check_images)


def clear_cache() -> None:
    """Forget the sources parsed in this process (to see images deleted since, unchecked)."""
    _parsed.cache_clear()


# ---------------------------------------------------------------- locating and caching


def _root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ConfigError(
            f"{name}: set data.source.root to the data directory (by default ${{paths.data_dir}})"
        )
    return Path(root).expanduser().resolve()


def _locate(a: Archive, root: Path) -> Path:
    """`<root>/<subdir>`, or `root` itself when it is the data set's directory; checked."""
    base = root / a.subdir
    if not base.is_dir() and (root / a.marker).exists():
        base = root
    if not base.is_dir():
        raise ConfigError(
            f"{a.name}: directory {base} not found (searched {base} and {root}). "
            f"{a.how_to_get(root)}"
        )
    for rel in a.required:
        p = base / rel
        if not (p.is_dir() if rel.endswith("/") else p.is_file()):
            kind = "directory" if rel.endswith("/") else "file"
            raise ConfigError(
                f"{a.name}: {kind} {p} is missing (searched {base}); the archive is missing or "
                f"half unpacked. {a.how_to_get(root)}"
            )
    return base


def _stamp(base: Path, rels: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of the files and directories that the parser reads."""
    out = []
    for rel in rels:
        st = (base / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load(name: str, root: str | os.PathLike | None, check_images: bool) -> Source:
    a = ARCHIVES[name]
    r = _root(name, root)
    base = _locate(a, r)
    stamp = _stamp(base, a.required)
    source = _parsed(name, str(r), str(base), stamp)
    if check_images:
        _decoded(name, str(r), str(base), stamp)
    return source


@functools.lru_cache(maxsize=32)
def _parsed(name: str, root: str, base: str, stamp: tuple) -> Source:
    ctx = _Context(ARCHIVES[name], Path(root), Path(base))
    train, test = _PARSERS[name](ctx)  # each checks that the files its lists name exist
    return Source(name, train, test)


def _decoded(name: str, root: str, base: str, stamp: tuple) -> None:
    """Decode every image not found good before (remembered on disk by path, size and mtime, so
    a second build only stats the files); raise one error naming the bad ones."""
    a = ARCHIVES[name]
    source = _parsed(name, root, base, stamp)
    paths = (source.train.paths or []) + (source.test.paths or [])
    directory = Path(base) / a.image_dir if a.image_dir else Path(base)
    # one call per directory: the on-disk cache of a directory holds the files of its last call
    bad = find_bad_images(directory, paths, f"checking {name} images")
    if bad:
        raise ConfigError(
            f"{name}: {len(bad)} of {len(paths)} image files cannot be decoded: "
            f"{list_bad_files(bad)}. "
            f"Replace them from a fresh copy of {a.files} ({a.origin}), or unpack it again "
            f"into {root}"
        )


@dataclass
class _Context:
    """What a parser needs to read its lists and to word its errors."""

    archive: Archive
    root: Path
    base: Path

    def fail(self, what: str, fix: str = "") -> ConfigError:
        fix = (
            fix
            or f"The archive looks damaged or half unpacked. {self.archive.how_to_get(self.root)}"
        )
        return ConfigError(f"{self.archive.name}: {what}. {fix}")

    def require_images(self, paths: Sequence[str], listed_in: str) -> None:
        missing = [p for p in paths if not os.path.isfile(p)]
        if not missing:
            return
        hint = ""
        for d in ("cars_train", "cars_test"):
            if self.archive.name == "stanford_cars" and (self.base / d / d).is_dir():
                hint = (
                    f" ({self.base / d / d} exists: the Kaggle bundle nests the images one "
                    f"level deeper; move them up into {self.base / d})"
                )
        raise self.fail(
            f"{len(missing)} of {len(paths)} images listed in {listed_in} are missing, "
            f"the first {missing[0]}{hint}"
        )


def _split(classes: list[str], paths: list[str], labels: list[int]) -> Split:
    return Split(list(classes), torch.tensor(labels, dtype=torch.long), None, paths)


def _read_pairs(ctx: _Context, rel: str) -> list[tuple[str, str]]:
    """The `<key> <value>` lines of a text list (value may hold spaces); blank lines skipped."""
    path = ctx.base / rel
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ctx.fail(f"{path} cannot be read ({e})") from e
    pairs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise ctx.fail(f"{path} line {i} ({line.strip()!r}) is not '<id> <value>'")
        pairs.append((parts[0], parts[1].strip()))
    return pairs


def _int(ctx: _Context, rel: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ctx.fail(f"{ctx.base / rel} holds {value!r} where a number belongs") from e


# ---------------------------------------------------------------- CUB-200-2011


def _parse_cub(ctx: _Context) -> tuple[Split, Split]:
    files = {
        k: _read_pairs(ctx, k)
        for k in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    }
    numbered = sorted((_int(ctx, "classes.txt", k), v) for k, v in files["classes.txt"])
    if [k for k, _ in numbered] != list(range(1, len(numbered) + 1)):
        raise ctx.fail(f"{ctx.base / 'classes.txt'} does not number its classes 1..N")
    classes = [v for _, v in numbered]
    images = files["images.txt"]
    tables = {k: dict(files[k]) for k in ("image_class_labels.txt", "train_test_split.txt")}
    paths: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for image_id, rel in images:
        for k, table in tables.items():
            if image_id not in table:
                raise ctx.fail(f"image id {image_id} of images.txt is not in {ctx.base / k}")
        label = _int(ctx, "image_class_labels.txt", tables["image_class_labels.txt"][image_id])
        if not 1 <= label <= len(classes):
            raise ctx.fail(
                f"image id {image_id} has class {label} in image_class_labels.txt, but "
                f"classes.txt has {len(classes)} classes"
            )
        flag = tables["train_test_split.txt"][image_id]
        if flag not in ("0", "1"):
            raise ctx.fail(f"train_test_split.txt gives image id {image_id} {flag!r}, not 1 or 0")
        which = "train" if flag == "1" else "test"
        paths[which].append(str(ctx.base / "images" / rel))
        labels[which].append(label - 1)
    ctx.require_images(paths["train"] + paths["test"], "images.txt")
    return (
        _split(classes, paths["train"], labels["train"]),
        _split(classes, paths["test"], labels["test"]),
    )


# ---------------------------------------------------------------- .mat files


def _loadmat(ctx: _Context, rel: str, keys: Sequence[str]) -> dict[str, Any]:
    import scipy.io

    path = ctx.base / rel
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, TypeError, ... on a damaged file
        raise ctx.fail(f"{path} cannot be read as a MATLAB file ({type(e).__name__}: {e})") from e
    lacking = [k for k in keys if k not in mat]
    if lacking:
        raise ctx.fail(f"{path} has no {', '.join(map(repr, lacking))} entry")
    return mat


# ---------------------------------------------------------------- Stanford Dogs


def _parse_dogs(ctx: _Context) -> tuple[Split, Split]:
    images = ctx.base / "Images"
    classes = class_dirs(images)
    position = {c: i for i, c in enumerate(classes)}
    used: set[str] = set()
    splits = []
    for rel in ("train_list.mat", "test_list.mat"):
        mat = _loadmat(ctx, rel, ("file_list", "labels"))
        files = [str(f) for f in np.atleast_1d(mat["file_list"]).tolist()]
        listed = [_int(ctx, rel, v) for v in np.atleast_1d(mat["labels"]).tolist()]
        if len(files) != len(listed):
            raise ctx.fail(f"{ctx.base / rel} lists {len(files)} files but {len(listed)} labels")
        paths = [str(images / f) for f in files]
        ctx.require_images(paths, rel)
        labels = []
        for f, label in zip(files, listed):
            cls = f.split("/", 1)[0]
            if position.get(cls, -1) + 1 != label:
                raise ctx.fail(
                    f"{rel} gives '{f}' label {label}, but its directory is class "
                    f"{position.get(cls, -1) + 1} of the {len(classes)} sorted Images/ "
                    "sub-directories",
                    f"Images/ and the lists must come from the same images.tar and lists.tar "
                    f"({ctx.archive.origin}); remove other directories from {images}",
                )
            used.add(cls)
            labels.append(label - 1)
        splits.append(_split(classes, paths, labels))
    unused = [c for c in classes if c not in used]
    if unused:
        raise ctx.fail(
            f"{images} holds {len(unused)} sub-directories that no list names, the first "
            f"'{unused[0]}'",
            f"Remove them: the class names are the sorted Images/ sub-directories of "
            f"images.tar ({ctx.archive.origin})",
        )
    return splits[0], splits[1]


# ---------------------------------------------------------------- Stanford Cars


def _parse_cars(ctx: _Context) -> tuple[Split, Split]:
    meta = _loadmat(ctx, "devkit/cars_meta.mat", ("class_names",))
    classes = [str(c) for c in np.atleast_1d(meta["class_names"]).tolist()]
    splits = []
    for rel, images in (
        ("devkit/cars_train_annos.mat", "cars_train"),
        ("cars_test_annos_withlabels.mat", "cars_test"),
    ):
        annotations = np.atleast_1d(_loadmat(ctx, rel, ("annotations",))["annotations"])
        fields = annotations.dtype.names or ()
        if "fname" not in fields or "class" not in fields:
            raise ctx.fail(
                f"{ctx.base / rel}'s annotations have no 'fname' and 'class' fields "
                "(devkit/cars_test_annos.mat has no labels: the test split needs "
                "cars_test_annos_withlabels.mat)"
            )
        paths, labels = [], []
        for ann in annotations:
            label = _int(ctx, rel, ann["class"])
            if not 1 <= label <= len(classes):
                raise ctx.fail(
                    f"{ctx.base / rel} gives '{ann['fname']}' class {label}, but cars_meta.mat "
                    f"has {len(classes)} classes"
                )
            paths.append(str(ctx.base / images / str(ann["fname"])))
            labels.append(label - 1)
        ctx.require_images(paths, rel)
        splits.append(_split(classes, paths, labels))
    return splits[0], splits[1]


# ---------------------------------------------------------------- FGVC-Aircraft


def _parse_aircraft(ctx: _Context) -> tuple[Split, Split]:
    variants = ctx.base / "data" / "variants.txt"
    try:
        classes = [s for s in (x.strip() for x in variants.read_text("utf-8").splitlines()) if s]
    except (OSError, UnicodeDecodeError) as e:
        raise ctx.fail(f"{variants} cannot be read ({e})") from e
    if len(set(classes)) != len(classes):
        raise ctx.fail(f"{variants} names a variant twice")
    position = {c: i for i, c in enumerate(classes)}
    splits = []
    for part in ("trainval", "test"):
        rel = f"data/images_variant_{part}.txt"
        paths, labels = [], []
        for image_id, variant in _read_pairs(ctx, rel):
            if variant not in position:
                raise ctx.fail(
                    f"{ctx.base / rel} gives image {image_id} the variant {variant!r}, "
                    "which data/variants.txt does not list"
                )
            paths.append(str(ctx.base / "data" / "images" / f"{image_id}.jpg"))
            labels.append(position[variant])
        ctx.require_images(paths, rel)
        splits.append(_split(classes, paths, labels))
    return splits[0], splits[1]


_PARSERS: dict[str, Callable[[_Context], tuple[Split, Split]]] = {
    "cub200": _parse_cub,
    "stanford_dogs": _parse_dogs,
    "stanford_cars": _parse_cars,
    "fgvc_aircraft": _parse_aircraft,
}
