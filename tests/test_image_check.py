"""Bad files of an image folder stop the build with one message, not an epoch with a traceback."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from amalgam.data import verify
from amalgam.data.sources import image_folder, load_image
from amalgam.errors import ConfigError
from amalgam.validate import _count_images


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch) -> Path:
    """Keep the check's cache out of the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def truncated(path: Path) -> Path:
    """A noisy image cut in half: the header is intact, so it opens, but the pixels end early."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def good_tree(root: Path) -> dict[str, list[Path]]:
    """train/ and test/ with classes cat and dog; returns the good files per split."""
    return {
        "train": [
            save(root / "train" / "cat" / "0.jpg"),
            save(root / "train" / "cat" / "deep" / "1.png"),
            save(root / "train" / "dog" / "0.jpg", (20, 20, 220)),
        ],
        "test": [save(root / "test" / "cat" / "0.jpg"), save(root / "test" / "dog" / "0.png")],
    }


def hidden_files(root: Path) -> None:
    """macOS AppleDouble companions and a hidden folder: not images, never listed."""
    (root / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "test" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "train" / "dog" / ".thumbs").mkdir()
    (root / "train" / "dog" / ".thumbs" / "0.jpg").write_text("not an image")


def build(root: Path):
    return image_folder(str(root / "train"), str(root / "test"))


def count_decodes(monkeypatch) -> list[str]:
    """The paths `check_image` decodes from now on."""
    calls: list[str] = []
    real = verify.check_image

    def counting(path: str) -> str | None:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(verify, "check_image", counting)
    return calls


def test_every_bad_file_named_in_one_message(tmp_path: Path) -> None:
    good = good_tree(tmp_path)
    hidden_files(tmp_path)
    text = tmp_path / "train" / "cat" / "notes.jpg"
    text.write_text("a text file with an image extension")
    bad = [text, truncated(tmp_path / "train" / "dog" / "cut.jpg")]
    bad.append(truncated(tmp_path / "test" / "cat" / "cut.png"))
    with pytest.raises(ConfigError) as info:
        build(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("image_folder: 3 files with an image extension cannot be decoded: ")
    assert f"{text} (not an image file PIL can read)" in msg
    assert re.search(rf"{re.escape(str(bad[1]))} \([^)]*truncated", msg, re.IGNORECASE)
    assert msg.endswith("Delete or replace them, or move them out of the class folders")
    named = {p for p in tmp_path.rglob("*") if p.is_file() and str(p) in msg}
    assert named == set(bad)
    assert not any(str(p) in msg for files in good.values() for p in files)


def test_many_bad_files_listed_first_ten_and_counted(tmp_path: Path) -> None:
    good_tree(tmp_path)
    for i in range(12):
        (tmp_path / "train" / "dog" / f"bad{i:02d}.jpg").write_text("no image")
    with pytest.raises(ConfigError, match=r"^image_folder: 12 files .*bad09\.jpg.*; and 2 more\."):
        build(tmp_path)


def test_hidden_files_and_folders_skipped(tmp_path: Path) -> None:
    good = good_tree(tmp_path)
    hidden_files(tmp_path)
    source = build(tmp_path)
    assert source.train.paths == [str(p) for p in good["train"]]
    assert source.test.paths == [str(p) for p in good["test"]]
    assert _count_images(tmp_path / "train", ["cat", "dog"]) == [2, 1]
    assert _count_images(tmp_path / "test", ["cat", "dog"]) == [1, 1]


def test_second_build_decodes_nothing(tmp_path: Path, monkeypatch) -> None:
    good = good_tree(tmp_path)
    calls = count_decodes(monkeypatch)
    build(tmp_path)
    assert sorted(calls) == sorted(str(p) for files in good.values() for p in files)
    calls.clear()
    source = build(tmp_path)
    assert calls == [] and len(source.train) == 3


def test_changed_file_checked_again(tmp_path: Path, monkeypatch) -> None:
    good = good_tree(tmp_path)
    build(tmp_path)
    calls = count_decodes(monkeypatch)
    recoloured = save(good["train"][0], (1, 2, 3))  # same size maybe, newer mtime
    st = recoloured.stat()
    os.utime(recoloured, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    build(tmp_path)
    assert calls == [str(recoloured)]
    calls.clear()
    truncated(good["test"][1])  # new size
    with pytest.raises(ConfigError, match=r"(?i)^image_folder: 1 file .*dog/0\.png \(.*truncated"):
        build(tmp_path)
    assert calls == [str(good["test"][1])]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"version": 99, "files": {}}),
        json.dumps({"version": 1, "files": {"cat/0.jpg": "yes", "dog/0.jpg": [1, True]}}),
        "[" * 100_000,
    ],
)
def test_malformed_cache_ignored_and_rebuilt(tmp_path: Path, monkeypatch, content: str) -> None:
    good_tree(tmp_path)
    cache = verify.cache_file(tmp_path / "train")
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    calls = count_decodes(monkeypatch)
    build(tmp_path)
    assert len(calls) == 5
    stored = json.loads(cache.read_text())
    assert stored["version"] == 1
    assert sorted(stored["files"]) == ["cat/0.jpg", "cat/deep/1.png", "dog/0.jpg"]


def test_unwritable_cache_still_builds(tmp_path: Path, monkeypatch, cache_home: Path) -> None:
    good_tree(tmp_path)
    cache_home.write_text("a file where the cache directory would go")
    calls = count_decodes(monkeypatch)
    build(tmp_path)
    build(tmp_path)
    assert len(calls) == 10


def test_load_image_names_the_file(tmp_path: Path) -> None:
    path = truncated(tmp_path / "cat" / "0.jpg")
    with pytest.raises(ConfigError, match=r"(?i)image file '.*cat/0\.jpg' cannot be .*truncated"):
        load_image(str(path))


def test_hidden_class_folders_are_not_classes(tmp_path: Path) -> None:
    """`.ipynb_checkpoints` or `.Trash` beside the class folders is no class, for the source and
    for validation's cheap description alike (their class lists must agree)."""
    from amalgam.validate import data_facts

    good_tree(tmp_path)
    for which in ("train", "test"):
        save(tmp_path / which / ".ipynb_checkpoints" / "x.jpg")
    src = build(tmp_path)
    facts = data_facts(
        {
            "_target_": "amalgam.data.sources.image_folder",
            "train_dir": str(tmp_path / "train"),
            "test_dir": str(tmp_path / "test"),
        }
    )
    assert src.classes == facts.classes == ["cat", "dog"]
