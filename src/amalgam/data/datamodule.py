"""Data module: per-task labeled loaders and the label-free amalgamation loader."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from amalgam.data.loaders import ResumableLoader, WorkerInit
from amalgam.data.sources import Source, Split, load_image, open_rgb
from amalgam.data.transforms import Preprocess, seed_table, view_seed
from amalgam.errors import ConfigError
from amalgam.tasks import LabelSpace, resolve_classes

SplitName = Literal["train", "val", "test"]
UNLABELED_POLICIES = ("union", "all")
PAD = 4  # crop augmentation: reflect-pad by PAD, crop back to the image size


def to_model_input(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) [B, C, H, W] -> float32 [B, channels, size, size] in [0, 1].

    1 -> n channels repeats, n -> 1 averages; resizing is bilinear with antialiasing.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != channels and channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ConfigError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
        x = x.repeat(1, channels, 1, 1)
    return x


def augment_params(
    n: int, pad: int = 4, hflip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[n, 3] int64 view parameters: crop row offset, crop column offset (0..2 pad), flip."""
    rows = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    cols = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = (
        torch.randint(0, 2, (n,), generator=generator)
        if hflip
        else torch.zeros(n, dtype=torch.long)
    )
    return torch.stack([rows, cols, flip], 1)


def augment_batch(
    x: torch.Tensor, pad: int = 4, hflip: bool = True, params: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image crop of the reflect-padded batch and horizontal flip.

    `params` ([B, 3], see `augment_params`) replays given views exactly; None draws new ones.
    """
    b, c, h, w = x.shape
    if params is None:
        params = augment_params(b, pad, hflip)
    params = params.long()
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = params[:, :1] + torch.arange(h)
    cols = params[:, 1:2] + torch.arange(w)
    out = padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    flip = params[:, 2].bool()
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def view_table(n: int, views: int, pad: int, hflip: bool, seed: int) -> torch.Tensor:
    """[views, n, 3] parameters of K fixed augmented views of each of n pool images."""
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    return torch.stack([augment_params(n, pad, hflip, g) for _ in range(views)])


@dataclass(frozen=True)
class ImageFormat:
    """How images are handed to models: channels, square size, optional training augmentation.

    `preprocess.mode`: `square` squashes to size x size (training: reflect-pad crop + flip on
    the batch); `timm` resizes + centre-crops each file like timm's eval transform (training:
    timm's RandomResizedCrop + flip ...), see `amalgam.data.transforms`.
    """

    channels: int
    size: int
    augment: bool = False
    hflip: bool = True
    pad: int = PAD
    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)

    @property
    def timm(self) -> bool:
        return self.preprocess.mode == "timm"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of uint8 [B, C, H, W] (or float in [0, 1]) images in this format."""
        if self.timm:
            return self._channels(torch.stack([self._transform(_to_pil(x)) for x in images]))
        x = to_model_input(images, self.channels, self.size)
        return augment_batch(x, self.pad, self.hflip) if self.augment else x

    def files(self, paths: Sequence[str]) -> torch.Tensor:
        """Image files in this format: float [B, channels, size, size]."""
        c, s = self.channels, self.size
        if not paths:
            return torch.empty(0, c, s, s)
        if self.timm:
            return self._channels(torch.stack([self._transform(open_rgb(p)) for p in paths]))
        x = torch.cat([to_model_input(load_image(p)[None], c, s) for p in paths])
        return augment_batch(x, self.pad, self.hflip) if self.augment else x

    def views(self, images: Sequence[Any], seeds: Sequence[int]) -> torch.Tensor:
        """timm mode: the replayable training view of each image (path or uint8 [C, H, W])
        with its seed: RandomResizedCrop + flip (`Preprocess.view`)."""
        out = [
            self.preprocess.view(_as_pil(im), self.size, s)
            for im, s in zip(images, seeds, strict=True)
        ]
        if not out:
            return torch.empty(0, self.channels, self.size, self.size)
        return self._channels(torch.stack(out))

    def _transform(self, image: Any) -> torch.Tensor:
        return self._transforms[1 if self.augment else 0](image)

    @functools.cached_property
    def _transforms(self) -> tuple[Callable, Callable]:
        p = self.preprocess
        train = p.train_transform(self.size) if self.augment else None
        return p.eval_transform(self.size), train  # type: ignore[return-value]

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True) if self.channels == 1 else x


def _as_pil(image: Any):
    """A path, uint8 pixels or a PIL image, as an RGB PIL image."""
    if isinstance(image, str):
        return open_rgb(image)
    return _to_pil(image) if isinstance(image, torch.Tensor) else image


def _to_pil(image: torch.Tensor):
    """uint8 (or [0, 1] float) [C, H, W] -> an RGB PIL image."""
    import torchvision.transforms.functional as TF

    x = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return TF.to_pil_image(x.contiguous())


class EpochShuffle(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed run sees the same batches.

    Lightning calls `set_epoch` at the start of every epoch (and wraps this sampler for DDP).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ViewShuffle(EpochShuffle):
    """EpochShuffle over (position, view) pairs: each epoch picks one of K views per image."""

    def __init__(self, n: int, seed: int, views: int) -> None:
        super().__init__(n, seed)
        self.views = views

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        view = torch.randint(0, self.views, (self.n,), generator=g)
        return iter(zip(order.tolist(), view[order].tolist(), strict=True))


class UnlabeledImages(Dataset):
    """Images of a split at `indices`; samples are {"image", "index"}. Holds no labels at all."""

    def __init__(self, split: Split, indices: torch.Tensor, fmt: ImageFormat) -> None:
        self.images = split.images
        self.paths = split.paths
        self.indices = indices.long()
        self.fmt = fmt

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float images [B, C, S, S], split indices [B]) for dataset positions."""
        idx = self.indices[torch.as_tensor(positions, dtype=torch.long)]
        if self.images is not None:
            return self.fmt(self.images[idx]), idx
        assert self.paths is not None
        return self.fmt.files([self.paths[i] for i in idx.tolist()]), idx

    def raw(self, i: int) -> Any:
        """Image id `i` undecoded: its path (lazy split) or its uint8 pixels."""
        return self.paths[i] if self.paths is not None else self.images[i]  # type: ignore[index]

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        x, idx = self.load(positions)
        return [{"image": img, "index": i} for img, i in zip(x, idx.tolist())]

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]


class ViewImages(UnlabeledImages):
    """Replays fixed augmented views: items are (position, view) pairs from a ViewShuffle;
    samples are {"image", "index", "view"}, the image made with `table[view, position]`."""

    def __init__(
        self, split: Split, indices: torch.Tensor, fmt: ImageFormat, table: torch.Tensor
    ) -> None:
        super().__init__(split, indices, fmt)
        if table.shape[1] != len(indices):
            raise ValueError("the view table must have one row per pool image")
        self.table = table

    def __getitems__(self, pairs: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:  # type: ignore[override]
        positions = [p for p, _ in pairs]
        views = torch.as_tensor([v for _, v in pairs], dtype=torch.long)
        params = self.table[views, positions]
        if self.fmt.timm:  # each view remade from its file with its seed
            idx = self.indices[torch.as_tensor(positions, dtype=torch.long)]
            seeds = [view_seed(r) for r in params.tolist()]
            x = self.fmt.views([self.raw(i) for i in idx.tolist()], seeds)
        else:
            x, idx = self.load(positions)
            x = augment_batch(x, self.fmt.pad, self.fmt.hflip, params)
        return [
            {"image": img, "index": i, "view": v}
            for img, i, v in zip(x, idx.tolist(), views.tolist(), strict=True)
        ]

    def __getitem__(self, pair: tuple[int, int]) -> dict[str, Any]:  # type: ignore[override]
        return self.__getitems__([pair])[0]


class AllViews(ViewImages):
    """timm mode's teacher-cache fill: every cached view of each pool image at once; items are
    positions, samples {"image": [K, C, S, S], "index"}, view k made with `table[k, position]`."""

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:  # type: ignore[override]
        out = []
        for p in positions:
            i = int(self.indices[p])
            seeds = [view_seed(r) for r in self.table[:, p].tolist()]
            x = self.fmt.views([_as_pil(self.raw(i))] * len(seeds), seeds)  # decoded once
            out.append({"image": x, "index": i})
        return out

    def __getitem__(self, position: int) -> dict[str, Any]:  # type: ignore[override]
        return self.__getitems__([position])[0]


class LabeledImages(UnlabeledImages):
    """Images of a split at `indices` with `labels` (aligned with indices); samples are tuples."""

    def __init__(
        self, split: Split, indices: torch.Tensor, labels: torch.Tensor, fmt: ImageFormat
    ) -> None:
        super().__init__(split, indices, fmt)
        if len(labels) != len(indices):
            raise ValueError("labels and indices must have the same length")
        self.labels = labels.long()

    def __getitems__(  # type: ignore[override]
        self, positions: Sequence[int]
    ) -> list[tuple[torch.Tensor, int]]:
        x, _ = self.load(positions)
        labels = self.labels[torch.as_tensor(positions, dtype=torch.long)].tolist()
        return list(zip(x, labels))

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        return self.__getitems__([position])[0]


def stratified_split(
    labels: torch.Tensor, val_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices; each class sends round(val_fraction * n_class) to val."""
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = round(val_fraction * len(idx))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    empty = torch.empty(0, dtype=torch.long)
    return torch.cat(train or [empty]).sort().values, torch.cat(val or [empty]).sort().values


def _subset(idx: torch.Tensor, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    if limit is None or len(idx) <= limit:
        return idx
    return idx[torch.randperm(len(idx), generator=generator)[:limit]].sort().values


def _class_list(spec: Any) -> list[str | int] | None:
    """Plain list of names and Python ints (numpy integers and OmegaConf lists accepted);
    None (every class of the source) stays None."""
    if spec is None:
        return None
    return [
        int(c) if isinstance(c, numbers.Integral) and not isinstance(c, bool) else c for c in spec
    ]


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")


class AmalgamDataModule(L.LightningDataModule):
    """Serves a source's images for amalgamation: labeled per task, unlabeled for the student.

    `source` is a Source or a zero-argument callable returning one (loaded on first need).
    `tasks` maps teacher names to class names or indices of the source's classes (None:
    every class of the source, e.g. a teacher trained on a whole data set).
    `unlabeled`: "union" trains the student on images whose class is in some task, "all" on
    every training image. The source's train split is split into train/val (stratified, from
    `seed`); the test split is the source's. Val/test loaders keep only union classes.
    """

    def __init__(
        self,
        source: Source | Callable[[], Source],
        tasks: Mapping[str, Sequence[str | int]],
        image_size: int | None = 32,
        channels: int = 3,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = False,
        hflip: bool = True,
        unlabeled: str = "union",
        train_limit: int | None = None,
        test_limit: int | None = None,
        preprocess: Mapping[str, Any] | Preprocess | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = Preprocess.from_config(preprocess)
        if not hflip:
            self.preprocess = dataclasses.replace(self.preprocess, hflip=0.0)
        # timm mode: None is the student's timm input size (`use_data_config`)
        _check_int("image_size", image_size, 5 if augment else 1, self.preprocess.mode == "timm")
        _check_int("batch_size", batch_size, 1)
        _check_int("eval_batch_size", eval_batch_size, 1, optional=True)
        _check_int("num_workers", num_workers, 0)
        _check_int("train_limit", train_limit, 1, optional=True)
        _check_int("test_limit", test_limit, 1, optional=True)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels!r}")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        if unlabeled not in UNLABELED_POLICIES:
            raise ConfigError(
                f"data.unlabeled must be one of {UNLABELED_POLICIES}, got {unlabeled!r}: 'union' "
                "uses training images of the tasks' classes, 'all' every training image"
            )
        if not isinstance(tasks, Mapping):
            raise ConfigError(f"tasks must map task names to class lists, got {type(tasks)}")
        for name, spec in tasks.items():
            if spec is not None and (
                isinstance(spec, str | bytes) or not hasattr(spec, "__iter__")
            ):
                raise ConfigError(f"task '{name}': give a list of classes, got {spec!r}")
        if not isinstance(source, Source) and not callable(source):
            raise ConfigError(f"data.source must be a Source or a callable, got {type(source)}")
        self.tasks_spec = {str(k): _class_list(v) for k, v in tasks.items()}
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.augment = augment
        self.hflip = hflip
        self.unlabeled = unlabeled
        self.train_limit = train_limit
        self.test_limit = test_limit
        self._factory = None if isinstance(source, Source) else source
        self._source = source if isinstance(source, Source) else None
        self._space: LabelSpace | None = None
        self._union_of = torch.empty(0, dtype=torch.long)
        self._indices: dict[str, torch.Tensor] = {}
        self._poolable = torch.empty(0, dtype=torch.long)  # ids any seed's pool may hold
        self.cached_views = 0  # K > 0: the student replays K fixed views (teacher cache)
        self._view_table: torch.Tensor | None = None
        if self._source is not None:
            self.prepare()

    # ------------------------------------------------------------------ preparation

    def prepare(self) -> Source:
        """Load the source (once) and resolve tasks, label space and splits."""
        if self._source is None:
            assert self._factory is not None
            source = self._factory()
            if not isinstance(source, Source):
                raise ConfigError(f"data.source returned {type(source)}, not a Source")
            self._source = source
        if self._space is None:
            self._build(self._source)
        return self._source

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _build(self, source: Source) -> None:
        classes = source.classes
        resolved = {
            t: resolve_classes(list(classes) if s is None else s, classes, t)
            for t, s in self.tasks_spec.items()
        }
        space = LabelSpace.from_mapping(resolved)
        union_of = torch.full((len(classes),), -1, dtype=torch.long)
        for i, c in enumerate(space.classes):
            union_of[classes.index(c)] = i
        g = torch.Generator().manual_seed(self.seed)
        train, val = stratified_split(source.train.labels, self.val_fraction, g)
        in_union = union_of[source.train.labels] >= 0
        # what a pool may hold, whatever the seed: the union's images, or every image
        poolable = in_union if self.unlabeled == "union" else torch.ones_like(in_union)
        train = train[poolable[train]]
        val = val[in_union[val]]
        test = torch.arange(len(source.test))
        test = test[union_of[source.test.labels[test]] >= 0]
        if self.train_limit is not None:
            train = _subset(train, self.train_limit, g)
            ratio = self.val_fraction / (1 - self.val_fraction)
            val = _subset(val, math.ceil(self.train_limit * ratio), g)
        test = _subset(test, self.test_limit, g)
        self._check_train_counts(source, space, classes, train)
        self._space, self._union_of = space, union_of
        self._poolable = poolable.nonzero().squeeze(1)
        self._indices = {"train": train, "val": val, "test": test}

    def _check_train_counts(
        self, source: Source, space: LabelSpace, classes: list[str], train: torch.Tensor
    ) -> None:
        counts = torch.bincount(source.train.labels[train], minlength=len(classes))
        for task in space.tasks:
            empty = [c for c in task.classes if counts[classes.index(c)] == 0]
            if empty:
                raise ConfigError(
                    f"task '{task.name}': classes {empty} have no training images in source "
                    f"'{source.name}' (after the val split and train_limit={self.train_limit}); "
                    "drop them from the task or use more data"
                )

    def __getstate__(self) -> dict[str, Any]:
        """Drop a re-loadable source when pickled (DDP spawn); it is reloaded on first need."""
        state = self.__dict__.copy()
        if self._factory is not None:
            state["_source"] = None
        return state

    # ------------------------------------------------------------------ accessors

    @property
    def source(self) -> Source:
        return self.prepare()

    @property
    def label_space(self) -> LabelSpace:
        self.prepare()
        assert self._space is not None
        return self._space

    @property
    def classes(self) -> tuple[str, ...]:
        """Union classes, in union label order."""
        return self.label_space.classes

    @property
    def num_classes(self) -> int:
        return self.label_space.num_classes

    def indices(self, split: SplitName) -> torch.Tensor:
        """Image ids of `split`: train = the unlabeled pool (per `unlabeled`), val/test = union."""
        self.prepare()
        if split not in self._indices:
            raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return self._indices[split]

    def union_labels(self, split: SplitName, indices: torch.Tensor) -> torch.Tensor:
        """Union label of each image id of `split` (-1 for images outside the union)."""
        return self._union_of[self._split(split).labels[indices]]

    def sizes(self) -> dict[str, int]:
        train = self.indices("train")
        labeled = int((self.union_labels("train", train) >= 0).sum())
        return {
            "train": len(train),
            "labeled_train": labeled,
            "val": len(self.indices("val")),
            "test": len(self.indices("test")),
            "source_train": len(self.source.train),
            "source_test": len(self.source.test),
        }

    def _split(self, split: SplitName) -> Split:
        source = self.prepare()
        return source.test if split == "test" else source.train

    def use_data_config(self, data_config: Mapping[str, Any]) -> None:
        """Fill what the config leaves None from a timm data config (the student's, from
        `amalgam.backbone.data_config`): interpolation, crop fraction and crop mode, and in
        timm mode the image size. Square mode takes nothing from it."""
        if self.preprocess.mode != "timm":
            return
        self.preprocess = self.preprocess.with_data_config(data_config)
        if self.image_size is None:
            self.image_size = int(data_config["input_size"][-1])

    def _format(self, train: bool) -> ImageFormat:
        if self.image_size is None:
            raise ConfigError(
                "data.image_size is null and no timm data config filled it: set "
                "data.image_size (e.g. 224)"
            )
        return ImageFormat(
            self.channels, self.image_size, self.augment and train, self.hflip, PAD,
            self.preprocess,
        )  # fmt: skip

    # ------------------------------------------------------------------ loaders

    def _loader(
        self,
        dataset: Dataset,
        train: bool,
        sampler: Sampler | None = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        if train and sampler is None:
            sampler = EpochShuffle(len(dataset), self.seed)
        # training loaders resume mid-epoch at the checkpoint's batch (docs/RELIABILITY.md)
        loader = ResumableLoader if train else DataLoader
        return loader(
            dataset,
            batch_size=max(1, batch_size or (self.batch_size if train else self.eval_batch_size)),
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
            # workers leave preemption signals to the main process (which saves last.ckpt)
            worker_init_fn=WorkerInit(rank_zero_only.rank) if self.num_workers > 0 else None,
        )

    def _labeled(self, split: SplitName, labels_of: torch.Tensor) -> LabeledImages:
        """Images of `split` whose source class c has labels_of[c] >= 0, labeled labels_of[c]."""
        idx = self.indices(split)
        labels = labels_of[self._split(split).labels[idx]]
        keep = labels >= 0
        fmt = self._format(split == "train")
        return LabeledImages(self._split(split), idx[keep], labels[keep], fmt)

    def task_dataloader(self, task: str, split: SplitName = "train") -> DataLoader:
        """Labeled loader of one task's images; labels 0..len(task)-1 in the task's class order."""
        space = self.label_space
        if task not in space.names:
            raise ConfigError(f"unknown task '{task}'; tasks are {space.names}")
        classes = self.source.classes
        task_of = torch.full((len(classes),), -1, dtype=torch.long)
        for j, c in enumerate(space.task(task).classes):
            task_of[classes.index(c)] = j
        return self._loader(self._labeled(split, task_of), train=split == "train")

    def use_cached_views(self, views: int) -> None:
        """Augment with K fixed views per image (`view_table`) that a teacher cache can hold,
        instead of new random views every epoch. Needs data.augment=true."""
        if not self.augment:
            raise ConfigError("cached views need data.augment=true")
        _check_int("teacher_cache.views", views, 1)
        p = self.preprocess
        if p.mode == "timm" and not p.replayable:
            raise ConfigError(
                "teacher_cache replays RandomResizedCrop + flip only, but data.preprocess asks "
                f"for color_jitter={p.color_jitter}, auto_augment={p.auto_augment}, "
                f"re_prob={p.re_prob}: set them to null/0, or teacher_cache.enabled=false"
            )
        self.cached_views = int(views)
        self._view_table = None

    def view_table(self) -> torch.Tensor:
        """[K, n_pool, 3] parameters of the cached views (deterministic from the seed)."""
        if not self.cached_views:
            raise ConfigError("no cached views: call use_cached_views(K) first")
        if self._view_table is None:
            n = len(self.indices("train"))
            if self.preprocess.mode == "timm":  # a seed per view, remade from the file
                self._view_table = seed_table(n, self.cached_views, self.seed)
            else:
                self._view_table = view_table(n, self.cached_views, PAD, self.hflip, self.seed)
        return self._view_table

    def apply_view(self, x: torch.Tensor, rows: torch.Tensor, view: int) -> torch.Tensor:
        """Pool images x (rows of the pool, un-augmented) in cached view `view`; in timm mode
        the cache loader already made every view ([B, K, C, S, S]) and one is picked."""
        if x.ndim == 5:
            return x[:, view]
        return augment_batch(x, PAD, self.hflip, self.view_table()[view, rows.cpu()].to(x.device))

    def train_dataloader(self) -> DataLoader:
        """Unlabeled amalgamation loader: batches {"image": [B, C, S, S], "index": [B]}
        (plus "view": [B] when the student replays cached views)."""
        split, idx = self._split("train"), self.indices("train")
        if not self.cached_views:
            return self._loader(UnlabeledImages(split, idx, self._format(True)), train=True)
        ds = ViewImages(split, idx, self._format(False), self.view_table())
        return self._loader(
            ds, train=True, sampler=ViewShuffle(len(ds), self.seed, self.cached_views)
        )

    def pool_dataloader(self) -> DataLoader:
        """The unlabeled pool in a fixed order, no augmentation (to precompute teacher outputs)."""
        return self._fixed_order_loader(self.indices("train"))

    def _fixed_order_loader(self, ids: torch.Tensor) -> DataLoader:
        ds = UnlabeledImages(self._split("train"), ids, self._format(False))
        return self._loader(ds, train=False)

    def cache_ids(self) -> torch.Tensor:
        """Image ids (of the source's train split) that a teacher-output cache covers.

        Every image that any seed's pool can hold: the whole train split, or its images of the
        tasks' classes with unlabeled=union. The val split is drawn per seed, so a cache of one
        seed's pool would be rebuilt for every seed of a sweep; this one serves them all, for
        the price of also covering the held-out val images once. With train_limit or cached
        augmented views (both drawn from the seed) it is the pool itself.
        """
        self.prepare()
        if self.train_limit is not None or self.cached_views:
            return self.indices("train")
        return self._poolable

    def cache_dataloader(self) -> DataLoader:
        """The images of `cache_ids` in a fixed order, no augmentation (to fill the cache);
        in timm mode with cached views, every view of each image ([B, K, C, S, S])."""
        if self.cached_views and self.preprocess.mode == "timm":
            split, ids = self._split("train"), self.indices("train")
            ds = AllViews(split, ids, self._format(False), self.view_table())
            # a batch holds K views of each image: K times fewer images per batch
            return self._loader(ds, False, batch_size=self.eval_batch_size // self.cached_views)
        return self._fixed_order_loader(self.cache_ids())

    def cache_key(self) -> dict[str, Any]:
        """What identifies the cached images (`cache_ids`) and their view, for teacher caches."""
        ids = self.cache_ids()
        return {
            "source": self.source.name,
            "source_train_len": len(self.source.train),
            "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "n": len(ids),
            "image_size": self.image_size,
            "channels": self.channels,
            "view": self._view_key(),
            **({"preprocess": self.preprocess.as_dict()} if self.preprocess.mode == "timm" else {}),
        }

    def _view_key(self) -> dict[str, Any]:
        if self.cached_views:
            table = self.view_table().numpy()
            return {
                "kind": "cached_views",
                "views": self.cached_views,
                "pad": PAD,
                "hflip": self.hflip,
                "params_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
            }
        return {"kind": "random_augment" if self.augment else "identity"}

    def labeled_train_dataloader(self) -> DataLoader:
        """Training images of union classes with union labels (supervised upper bound only)."""
        return self._loader(self._labeled("train", self._union_of), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._labeled("val", self._union_of), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._labeled("test", self._union_of), train=False)
