"""Data sources (labeled image sets) and the amalgamation data module."""

from amalgam.data.datamodule import (
    AmalgamDataModule,
    ImageFormat,
    LabeledImages,
    UnlabeledImages,
    augment_batch,
    stratified_split,
    to_model_input,
)
from amalgam.data.sources import (
    Source,
    Split,
    cifar10,
    cifar100,
    concat,
    digits,
    fashion_mnist,
    image_folder,
    load_image,
    mnist,
    read_idx,
    synthetic,
)

__all__ = [
    "AmalgamDataModule",
    "ImageFormat",
    "LabeledImages",
    "Source",
    "Split",
    "UnlabeledImages",
    "augment_batch",
    "cifar10",
    "cifar100",
    "concat",
    "digits",
    "fashion_mnist",
    "image_folder",
    "load_image",
    "mnist",
    "read_idx",
    "stratified_split",
    "synthetic",
    "to_model_input",
]
