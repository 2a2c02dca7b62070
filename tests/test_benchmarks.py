"""The fine-grained benchmarks (CUB-200-2011, Stanford Dogs, Stanford Cars, FGVC-Aircraft) read
from miniature archives in the official layouts (tests/archives.py), and the data check CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.io
from hydra.utils import instantiate

from amalgam.data import benchmarks
from amalgam.data.benchmarks import cub200, fgvc_aircraft, stanford_cars, stanford_dogs
from amalgam.data.check import check_data
from amalgam.errors import ConfigError
from amalgam.tasks import resolve_classes
from archives import write_aircraft, write_cars, write_cub, write_dogs
from conftest import make_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch) -> None:
    """The decode check's cache of good files goes under this test's tmp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def corrupt(path: Path) -> None:
    """Cut a JPEG in half: it opens (header intact) but its pixels end early."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------ each set


def test_cub_classes_counts_and_official_split(tmp_path):
    names = write_cub(tmp_path, classes=3, train_per_class=3, test_per_class=2, size=40)
    src = cub200(str(tmp_path))
    assert src.name == "cub200"
    assert names == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert src.classes == names
    assert (len(src.train), len(src.test)) == (9, 6)
    base = tmp_path / "CUB_200_2011"

    def table(name: str) -> dict[str, str]:
        return dict(line.split(" ", 1) for line in (base / name).read_text().splitlines())

    ids, flags, labels = (
        table("images.txt"),
        table("train_test_split.txt"),
        table("image_class_labels.txt"),
    )
    train_ids = [i for i in ids if flags[i] == "1"]
    test_ids = [i for i in ids if flags[i] == "0"]
    assert src.train.paths == [str(base / "images" / ids[i]) for i in train_ids]
    assert src.test.paths == [str(base / "images" / ids[i]) for i in test_ids]
    assert src.train.labels.tolist() == [int(labels[i]) - 1 for i in train_ids]
    assert src.test.labels.tolist() == [int(labels[i]) - 1 for i in test_ids]
    # the split file alternates train/test within a class: not a split by position
    assert src.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert src.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(p).name for p in src.test.paths[:2]] == [
        "Black_footed_Albatross_0002_100002.jpg",
        "Black_footed_Albatross_0004_100004.jpg",
    ]
    assert all(Path(p).is_file() for p in src.train.paths + src.test.paths)
    assert src.train.image(0).shape[0] == 3 and src.train.image(0).dtype.is_floating_point is False


def test_cub_root_may_be_the_data_set_directory_itself(tmp_path):
    write_cub(tmp_path, size=32)
    direct = cub200(str(tmp_path / "CUB_200_2011"))
    assert (len(direct.classes), len(direct.train), len(direct.test)) == (3, 6, 3)
    assert direct.train.paths == cub200(str(tmp_path)).train.paths


def test_dogs_classes_are_the_sorted_image_dirs_and_lists_give_the_split(tmp_path):
    names = write_dogs(tmp_path, classes=4, train_per_class=3, test_per_class=2, size=40)
    src = stanford_dogs(str(tmp_path))
    assert src.name == "stanford_dogs"
    assert src.classes == names == sorted(os.listdir(tmp_path / "stanford_dogs" / "Images"))
    assert src.classes[:2] == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    assert (len(src.train), len(src.test)) == (12, 8)
    base = tmp_path / "stanford_dogs"
    for split, name in ((src.train, "train_list.mat"), (src.test, "test_list.mat")):
        mat = scipy.io.loadmat(base / name)
        files = [str(f[0][0]) for f in mat["file_list"]]
        assert split.paths == [str(base / "Images" / f) for f in files]
        assert split.labels.tolist() == [int(v) - 1 for v in mat["labels"][:, 0]]
        assert all(Path(p).is_file() for p in split.paths)
    assert src.train.labels.tolist() == [0, 1, 2, 3] * 3  # interleaved, as the real lists


def test_cars_match_torchvision_and_the_meta_names(tmp_path):
    import torchvision.datasets as tvd

    names = write_cars(tmp_path, classes=3, train_per_class=2, test_per_class=2, size=40)
    src = stanford_cars(str(tmp_path))
    assert src.name == "stanford_cars"
    assert src.classes == names
    assert names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                     "Ram C/V Cargo Van Minivan 2012"]  # fmt: skip
    assert (len(src.train), len(src.test)) == (6, 6)
    for split, which in ((src.train, "train"), (src.test, "test")):
        ref = tvd.StanfordCars(str(tmp_path), split=which)
        assert ref.classes == src.classes
        assert split.paths == [p for p, _ in ref._samples]
        assert split.labels.tolist() == [t for _, t in ref._samples]
    # train and test both number their files from 00001.jpg: told apart by directory
    assert Path(src.train.paths[0]).name == Path(src.test.paths[0]).name == "00001.jpg"
    assert Path(src.train.paths[0]).parent.name == "cars_train"
    assert Path(src.test.paths[0]).parent.name == "cars_test"


def test_aircraft_variants_with_spaces_and_slashes_official_trainval_test(tmp_path):
    import torchvision.datasets as tvd

    names = write_aircraft(tmp_path, classes=4, train_per_class=4, test_per_class=2, size=40)
    src = fgvc_aircraft(str(tmp_path))
    assert src.name == "fgvc_aircraft"
    assert src.classes == names == ["707-320", "Cessna 172", "F/A-18", "A300B4"]  # file order
    assert (len(src.train), len(src.test)) == (16, 8)
    for split, which in ((src.train, "trainval"), (src.test, "test")):
        ref = tvd.FGVCAircraft(str(tmp_path), split=which, annotation_level="variant")
        assert ref.classes == src.classes
        assert split.paths == ref._image_files
        assert split.labels.tolist() == ref._labels
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    trainval = (data / "images_variant_trainval.txt").read_text().splitlines()
    assert [Path(p).stem for p in src.train.paths] == [line.split(" ")[0] for line in trainval]
    assert "Cessna 172" in {line.split(" ", 1)[1] for line in trainval}


def test_building_twice_is_cached_and_a_changed_list_is_read_again(tmp_path):
    write_cub(tmp_path, size=32)
    first = cub200(str(tmp_path))
    assert cub200(str(tmp_path)) is first
    split = tmp_path / "CUB_200_2011" / "train_test_split.txt"
    split.write_text(split.read_text().replace(" 0\n", " 1\n"))  # every image to train
    again = cub200(str(tmp_path))
    assert again is not first
    assert (len(again.train), len(again.test)) == (9, 0)


# ------------------------------------------------------------------------------ missing files


@pytest.mark.parametrize(
    ("writer", "fn", "rel", "archive", "command"),
    [
        (write_cub, cub200, "CUB_200_2011/train_test_split.txt", "CUB_200_2011.tgz",
         "tar -xzf CUB_200_2011.tgz -C {root}"),
        (write_dogs, stanford_dogs, "stanford_dogs/train_list.mat", "lists.tar",
         "tar -xf lists.tar -C {root}/stanford_dogs"),
        (write_cars, stanford_cars, "stanford_cars/cars_test_annos_withlabels.mat",
         "cars_test_annos_withlabels.mat", "tar -xzf car_devkit.tgz -C {root}/stanford_cars"),
        (write_aircraft, fgvc_aircraft, "fgvc-aircraft-2013b/data/variants.txt",
         "fgvc-aircraft-2013b.tar.gz", "tar -xzf fgvc-aircraft-2013b.tar.gz -C {root}"),
    ],
)  # fmt: skip
def test_a_missing_list_file_names_it_the_archive_and_the_unpack_command(
    tmp_path, writer, fn, rel, archive, command
):
    writer(tmp_path, size=32)
    (tmp_path / rel).unlink()
    with pytest.raises(ConfigError) as e:
        fn(str(tmp_path))
    msg = one_line(e)
    assert f"file {tmp_path / rel} is missing" in msg
    assert f"searched {tmp_path / rel.split('/')[0]})" in msg
    assert archive in msg and command.format(root=tmp_path) in msg


def test_a_missing_data_set_directory_names_where_it_looked_and_where_to_get_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        cub200(str(tmp_path))
    msg = one_line(e)
    assert f"directory {tmp_path / 'CUB_200_2011'} not found" in msg
    assert "https://data.caltech.edu/records/65de6-vzs52" in msg and "CUB_200_2011.tgz" in msg
    with pytest.raises(ConfigError) as e:
        stanford_cars(str(tmp_path))
    msg = one_line(e)
    assert "car_devkit.tgz" in msg and "kaggle" in msg.lower()
    (tmp_path / "stanford_dogs").mkdir()
    with pytest.raises(ConfigError) as e:
        stanford_dogs(str(tmp_path))
    assert f"directory {tmp_path / 'stanford_dogs' / 'Images'} is missing" in one_line(e)
    with pytest.raises(ConfigError, match=r"set data.source.root"):
        fgvc_aircraft(None)


@pytest.mark.parametrize(
    ("writer", "fn", "images", "listed_in"),
    [
        (write_cub, cub200, "CUB_200_2011/images", "images.txt"),
        (write_dogs, stanford_dogs, "stanford_dogs/Images", "train_list.mat"),
        (write_cars, stanford_cars, "stanford_cars/cars_train", "devkit/cars_train_annos.mat"),
        (write_aircraft, fgvc_aircraft, "fgvc-aircraft-2013b/data/images",
         "data/images_variant_trainval.txt"),
    ],
)  # fmt: skip
def test_missing_images_name_the_first_and_the_count(tmp_path, writer, fn, images, listed_in):
    writer(tmp_path, size=32)
    src = fn(str(tmp_path), check_images=False)
    gone = sorted(src.train.paths)[:2]
    for p in gone:
        os.unlink(p)
    n = len(src.train) + len(src.test) if fn is cub200 else len(src.train)
    benchmarks.clear_cache()  # a parse is remembered for the process: read the lists again
    with pytest.raises(ConfigError) as e:
        fn(str(tmp_path), check_images=False)
    msg = one_line(e)
    first = next(p for p in (src.train.paths + src.test.paths) if p in gone)
    assert f"2 of {n} images listed in {listed_in} are missing, the first {first}" in msg
    assert str(tmp_path / images) in msg and "half unpacked" in msg


def test_the_kaggle_bundles_nested_directories_are_pointed_out(tmp_path):
    write_cars(tmp_path, size=32)
    train = tmp_path / "stanford_cars" / "cars_train"
    nested = train / "cars_train"
    nested.mkdir()
    for f in list(train.glob("*.jpg")):
        f.rename(nested / f.name)
    with pytest.raises(ConfigError) as e:
        stanford_cars(str(tmp_path))
    assert f"{nested} exists" in one_line(e) and f"move them up into {train}" in str(e.value)


# ------------------------------------------------------------------------------ bad files


def test_a_corrupt_jpeg_is_named_and_check_images_false_skips_the_decoding(tmp_path):
    write_dogs(tmp_path, size=64)
    src = stanford_dogs(str(tmp_path))
    bad = Path(src.test.paths[1])
    corrupt(bad)
    with pytest.raises(ConfigError) as e:
        stanford_dogs(str(tmp_path))
    msg = one_line(e)
    assert f"stanford_dogs: 1 of 9 image files cannot be decoded: {bad} (" in msg
    assert "images.tar" in msg
    skipped = stanford_dogs(str(tmp_path), check_images=False)
    assert (len(skipped.train), len(skipped.test)) == (6, 3)


def test_dogs_lists_must_agree_with_the_image_directories(tmp_path):
    write_dogs(tmp_path, size=32)
    (tmp_path / "stanford_dogs" / "Images" / "n00000000-stray").mkdir()  # sorts first
    with pytest.raises(ConfigError) as e:
        stanford_dogs(str(tmp_path))
    msg = one_line(e)
    assert "gives 'n02085620-Chihuahua/n02085620_1000.jpg' label 1" in msg
    assert "class 2 of the 4 sorted Images/ sub-directories" in msg


def test_a_damaged_mat_file_is_named(tmp_path):
    write_cars(tmp_path, size=32)
    meta = tmp_path / "stanford_cars" / "devkit" / "cars_meta.mat"
    meta.write_bytes(b"not a mat file at all")
    with pytest.raises(ConfigError) as e:
        stanford_cars(str(tmp_path))
    assert f"{meta} cannot be read as a MATLAB file" in one_line(e)


def test_test_annotations_without_labels_are_refused(tmp_path):
    write_cars(tmp_path, size=32)
    base = tmp_path / "stanford_cars"
    (base / "devkit" / "cars_test_annos.mat").replace(base / "cars_test_annos_withlabels.mat")
    with pytest.raises(ConfigError) as e:
        stanford_cars(str(tmp_path))
    assert "no 'fname' and 'class' fields" in one_line(e)


# ------------------------------------------------------------------------------ combined


def write_all(data: Path) -> dict[str, list[str]]:
    return {
        "cub200": write_cub(data, size=32),
        "stanford_dogs": write_dogs(data, size=32),
        "stanford_cars": write_cars(data, size=32),
        "fgvc_aircraft": write_aircraft(data, size=32),
    }


def test_combined_configs_join_the_sets_unprefixed(tmp_path):
    names = write_all(tmp_path / "data")
    expected = {
        "cub_dogs": ["cub200", "stanford_dogs"],
        "cars_aircraft": ["stanford_cars", "fgvc_aircraft"],
        "fine_grained4": ["cub200", "stanford_dogs", "stanford_cars", "fgvc_aircraft"],
    }
    for config, parts in expected.items():
        cfg = make_cfg("data_check", [f"data={config}"], tmp_path)
        assert cfg.data.source.prefix is False
        src = instantiate(cfg.data.source)()
        assert src.name == "+".join(parts)
        assert src.classes == [c for p in parts for c in names[p]]
        assert (len(src.classes), len(src.train), len(src.test)) == (
            3 * len(parts), 6 * len(parts), 3 * len(parts)
        )  # fmt: skip
        per_part = {"cub200": [0, 0, 1, 1, 2, 2]}  # CUB's ids run class by class
        assert src.train.labels.tolist() == [
            3 * k + t for k, p in enumerate(parts) for t in per_part.get(p, [0, 1, 2] * 2)
        ]
        assert src.test.labels.tolist() == list(range(3 * len(parts)))
    # a teacher trained on data=cub200 alone names its classes as the combined set does
    alone = instantiate(make_cfg("data_check", ["data=cub200"], tmp_path).data.source)()
    both = instantiate(make_cfg("data_check", ["data=cub_dogs"], tmp_path).data.source)()
    assert alone.classes == both.classes[:3] == names["cub200"]
    assert resolve_classes(alone.classes, both.classes, "birds") == tuple(names["cub200"])
    assert resolve_classes(["n02085620-Chihuahua"], both.classes, "dogs") == (
        "n02085620-Chihuahua",
    )
    idx = both.classes.index("n02085620-Chihuahua")
    assert idx == 3
    assert both.train.paths[6:] == stanford_dogs(str(tmp_path / "data")).train.paths
    assert (both.train.labels[6:] - 3).tolist() == stanford_dogs(
        str(tmp_path / "data")
    ).train.labels.tolist()


def test_every_single_set_config_builds_with_the_image_folder_defaults(tmp_path):
    names = write_all(tmp_path / "data")
    for config, classes in names.items():
        cfg = make_cfg("data_check", [f"data={config}"], tmp_path)
        assert cfg.data.source.root == str(tmp_path / "data")
        assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers) == (224, 64, 8)
        assert cfg.data.augment is True and cfg.data.unlabeled == "union"
        assert instantiate(cfg.data.source)().classes == classes


def test_check_data_reports_each_part_and_the_first_bad_file(tmp_path):
    write_cub(tmp_path / "data", size=32)
    write_dogs(tmp_path / "data", size=32)
    bad = tmp_path / "data" / "stanford_dogs" / "Images" / "n02085782-Japanese_spaniel"
    bad = sorted(bad.iterdir())[0]
    corrupt(bad)
    lines: list[str] = []
    problems = check_data(make_cfg("data_check", ["data=cub_dogs"], tmp_path), lines.append)
    assert lines[0].startswith("cub200: 3 classes, 6 train + 3 test images in ")
    assert lines[1] == "  no bad files"
    assert lines[2].startswith("stanford_dogs: 3 classes, 6 train + 3 test images in ")
    assert lines[3].startswith(
        f"  bad files: stanford_dogs: 1 of 9 image files cannot be decoded: {bad}"
    )
    assert (
        lines[4] == "total cub200+stanford_dogs (prefix=false): 6 classes, 12 train + 6 test images"
    )
    assert len(problems) == 1 and str(bad) in problems[0]


# ------------------------------------------------------------------------------ the CLI


def run_check(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "amalgam.data.check", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_counts_and_exits_0_then_2_on_a_missing_file(tmp_path):
    data = tmp_path / "data"
    write_cub(data, classes=3, train_per_class=2, test_per_class=1, size=32)
    write_dogs(data, classes=4, train_per_class=2, test_per_class=2, size=32)
    run = tmp_path / "cwd"
    run.mkdir()
    p = run_check(run, "data=cub_dogs", f"paths.data_dir={data}")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out == [
        f"cub200: 3 classes, 6 train + 3 test images in {data / 'CUB_200_2011' / 'images'}",
        "  no bad files",
        f"stanford_dogs: 4 classes, 8 train + 8 test images in {data / 'stanford_dogs' / 'Images'}",
        "  no bad files",
        "total cub200+stanford_dogs (prefix=false): 7 classes, 14 train + 11 test images",
        "no bad files",
    ]
    assert os.listdir(run) == []  # no run dir, no .hydra/, no log file

    (data / "stanford_dogs" / "test_list.mat").unlink()
    p = run_check(run, "data=cub_dogs", f"paths.data_dir={data}")
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr
    assert f"file {data / 'stanford_dogs' / 'test_list.mat'} is missing" in errors[0]
    assert (
        "lists.tar" in errors[0]
        and "http://vision.stanford.edu/aditya86/ImageNetDogs/" in errors[0]
    )
    assert p.stdout.splitlines()[:2] == [
        f"cub200: 3 classes, 6 train + 3 test images in {data / 'CUB_200_2011' / 'images'}",
        "  no bad files",
    ]
    assert os.listdir(run) == []
