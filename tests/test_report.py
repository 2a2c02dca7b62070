"""The sweep report as data: the per-job and per-variant DataFrames, and the files drawn from them.

A hand-made sweep dir of results.json files (no training): the frames' values are checked
against the numbers written, the grouped mean and std against `statistics`, and report.md,
report.csv, jobs.csv and report.png against the frames.
"""

import csv
import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from amalgam.report import bar_figure, jobs_frame, variants_frame, write_sweep_report
from amalgam.report.analysis import ordered, summarize
from amalgam.report.sweep import (
    LABEL_WIDTH,
    ensembles_differ,
    sweep_title,
    table_rows,
    variant_labels,
    wrap_label,
    y_floor,
)

COMMON = "experiment=tiny_long_experiment_name"  # an override every variant shares
# variant -> {seed: (task a student, task b student, joint student, joint ensemble)}
SWEEP = {
    f"method=kd,{COMMON}": {0: (0.80, 0.70, 0.61, 0.66), 1: (0.82, 0.74, 0.65, 0.66)},
    f"method=cfl,{COMMON}": {
        0: (0.85, 0.78, 0.70, 0.66),
        1: (0.87, 0.76, 0.72, 0.66),
        2: (0.90, 0.71, 0.69, 0.66),
    },
    f"method=cfl_no_mmd,{COMMON}": {7: (0.83, 0.73, 0.58, 0.66)},
}
TEACHERS = {"a": 0.95, "b": 0.90}


def results(variant: str, seed: int, accs: tuple[float, ...]) -> dict:
    """A results.json as a finished job writes it (the fields the frames read, and a few
    a researcher filters by)."""
    a, b, joint, ensemble = accs
    return {
        "variant": variant,
        "method": variant.split(",")[0].removeprefix("method="),
        "seed": seed,
        "targets": "Concat",
        "uses_labels": False,
        "student_arch": "tiny_cnn",
        "epochs": 3,
        "tasks": {
            "a": {"student_acc": a, "teacher_acc": TEACHERS["a"], "classes": ["x", "y"]},
            "b": {"student_acc": b, "teacher_acc": TEACHERS["b"], "classes": ["z"]},
        },
        "joint": {
            "student_acc": joint,
            "teacher_ensemble_acc": ensemble,
            "n_test": 96,
            "target_rule": "Concat",
        },
        "val": {"joint_acc": joint - 0.01, "task_mean_acc": (a + b) / 2 - 0.02, "loss": 1.5},
        "provenance": {"git_commit": "c" * 40, "git_dirty": False},
        "teacher_hashes": {"a": "1", "b": "2"},
    }


@pytest.fixture
def sweep(tmp_path) -> Path:
    """logs/<task>/multiruns/<time>: one job dir per (variant, seed), as Hydra lays it out."""
    root = tmp_path / "logs" / "tiny" / "multiruns" / "2026-01-02_03-04-05"
    i = 0
    for variant, seeds in SWEEP.items():
        for seed, accs in seeds.items():
            d = root / f"{i}_{variant}"
            (d / ".hydra").mkdir(parents=True)
            overrides = [*variant.split(","), f"seed={seed}"]
            (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
            (d / "results.json").write_text(json.dumps(results(variant, seed, accs)))
            i += 1
    return root


def test_jobs_frame_has_one_row_per_job_with_accuracies_in_percent(sweep):
    jobs = jobs_frame(sweep)
    assert len(jobs) == 6
    assert list(jobs.columns[:12]) == [
        "job",
        "variant",
        "method",
        "seed",
        "targets",
        "uses_labels",
        "a_student",
        "a_teacher",
        "b_student",
        "b_teacher",
        "joint_student",
        "joint_teacher",
    ]
    assert str(jobs["seed"].dtype) == "Int64"
    # sorted by variant, then seed
    assert list(zip(jobs["method"], jobs["seed"], strict=True)) == [
        ("cfl", 0),
        ("cfl", 1),
        ("cfl", 2),
        ("cfl_no_mmd", 7),
        ("kd", 0),
        ("kd", 1),
    ]
    row = jobs.iloc[4]  # method=kd, seed 0
    assert row["job"] == f"0_method=kd,{COMMON}"
    assert row["variant"] == f"method=kd,{COMMON}"
    assert row["targets"] == "Concat" and not row["uses_labels"]
    assert row[["a_student", "b_student", "joint_student"]].tolist() == pytest.approx(
        [80.0, 70.0, 61.0]
    )
    assert row["a_teacher"] == pytest.approx(95.0) and row["joint_teacher"] == pytest.approx(66.0)
    # the fields a researcher filters by
    assert row["student_arch"] == "tiny_cnn" and row["epochs"] == 3 and row["n_test"] == 96
    assert row["val_joint_acc"] == pytest.approx(0.60) and row["git_commit"] == "c" * 40
    assert row["overrides"] == f"method=kd {COMMON} seed=0"
    # a list of results dicts gives the same numbers (no job dir: job is None)
    again = jobs_frame([results(v, s, a) for v, seeds in SWEEP.items() for s, a in seeds.items()])
    assert again["job"].isna().all() and "overrides" not in again
    cols = ["variant", "seed", "a_student", "joint_student", "joint_teacher"]
    pd.testing.assert_frame_equal(again[cols], jobs[cols])


def test_variants_frame_gives_mean_std_n_and_the_seeds(sweep):
    variants = variants_frame(jobs_frame(sweep)).set_index("variant")
    assert list(variants.index) == sorted(SWEEP)
    for variant, seeds in SWEEP.items():
        row = variants.loc[variant]
        assert row["n"] == len(seeds) and row["seeds"] == sorted(seeds)
        assert row["targets"] == ["Concat"] and not row["uses_labels"]
        for i, col in enumerate(["a_student", "b_student", "joint_student", "joint_teacher"]):
            xs = [100 * accs[i] for accs in seeds.values()]
            assert row[f"{col}_mean"] == pytest.approx(statistics.fmean(xs))
            if len(xs) > 1:
                assert row[f"{col}_std"] == pytest.approx(statistics.stdev(xs))
            else:  # one job: no spread measured
                assert math.isnan(row[f"{col}_std"])
        assert row["a_teacher_mean"] == pytest.approx(95.0)
    # the analysis order: known methods first (kd before the cfl ablations and cfl)
    assert [v.split(",")[0] for v in summarize(jobs_frame(sweep))["variant"]] == [
        "method=kd",
        "method=cfl_no_mmd",
        "method=cfl",
    ]
    assert ordered(jobs_frame(sweep))["seed"].tolist()[:2] == [0, 1]


def test_report_files_are_drawn_from_the_frames(sweep):
    paths = write_sweep_report(sweep)
    assert set(paths) == {"md", "csv", "jobs", "png"}
    rows = {r["variant"]: r for r in csv.DictReader(paths["csv"].read_text().splitlines())}
    cfl = rows[f"method=cfl,{COMMON}"]
    assert list(cfl)[:7] == [
        "variant",
        "method",
        "n",
        "seeds",
        "uses_labels",
        "a_student_mean",
        "a_student_std",
    ]
    assert cfl["n"] == "3" and cfl["seeds"] == "0 1 2" and cfl["uses_labels"] == "False"
    assert cfl["method"] == "cfl" and rows[f"method=kd,{COMMON}"]["method"] == "kd"
    accs = [100 * a[2] for a in SWEEP[f"method=cfl,{COMMON}"].values()]
    assert float(cfl["joint_student_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-4)
    assert float(cfl["joint_student_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-4)
    assert rows[f"method=cfl_no_mmd,{COMMON}"]["joint_student_std"] == ""  # one seed: no std
    jobs = list(csv.DictReader(paths["jobs"].read_text().splitlines()))
    assert len(jobs) == 6 and {j["seed"] for j in jobs} == {"0", "1", "2", "7"}

    md = paths["md"].read_text()
    assert f"| method=cfl,{COMMON} | 3 | 0, 1, 2 |" in md
    assert "| variant | n | seeds | a student | b student | joint student |" in md
    # the accuracy table's row (the margins table below has one too)
    single = next(line for line in md.splitlines() if line.startswith("| method=cfl_no_mmd"))
    assert single == f"| method=cfl_no_mmd,{COMMON} | 1 | 7 | 83.00 | 73.00 | 58.00 |"
    kd = next(line for line in md.splitlines() if line.startswith("| method=kd"))
    assert "81.00 ± 1.41" in kd  # 80 and 82: stdev sqrt(2)
    assert "Code: cccccccccccc (6 jobs)" in md and "WARNING" not in md
    assert paths["png"].stat().st_size > 1000


def test_table_lists_one_seed_without_spread_and_the_teachers_first(sweep):
    header, body = table_rows(variants_frame(jobs_frame(sweep)))
    assert header[:3] == ["variant", "n", "seeds"] and header[-1] == "joint student"
    teachers = ["teachers (ensemble for joint)", "-", "-", "95.00 ± 0.00", "90.00 ± 0.00"]
    assert body[0] == [*teachers, "66.00 ± 0.00"]
    assert all("±" not in c for c in body[2][3:])  # cfl_no_mmd: one seed
    assert all("±" in c for c in body[1][3:])


def test_one_ensemble_measured_once_or_over_seeds_is_the_same_ensemble():
    frame = pd.DataFrame(
        {"joint_teacher_mean": [66.0, 66.0], "joint_teacher_std": [float("nan"), 0.0]}
    )
    assert not ensembles_differ(frame)
    frame.loc[1, "joint_teacher_mean"] = 70.0
    assert ensembles_differ(frame)


def test_bar_figure_titles_the_sweep_and_starts_below_the_lowest_bar(sweep):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.container import BarContainer

    variants = variants_frame(jobs_frame(sweep))
    title = sweep_title(sweep)
    assert title == "tiny, sweep 2026-01-02_03-04-05"
    fig = bar_figure(variants, title)
    ax = fig.axes[0]
    assert ax.get_title() == title
    # lowest: cfl_no_mmd's joint bar, 58 (one seed: no error bar below it); 53 -> 50
    assert ax.get_ylim() == (50.0, 100.0)
    # error bars for the variants of several seeds only
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    with_errors = [c.get_label() for c in bars if c.errorbar is not None]
    assert "cfl_no_mmd" not in " ".join(with_errors) and len(with_errors) == 3
    # labels without the shared override, which the legend's title names once
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["teachers", "method=cfl", "method=cfl_no_mmd", "method=kd"]
    assert COMMON in legend.get_title().get_text().replace("\n", "")
    # the legend sits outside the axes: it covers no bar
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_y_floor_is_a_multiple_of_5_below_the_lowest_value_never_below_0():
    assert y_floor([77.2, 90.0]) == 70.0
    assert y_floor([75.0]) == 70.0
    assert y_floor([3.0, float("nan")]) == 0.0
    assert y_floor([]) == 0.0


def test_long_variant_labels_are_wrapped_after_their_commas():
    variants = [
        "method=cfl,optim.lr=0.001,student=tf_efficientnet_lite0_imagenet_pretrained",
        "method=kd,optim.lr=0.001,student=tf_efficientnet_lite0_imagenet_pretrained",
    ]
    labels, common = variant_labels(variants)
    assert common == "optim.lr=0.001,student=tf_efficientnet_lite0_imagenet_pretrained"
    assert labels == ["method=cfl", "method=kd"]
    wrapped = wrap_label(variants[0])
    lines = wrapped.split("\n")
    assert all(len(line) <= LABEL_WIDTH for line in lines)
    assert lines[0] == "method=cfl,optim.lr=0.001,"
    assert wrapped.replace("\n", "") == variants[0]
    # one variant: nothing is shared with another, the label stays whole
    assert variant_labels(["method=cfl"]) == (["method=cfl"], None)


def test_margins_to_the_teachers_are_per_job_differences_averaged(sweep):
    variants = variants_frame(jobs_frame(sweep)).set_index("variant")
    cfl = SWEEP[f"method=cfl,{COMMON}"].values()
    a = [100 * (x[0] - TEACHERS["a"]) for x in cfl]
    b = [100 * (x[1] - TEACHERS["b"]) for x in cfl]
    joint = [100 * (x[2] - x[3]) for x in cfl]
    mean_ab = [(u + v) / 2 for u, v in zip(a, b, strict=True)]
    val = [100 * ((x[0] + x[1]) / 2 - 0.02) for x in cfl]
    row = variants.loc[f"method=cfl,{COMMON}"]
    for col, want in [
        ("a_margin", a),
        ("b_margin", b),
        ("task_mean_margin", mean_ab),
        ("joint_margin", joint),
        ("val_task_mean", val),
    ]:
        assert math.isclose(row[f"{col}_mean"], statistics.mean(want), abs_tol=1e-9), col
        assert math.isclose(row[f"{col}_std"], statistics.stdev(want), abs_tol=1e-9), col
    assert math.isnan(variants.loc[f"method=cfl_no_mmd,{COMMON}", "a_margin_std"])
    md = write_sweep_report(sweep)["md"].read_text()
    margins = md.split("Margins to the teachers")[1]
    line = next(x for x in margins.splitlines() if x.startswith(f"| method=cfl,{COMMON} |"))
    assert f"| +{statistics.mean(joint):.2f} ± {statistics.stdev(joint):.2f} |" in line
    assert f"| {statistics.mean(a):.2f} ± {statistics.stdev(a):.2f} |" in line  # negative


def _run_results():
    """A results dict with every field a finished run writes."""
    return {
        "tasks": {
            "a": {"classes": ["x", "y"], "teacher_acc": 0.9, "student_acc": 0.8, "n_test": 10},
            "b": {"classes": ["z"], "teacher_acc": 1.0, "student_acc": 0.7, "n_test": 5},
        },
        "joint": {
            "student_acc": 0.75,
            "teacher_ensemble_acc": 0.8,
            "n_test": 15,
            "target_rule": "DensityRatio",
            "teacher_ensemble_concat_acc": 0.6,
        },
        "task_confusion": {"tasks": ["a", "b"], "student": [[9, 1], [0, 5]]},
        "params": {"student": 10, "teachers": {"a": 20}},
        "throughput_img_s": {"student": 100.0, "teachers": {}},
        "method": "cfl",
        "variant": "method=cfl",
        "uses_labels": False,
        "targets": "DensityRatio",
        "seed": 0,
        "student_arch": "resnet10t",
        "teacher_archs": {"a": "resnet18", "b": "convnext_atto"},
        "teacher_hashes": {"a": "ab" * 32, "b": "cd" * 32},
        "epochs": 4,
        "global_step": 100,
        "world_size": 1,
        "resumed_from": None,
        "train_seconds": 12.5,
        "checkpoint": "run/checkpoints/final.ckpt",
        "val": {"acc_a": 0.8, "task_mean_acc": 0.8},
        "provenance": {"commit": "abc"},
        "a_field_of_the_future": [1, 2],
    }


def test_results_schema_round_trips_and_names_the_bad_field(tmp_path):
    from amalgam.results import Results, ResultsError, problem, read_results, write_results

    res = _run_results()
    rec = Results.from_dict(res)
    assert rec.tasks["a"].student_acc == 0.8 and rec.tasks["b"].classes == ["z"]
    assert rec.joint.target_rule == "DensityRatio" and rec.seed == 0 and rec.epochs == 4
    assert rec.extra == {"a_field_of_the_future": [1, 2]}
    back = rec.as_dict()
    assert {k: v for k, v in res.items() if v is not None} == back  # None fields left out
    path = write_results(res, tmp_path)
    assert json.loads(path.read_text()) == res and read_results(path) == (res, None)
    bad = [
        ({"seed": "0"}, "'seed' is not an integer"),
        ({"epochs": 4.0}, "'epochs' is not an integer"),
        ({"uses_labels": "no"}, "'uses_labels' is not true or false"),
        ({"teacher_hashes": {"a": 7}}, "'teacher_hashes.a' is not a string"),
        ({"provenance": []}, "'provenance' is not an object"),
        ({"val": {"acc_a": "high"}}, "'val.acc_a' is not a number"),
        ({"joint": {"student_acc": 0.5}}, "'joint' lacks a numeric"),
        ({"joint": {**res["joint"], "n_test": "15"}}, "'joint.n_test' is not an integer"),
        ({"tasks": {"a": {"student_acc": 1.5, "teacher_acc": 0.9}}}, "task 'a' lacks"),
        ({"tasks": {"a": {**res["tasks"]["a"], "classes": "xy"}}}, "'tasks.a.classes' is not"),
        ({"tasks": {}}, "no 'tasks' entry"),
    ]
    for change, why in bad:
        assert why in (problem(res | change) or ""), change
        with pytest.raises(ResultsError, match=why.replace("[", r"\[")):
            write_results(res | change, tmp_path / "bad")
        assert not (tmp_path / "bad" / "results.json").exists()
    assert problem([1]) == "not a JSON object"
    (tmp_path / "results.json").write_text('{"tasks": ')
    r, why = read_results(tmp_path / "results.json")
    assert r is None and why.startswith("unreadable (JSONDecodeError")
