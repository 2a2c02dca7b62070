"""`python -m amalgam.data.check data=<config> paths.data_dir=<dir>`: check a data set's files.

Builds only the data config's `source` (no model, no data loaders) and prints, for each source
(each part of a `concat`, then the total): where its images are, its class count and its train
and test image counts; then whether every image decodes. Exit status 0 when all is well; 2 with
one `Error: ...` line on stderr when files are missing, lists disagree or images are bad.

    python -m amalgam.data.check data=cub_dogs paths.data_dir=/data
    cub200: 200 classes, 5994 train + 5794 test images in /data/CUB_200_2011/images
      no bad files
    stanford_dogs: 120 classes, 12000 train + 8580 test images in /data/stanford_dogs/Images
      no bad files
    total cub200+stanford_dogs: 320 classes, 17994 train + 14374 test images
    no bad files
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig

from amalgam.data.sources import Source, concat
from amalgam.errors import ConfigError
from amalgam.utils import CONF_DIR

Print = Callable[[str], Any]


def _is_concat(node: Any) -> bool:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        return False
    try:
        return get_method(target) is concat
    except Exception:  # an unknown target: instantiating it names the problem
        return False


def where(source: Source) -> str:
    """The directory holding a lazy source's images, or 'in memory'."""
    paths = (source.train.paths or []) + (source.test.paths or [])
    if not paths:
        return "in memory"
    return (
        f"in {os.path.commonpath(paths)}" if len(paths) > 1 else f"in {os.path.dirname(paths[0])}"
    )


def counts(source: Source) -> str:
    return (
        f"{len(source.classes)} classes, {len(source.train)} train + {len(source.test)} test images"
    )


def _takes_check_images(fn: Any) -> bool:
    try:
        return "check_images" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_source(node: DictConfig, out: Print = print) -> tuple[Source, list[str]]:
    """(the source, the decode problems found) of one `data.source` node; prints as it goes.

    A `concat` is walked part by part; a part that takes `check_images` is first built without
    decoding (so missing files and the counts come first), then decoded. A ConfigError other
    than a decode problem propagates.
    """
    if _is_concat(node):
        parts, problems = [], []
        for child in node.sources:
            source, found = check_source(child, out)
            parts.append(source)
            problems += found
        total = instantiate(node, _partial_=True)(sources=parts)
        prefix = node.get("prefix", True)
        out(f"total {total.name} (prefix={str(prefix).lower()}): {counts(total)}")
        return total, problems
    build = instantiate(node, _partial_=True)
    if not _takes_check_images(build):
        source = build()  # it checks its files itself, if it has any
        out(f"{source.name}: {counts(source)} {where(source)}")
        return source, []
    source = build(check_images=False)
    out(f"{source.name}: {counts(source)} {where(source)}")
    try:
        build(check_images=True)
    except ConfigError as e:
        out(f"  bad files: {e}")
        return source, [str(e)]
    out("  no bad files")
    return source, []


def check_data(cfg: DictConfig, out: Print = print) -> list[str]:
    """Build `cfg.data.source` part by part, printing what was found; the decode problems."""
    node = cfg.get("data", {}).get("source") if isinstance(cfg.get("data"), DictConfig) else None
    if not isinstance(node, DictConfig):
        raise ConfigError("data.check: the data config has no `source`; pick one with data=<name>")
    _, problems = check_source(node, out)
    return problems


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="data_check")
def main(cfg: DictConfig) -> None:
    try:
        problems = check_data(cfg)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if problems:
        more = f" (and bad files in {len(problems) - 1} more sources)" if len(problems) > 1 else ""
        print(f"Error: {problems[0]}{more}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("no bad files")


if __name__ == "__main__":
    main()
