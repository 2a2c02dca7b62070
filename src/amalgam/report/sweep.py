"""Aggregate a sweep: per variant (overrides minus seed), mean and std over seeds; and list the
jobs that failed or did not finish.

The sweep's numbers are pandas DataFrames, so a researcher filters, groups and exports them
with pandas instead of re-parsing results.json files by hand:

- `jobs_frame(sweep_dir)`: one row per finished job (job dir, variant, method, seed, targets,
  uses_labels, each task's `<task>_student` / `<task>_teacher` accuracy and `joint_student` /
  `joint_teacher` (the teachers' ensemble) in %, then what results.json carries to filter by:
  `student_arch`, `epochs`, `train_seconds`, `val_<metric>`, `git_commit`, `overrides`, ...).
  It also takes a list of results dicts (e.g. `collect(sweep_dir)`).
- `variants_frame(jobs)`: one row per variant: `n` (jobs), `seeds` (the sorted seed values),
  `uses_labels`, `<col>_mean` and `<col>_std` (sample std; NaN for a single job) of each
  accuracy column, `targets` (the rules used). report.csv is this frame; jobs.csv the former.
- `table_rows`, `bar_figure` and `markdown` draw report.md's table and report.png from the
  grouped frame; `write_sweep_report` writes them all.

A failed job records its error itself: `AggregateOnMultirunEnd.on_job_end` writes `failure.json`
into the job's dir, in the process that ran the job (the main process with the basic launcher,
a worker with joblib, a cluster job with submitit). A job dir with `.hydra/overrides.yaml` but
neither results.json nor failure.json was killed (or still runs). Every file read back
(results.json, overrides.yaml, failure.json) is untrusted: JSON or `yaml.safe_load` only, and a
malformed one is listed as such in the report.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import textwrap
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from amalgam.report.run import atomic_path, atomic_write, md_table
from amalgam.results import read_results

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("amalgam")
SKIP_DIRS = {"eval", "wandb", ".submitit", "checkpoints"}
FAILURE = "failure.json"  # a failed job's record, in its dir
OVERRIDES = Path(".hydra") / "overrides.yaml"
MAX_LINE = 300  # characters of an error's first line in the report
MAX_TRACEBACK = 20_000  # characters of the traceback kept in a failure record
UNFINISHED = "no results.json and no failure record: killed, or still running"
WHO = ("student", "teacher")  # the accuracy columns of each task and of joint
LABEL_WIDTH = 30  # characters per line of a variant's label in the plot's legend
# results.json entries that make the frame's leading columns (the rest: scalars as they are)
FRAME_KEYS = {"variant", "method", "seed", "targets", "uses_labels", "tasks", "joint"}


def _below(sweep_dir: Path, name: str) -> list[Path]:
    """Files called `name` below `sweep_dir`, outside re-evaluations, logs and checkpoints."""
    return sorted(
        p for p in sweep_dir.rglob(name) if not SKIP_DIRS & set(p.relative_to(sweep_dir).parts[:-1])
    )


def first_line(text: str) -> str:
    """The first non-empty line of `text`, at most MAX_LINE characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def read_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None), or (None, why it could not be read)."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError, RecursionError) as e:
        return None, f"unreadable ({type(e).__name__}: {first_line(str(e))})"


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job's results.json below `sweep_dir` (re-evaluations under eval/ are skipped, and
    so are unreadable or malformed files: `job_problems` lists them)."""
    out = []
    for p in _below(Path(sweep_dir), "results.json"):
        r, why = read_results(p)
        if r is None:
            log.warning("%s: %s; left out of the sweep table", p, why)
            continue
        r["_path"] = str(p)
        out.append(r)
    return out


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every job's dir below `sweep_dir`: where Hydra wrote `.hydra/overrides.yaml`, or a job
    wrote results.json or its failure record."""
    sweep_dir = Path(sweep_dir)
    dirs = {p.parent.parent for p in _below(sweep_dir, OVERRIDES.name) if p.parent.name == ".hydra"}
    dirs |= {p.parent for name in ("results.json", FAILURE) for p in _below(sweep_dir, name)}
    return sorted(dirs)


def load_overrides(job_dir: Path) -> tuple[list[str] | None, str | None]:
    """(the job's overrides, None) from Hydra's `.hydra/overrides.yaml`, or (None, why not)."""
    path = job_dir / OVERRIDES
    if not path.is_file():
        return None, "(no .hydra/overrides.yaml)"
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"(malformed .hydra/overrides.yaml: {type(e).__name__})"
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return None, "(malformed .hydra/overrides.yaml: not a list of strings)"
    return overrides, None


def read_overrides(job_dir: Path) -> str:
    """The job's overrides on one line, or why there are none (for the problems table)."""
    overrides, why = load_overrides(job_dir)
    return why if overrides is None else " ".join(overrides)


def read_failure(job_dir: Path) -> str:
    """The first line of a failed job's error, from its failure record."""
    rec, why = read_json(job_dir / FAILURE)
    if why:
        return f"(failure record {why})"
    if not isinstance(rec, dict) or not isinstance(rec.get("error"), str):
        return "(malformed failure record: no 'error' text)"
    return first_line(rec["error"])


def job_problem(job_dir: Path) -> tuple[str, str] | None:
    """(status, error) of a job that failed or did not finish; None for a finished job."""
    if (job_dir / FAILURE).exists():
        return "failed", read_failure(job_dir)
    results = job_dir / "results.json"
    if not results.exists():
        return "unfinished", UNFINISHED
    _, why = read_results(results)
    return ("malformed", f"results.json: {why}") if why else None


def job_problems(sweep_dir: str | Path) -> tuple[int, list[dict[str, str]]]:
    """The number of jobs below `sweep_dir`, and one row per job that failed or did not finish:
    job (its dir, relative to `sweep_dir`), status, overrides, error."""
    sweep_dir = Path(sweep_dir)
    dirs = job_dirs(sweep_dir)
    rows = []
    for d in dirs:
        problem = job_problem(d)
        if problem:
            status, error = problem
            job = str(d.relative_to(sweep_dir))
            rows.append(
                {"job": job, "status": status, "overrides": read_overrides(d), "error": error}
            )
    return len(dirs), rows


# ----------------------------------------------------------------------------- the frames


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | bool | int | float)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def job_row(r: Mapping[str, Any], sweep_dir: Path | None = None) -> dict[str, Any]:
    """One job's row of `jobs_frame`: the leading columns, the accuracies in %, then the
    results' other scalar entries (a researcher filters by them: arch, epochs, commit, ...)."""
    job_dir = Path(r["_path"]).parent if r.get("_path") else None
    job = None
    if job_dir is not None:
        job = str(job_dir.relative_to(sweep_dir) if sweep_dir else job_dir)
    joint = r["joint"]
    row: dict[str, Any] = {
        "job": job,
        "variant": str(r.get("variant") or r.get("method", "?")),
        "method": r.get("method"),
        "seed": r.get("seed"),
        "targets": str(r.get("targets") or joint.get("target_rule") or "Concat"),
        "uses_labels": bool(r.get("uses_labels")),
    }
    for task, t in r["tasks"].items():
        row |= {f"{task}_{who}": 100 * t[f"{who}_acc"] for who in WHO}
    row["joint_student"] = 100 * joint["student_acc"]
    row["joint_teacher"] = 100 * joint["teacher_ensemble_acc"]  # the teachers' ensemble
    extras: dict[str, Any] = {k: v for k, v in r.items() if k not in FRAME_KEYS and _scalar(v)}
    if _number(joint.get("n_test")):
        extras["n_test"] = joint["n_test"]
    val = r.get("val") if isinstance(r.get("val"), dict) else {}
    extras |= {f"val_{k}": v for k, v in val.items() if _number(v)}
    params = r.get("params") if isinstance(r.get("params"), dict) else {}
    for key, name in (("student", "student_params"), ("teachers_total", "teachers_params")):
        if _number(params.get(key)):
            extras[name] = params[key]
    prov = r.get("provenance") or {}
    extras |= {k: prov.get(k) for k in ("git_commit", "git_dirty")}
    if job_dir is not None:
        overrides, _ = load_overrides(job_dir)
        extras["overrides"] = None if overrides is None else " ".join(overrides)
    for k, v in extras.items():  # a results entry never hides an accuracy column
        if not k.startswith("_"):
            row.setdefault(k, v)
    return row


def jobs_frame(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per finished job of a sweep dir (its results.json files, via `collect`), or of
    the given results dicts; sorted by variant, then seed. Accuracies are in %; `seed` is a
    nullable integer (a results.json may lack it); `job` is the job's dir (relative to the
    sweep dir when read from one) and None for a dict that names no file."""
    if isinstance(source, str | os.PathLike):
        return _jobs_frame(collect(source), Path(source))
    return _jobs_frame(list(source), None)


def _jobs_frame(results: Sequence[Mapping[str, Any]], sweep_dir: Path | None) -> pd.DataFrame:
    base = ["job", "variant", "method", "seed", "targets", "uses_labels"]
    if not results:
        return pd.DataFrame(columns=[*base, "joint_student", "joint_teacher"])
    frame = pd.DataFrame([job_row(r, sweep_dir) for r in results])
    frame["seed"] = frame["seed"].astype("Int64")
    frame = frame.sort_values(["variant", "seed", "job"], na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def tasks_of(frame: pd.DataFrame) -> list[str]:
    """The task names of a jobs or variants frame, in column order: every `<t>_student`
    column with its `<t>_teacher` (`_mean` suffix too in a variants frame), joint aside."""
    cols = list(frame.columns)
    suffix = "_mean" if "joint_student_mean" in cols else ""
    tasks = []
    for c in cols:
        end = f"_student{suffix}"
        task = c[: -len(end)]
        if c.endswith(end) and task != "joint" and f"{task}_teacher{suffix}" in cols:
            tasks.append(task)
    return tasks


def margin_columns(tasks: Sequence[str]) -> list[str]:
    """The margin columns `with_margins` adds, in order."""
    return [*(f"{t}_margin" for t in tasks), "task_mean_margin", "joint_margin", "val_task_mean"]


def with_margins(jobs: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """`jobs` with each job's margins to the teachers, in points: `<task>_margin` = student -
    teacher on that task, `task_mean_margin` their mean, `joint_margin` = the student's joint
    accuracy - the teachers' ensemble's; and `val_task_mean` (the validation split's task-mean
    accuracy in %, what a recipe is chosen on) where the jobs logged it."""
    out = jobs.copy()
    if out.empty or not tasks:
        return out
    for t in tasks:
        out[f"{t}_margin"] = out[f"{t}_student"] - out[f"{t}_teacher"]
    out["task_mean_margin"] = out[[f"{t}_margin" for t in tasks]].mean(axis=1)
    out["joint_margin"] = out["joint_student"] - out["joint_teacher"]
    if "val_task_mean_acc" in out.columns:
        out["val_task_mean"] = 100 * pd.to_numeric(out["val_task_mean_acc"], errors="coerce")
    return out


def _seeds(s: pd.Series) -> list[int]:
    return sorted(int(x) for x in s.dropna())


def variants_frame(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant of a `jobs_frame`, sorted by variant: its method(s), n (jobs), seeds
    (sorted seed values; a job without a seed counts in n only), uses_labels (any job), then
    mean and std over the variant's jobs of each accuracy (`<task>_student_mean`, `..._std`,
    teacher, joint), and the target rules used. The std is the sample std: NaN for a single job (no
    spread measured), which report.md shows as the mean alone."""
    tasks = tasks_of(jobs)
    metrics = [f"{c}_{who}" for c in [*tasks, "joint"] for who in WHO]
    jobs = with_margins(jobs, tasks)
    margins = [c for c in margin_columns(tasks) if c in jobs.columns]
    metrics += margins
    stats_cols = [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    columns = ["variant", "method", "n", "seeds", "uses_labels", *stats_cols, "targets"]
    if jobs.empty:
        return pd.DataFrame(columns=columns)
    groups = jobs.groupby("variant", sort=True)
    stats = groups[metrics].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    out = pd.DataFrame(
        {
            "n": groups.size(),
            "seeds": groups["seed"].agg(_seeds),
            "uses_labels": groups["uses_labels"].any().astype(bool),
        }
    ).join(stats)
    out["targets"] = groups["targets"].agg(lambda s: sorted({str(t) for t in s}))
    out["method"] = groups["method"].agg(lambda s: ", ".join(sorted({str(m) for m in s})))
    return out.reset_index()[columns]


# ----------------------------------------------------------------------------- table and plot


def fmt(mean: float, std: float, n: int) -> str:
    """`mean ± std`, or the mean alone when one job gives no spread (no misleading ± 0.00)."""
    if mean != mean:
        return "-"
    if n < 2 or std != std:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def cell(row: Mapping[str, Any], col: str, n: int | None = None) -> str:
    """The formatted `<col>_mean ± <col>_std` of a variants-frame row."""
    return fmt(row[f"{col}_mean"], row[f"{col}_std"], int(row["n"] if n is None else n))


def seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) or "-"


def ensembles_differ(variants: pd.DataFrame) -> bool:
    """Whether the variants' teacher ensembles differ in joint accuracy (a sweep over
    `targets=`: each rule makes its own ensemble), so no one teachers' joint figure fits all.
    Compared as report.md prints them, a missing std (one job) as 0."""
    keys = {
        (f"{m:.2f}", f"{0.0 if s != s else s:.2f}")
        for m, s in zip(variants["joint_teacher_mean"], variants["joint_teacher_std"], strict=True)
    }
    return len(keys) > 1


def sweep_title(sweep_dir: str | Path) -> str:
    """'<task>, sweep <time>' for Hydra's `logs/<task>/multiruns/<time>`, else 'sweep <dir>'."""
    p = Path(sweep_dir)
    name = p.name or p.resolve().name
    if p.parent.name in ("multiruns", "multirun") and p.parent.parent.name:
        return f"{p.parent.parent.name}, sweep {name}"
    return f"sweep {name}"


def wrap_label(label: str, width: int = LABEL_WIDTH) -> str:
    """`label` on lines of at most `width` characters, broken after the commas between
    overrides (an override longer than a line is cut where it must)."""
    lines: list[str] = []
    for item in label.split(","):
        pieces = textwrap.wrap(item, width, break_on_hyphens=False) or [""]
        if lines and len(lines[-1]) + 1 + len(pieces[0]) <= width:
            lines[-1] += "," + pieces.pop(0)
        elif lines:
            lines[-1] += ","
        lines += pieces
    return "\n".join(lines)


def variant_labels(
    variants: Sequence[str], width: int = LABEL_WIDTH
) -> tuple[list[str], str | None]:
    """Legend labels of the variants without the overrides all of them share (with several
    variants), wrapped at `width`; and those shared overrides (None: none), which the legend
    names once in its title instead of in every label."""
    parts = [v.split(",") for v in variants]
    common = [p for p in parts[0] if all(p in q for q in parts[1:])] if len(parts) > 1 else []
    labels = []
    for v, items in zip(variants, parts, strict=True):
        rest = [x for x in items if x not in common]
        labels.append(wrap_label(",".join(rest) if rest else v, width))
    return labels, (",".join(common) or None)


def y_floor(lows: Iterable[float]) -> float:
    """The y axis's floor: 5 points below the lowest value, down to a multiple of 5, not below
    0 (a floor at 0 squeezes close accuracies into the top of the plot)."""
    low = min((v for v in lows if v == v), default=0.0)
    return max(0.0, 5 * math.floor((low - 5) / 5))


def draw_bars(
    ax: Axes,
    variants: pd.DataFrame,
    teacher_label: str,
    teacher_style: Mapping[str, Any] | None = None,
) -> None:
    """Grouped bars on `ax`, one group per task plus joint: the teachers, then each variant's
    student (mean ± std over seeds as error bars; none for a single job). When the variants'
    ensembles differ, the teachers get no joint bar and each variant's ensemble is a dashed
    mark over its joint bar. The legend sits right of the axes, so it hides no bar."""
    cols = [*tasks_of(variants), "joint"]
    rows = [r for _, r in variants.iterrows()]
    per_row = ensembles_differ(variants)
    nan = float("nan")
    first = rows[0]
    teachers = [(first[f"{c}_teacher_mean"], first[f"{c}_teacher_std"]) for c in cols]
    if per_row:
        teachers[-1] = (nan, nan)
    labels, common = variant_labels([str(r["variant"]) for r in rows])
    series = [(teacher_label, teachers, int(first["n"]))]
    for r, label in zip(rows, labels, strict=True):
        vals = [(r[f"{c}_student_mean"], r[f"{c}_student_std"]) for c in cols]
        series.append((label, vals, int(r["n"])))
    width = 0.8 / len(series)

    def xs(i: int) -> list[float]:
        return [j + (i - (len(series) - 1) / 2) * width for j in range(len(cols))]

    lows = []
    for i, (name, vals, n) in enumerate(series):
        style = dict(teacher_style or {}) if i == 0 else {}
        errs = [0.0 if s != s else s for _, s in vals]
        spread = n > 1 and any(v[1] == v[1] for v in vals)
        heights = [m for m, _ in vals]
        ax.bar(
            xs(i),
            heights,
            width,
            yerr=errs if spread else None,
            capsize=2 if spread else 0,
            label=name,
            **style,
        )
        lows += [m - e if spread else m for m, e in zip(heights, errs, strict=True)]
    if per_row:
        for i, r in enumerate(rows, start=1):
            x, y = xs(i)[-1], r["joint_teacher_mean"]
            label = "teacher ensemble (the variant's rule)" if i == 1 else None
            ax.hlines(y, x - width / 2, x + width / 2, "k", "--", label=label)
            lows.append(y)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(y_floor(lows), 100)
    title = None if common is None else wrap_label(f"all variants: {common}")
    ax.legend(
        fontsize=7,
        title=title,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
    )


def bar_figure(
    variants: pd.DataFrame,
    title: str,
    teacher_label: str = "teachers",
    teacher_style: Mapping[str, Any] | None = None,
) -> Figure:
    """report.png's figure (a plain Figure: no pyplot state, safe in a callback or a notebook):
    `draw_bars` of the variants frame under `title`."""
    from matplotlib.figure import Figure

    n_cols, n_series = len(tasks_of(variants)) + 1, len(variants) + 1
    fig = Figure(figsize=(4.5 + 1.4 * n_cols * max(1.0, n_series / 3), 4.2))
    ax = fig.add_subplot()
    draw_bars(ax, variants, teacher_label, teacher_style)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(variants: pd.DataFrame, path: Path, title: str = "student vs teachers") -> Path:
    """Write `bar_figure` to `path` (the legend outside the axes is kept in the image)."""
    fig = bar_figure(variants, title)
    fig.savefig(path, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def table_rows(variants: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and body: the teachers' row first (task-aware accuracy of each teacher on its
    task; joint: their ensemble), then one row per variant with its job count and seeds.
    When the variants' teacher ensembles differ (a sweep over `targets=`: each rule makes its
    own ensemble), the joint cell of the teachers' row would be one rule's figure only, so
    each variant's row gets its ensemble in a column of its own and the teachers' row says so."""
    tasks = tasks_of(variants)
    rows = [r for _, r in variants.iterrows()]
    per_row = ensembles_differ(variants)
    header = ["variant", "n", "seeds", *[f"{t} student" for t in tasks], "joint student"]
    first = rows[0]
    teachers = [
        "teachers (ensemble for joint)",
        "-",
        "-",
        *[cell(first, f"{t}_teacher") for t in tasks],
        "per variant ->" if per_row else cell(first, "joint_teacher"),
    ]
    if per_row:
        header.append("joint teacher ensemble")
        teachers.append("-")
    body = [teachers]
    for r in rows:
        name = str(r["variant"]) + (" (USES LABELS)" if r["uses_labels"] else "")
        cells = [
            name,
            str(int(r["n"])),
            seeds_text(r["seeds"]),
            *[cell(r, f"{t}_student") for t in tasks],
            cell(r, "joint_student"),
        ]
        if per_row:
            cells.append(cell(r, "joint_teacher"))
        body.append(cells)
    return header, body


def margin_rows(variants: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and body of the margins table: per variant, student - teacher on each task, their
    mean, the joint margin to the teachers' ensemble (points, mean ± std over seeds), and the
    validation split's task-mean accuracy (what a recipe is chosen on)."""
    tasks = tasks_of(variants)
    header = ["variant", *[f"{t} margin" for t in tasks], "task-mean margin", "joint margin"]
    has_val = "val_task_mean_mean" in variants.columns
    if has_val:
        header.append("val task-mean %")
    body = []
    for _, r in variants.iterrows():
        cols = [f"{t}_margin" for t in tasks] + ["task_mean_margin", "joint_margin"]
        cells = [str(r["variant"]), *[signed(r, c) for c in cols]]
        if has_val:
            cells.append(cell(r, "val_task_mean"))
        body.append(cells)
    return header, body


def signed(row: Mapping[str, Any], col: str) -> str:
    """A margin cell with its sign (`+0.42 ± 0.10`, `-1.20`)."""
    text = cell(row, col)
    return text if text == "-" or text.startswith("-") else "+" + text


def provenance_notes(results: list[dict[str, Any]]) -> list[str]:
    """Which code and which teacher files made the jobs; a warning when they differ, since the
    table's teacher row is the first job's and its means mix whatever the jobs ran on."""
    provs = [r.get("provenance") or {} for r in results]
    commits = Counter(str(p.get("git_commit") or "unknown") for p in provs)
    dirty = sum(bool(p.get("git_dirty")) for p in provs)
    code = ", ".join(f"{c[:12]} ({n} jobs)" for c, n in commits.most_common())
    lines = [f"Code: {code}" + (f"; {dirty} jobs with uncommitted changes" if dirty else "")]
    teachers = Counter(json.dumps(r.get("teacher_hashes") or {}, sort_keys=True) for r in results)
    if len(commits) > 1:
        lines.append("WARNING: the jobs ran on different commits.")
    if len(teachers) > 1:
        lines.append(
            f"WARNING: the jobs used {len(teachers)} different sets of teacher files "
            "(teacher_hashes in results.json): the teacher row is the first job's."
        )
    return lines


def md_cell(text: str) -> str:
    """`text` as one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def problems_markdown(problems: list[dict[str, str]], n_jobs: int) -> list[str]:
    """The section listing the jobs that failed or did not finish (none: no lines)."""
    if not problems:
        return []
    body = [
        [
            md_cell(p["job"]),
            p["status"],
            md_cell("`" + p["overrides"].replace("`", "'") + "`"),
            md_cell(p["error"]),
        ]
        for p in problems
    ]
    return [
        "",
        f"## Failed or unfinished jobs: {len(problems)} of {n_jobs}",
        "",
        *md_table(["job", "status", "overrides", "error"], body),
    ]


def markdown(
    variants: pd.DataFrame,
    sweep_dir: str | Path,
    results: Sequence[Mapping[str, Any]] = (),
    problems: Sequence[dict[str, str]] = (),
    n_jobs: int = 0,
) -> str:
    """The report: a warning when jobs failed, the table of the variants (when any job
    finished), the provenance notes, then the jobs that failed or did not finish."""
    lines = [f"# Sweep report: {sweep_dir}", ""]
    if problems:
        lines += [
            f"WARNING: {len(problems)} of {n_jobs} jobs failed or did not finish (listed at the "
            "end); the table aggregates the jobs that wrote a readable results.json.",
            "",
        ]
    if not variants.empty:
        header, body = table_rows(variants)
        rules = ", ".join(sorted({t for ts in variants["targets"] for t in ts}))
        lines += [
            "Test accuracy in %, mean ± std over seeds (a variant of one job: its value; n: "
            "jobs, seeds: their seeds). Task columns: task-aware accuracy; joint: argmax over "
            f"the union (teachers: their ensemble under the target rule, {rules}).",
            "",
            *md_table(header, body),
        ]
        if "task_mean_margin_mean" in variants.columns:
            m_header, m_body = margin_rows(variants)
            lines += [
                "",
                "Margins to the teachers in points (student - teacher on each task, their "
                "mean, and joint: student - the teachers' ensemble), mean ± std over seeds; "
                "val task-mean: the validation split's task-mean accuracy, the figure a recipe "
                "is chosen on.",
                "",
                *md_table(m_header, m_body),
            ]
    else:
        lines.append("No job wrote a readable results.json: no table.")
    if results:
        lines += ["", *provenance_notes(list(results))]
    lines += problems_markdown(list(problems), n_jobs)
    return "\n".join(lines) + "\n"


def frame_csv(frame: pd.DataFrame, float_format: str | None = None) -> str:
    """`frame` as CSV text; list cells (seeds, targets) as space-separated values, as
    report.csv always had them."""
    out = frame.copy()
    for c in out.columns:
        if out[c].map(lambda v: isinstance(v, list)).any():
            out[c] = out[c].map(lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
    return out.to_csv(index=False, float_format=float_format, lineterminator="\n")


def show_tables(variants: pd.DataFrame, n_results: int, problems: list[dict[str, str]]) -> None:
    """The report's tables on the console."""
    console = Console()
    if not variants.empty:
        header, body = table_rows(variants)
        table = Table(title=f"sweep: {n_results} runs, {len(variants)} variants")
        for h in header:
            table.add_column(h, justify="left" if h == "variant" else "right", overflow="fold")
        for b in body:
            table.add_row(*b)
        console.print(table)
    if problems:
        table = Table(title=f"sweep: {len(problems)} jobs failed or did not finish")
        for h in ("job", "status", "overrides", "error"):
            table.add_column(h, overflow="fold")
        for p in problems:
            table.add_row(*(Text(p[k]) for k in ("job", "status", "overrides", "error")))
        console.print(table)


def write_sweep_report(sweep_dir: str | Path, show: bool = False) -> dict[str, Path]:
    """report.md in `sweep_dir`, with report.csv (`variants_frame`), jobs.csv (`jobs_frame`)
    and report.png when any job finished; report.md lists the jobs that failed or did not
    finish. Every file is written atomically. Raises if `sweep_dir` holds no job."""
    sweep_dir = Path(sweep_dir)
    results = collect(sweep_dir)
    n_jobs, problems = job_problems(sweep_dir)
    if not results and not problems:
        raise FileNotFoundError(f"no results.json and no job dir below {sweep_dir}")
    jobs = _jobs_frame(results, sweep_dir)
    variants = variants_frame(jobs)
    paths = {
        "md": sweep_dir / "report.md",
        "csv": sweep_dir / "report.csv",
        "jobs": sweep_dir / "jobs.csv",
        "png": sweep_dir / "report.png",
    }
    if not variants.empty:
        atomic_write(paths["csv"], frame_csv(variants, "%.4f"))
        atomic_write(paths["jobs"], frame_csv(jobs, "%.6g"))
    atomic_write(paths["md"], markdown(variants, sweep_dir, results, problems, n_jobs))
    if not variants.empty:
        with atomic_path(paths["png"]) as tmp:
            plot(variants, tmp, sweep_title(sweep_dir))
    else:  # no table: no csv and no plot (nor stale ones)
        for kind in ("csv", "jobs", "png"):
            paths.pop(kind).unlink(missing_ok=True)
    if show:
        show_tables(variants, len(results), problems)
    return paths


def job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed job raised. It is read from the field behind the property
    `JobReturn.return_value`: the property writes "Error executing job ..." to stderr and
    re-raises, which the sweeper does itself once the batch of jobs has run."""
    error = getattr(job_return, "_return_value", None)
    return error if isinstance(error, BaseException) else None


def error_line(error: BaseException | None) -> str:
    """`Type: first line of the message` (just the type for an empty message)."""
    if error is None:
        return "the job failed (Hydra passed on no exception)"
    line = first_line(str(error))
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def record_failure(job_dir: str | Path, error: BaseException | None) -> Path:
    """Write the failure record into `job_dir`: the error's first line, type, message and
    traceback (the report lists the first line; the rest is for whoever debugs the job)."""
    rec: dict[str, Any] = {"status": "failed", "error": error_line(error)}
    if error is not None:
        rec |= {
            "type": f"{type(error).__module__}.{type(error).__qualname__}",
            "message": str(error)[:MAX_TRACEBACK],
            "traceback": "".join(traceback.format_exception(error))[-MAX_TRACEBACK:],
        }
    rec["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = Path(job_dir) / FAILURE
    atomic_write(path, json.dumps(rec, indent=2))
    return path


def _in_sweep(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.runtime.output_dir))


class AggregateOnMultirunEnd(Callback):
    """Hydra callback: the sweep report when a multirun ends, also when jobs failed.

    Hydra 1.3 skips `on_multirun_end` when a job failed: the basic sweeper (and the Optuna
    sweeper, once the failures exceed its max_failure_rate) reads each job's
    `JobReturn.return_value`, which re-raises the job's exception, so `Hydra.multirun` never
    reaches the hook; `run_and_report` prints the error and exits with status 1. Hence:

    - every job records its own failure (`on_job_end`, in the process that ran the job, so with
      any launcher), and a job started again in its dir drops the last attempt's record;
    - `on_multirun_start` registers the report with `atexit`: after a failure it is written
      once Hydra has printed the error, before the interpreter exits (the status stays 1, and
      a sweep interrupted with Ctrl-C gets its report too); `on_multirun_end` (no job failed)
      writes it and unregisters the hook.
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._report_at_exit)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _in_sweep(config):
            (_job_dir(config) / FAILURE).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED and _in_sweep(config):
            record_failure(_job_dir(config), job_error(job_return))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._report_at_exit)
        report_sweep(Path(config.hydra.sweep.dir))

    def _report_at_exit(self) -> None:
        """The report of a multirun that ended in an error (nothing may raise here)."""
        if self.sweep_dir is None:
            return
        try:
            report_sweep(self.sweep_dir)
        except Exception as e:
            log.error("no sweep report in %s: %s", self.sweep_dir, error_line(e))


def report_sweep(sweep_dir: Path) -> None:
    """Write and show the sweep report, and say which jobs failed or did not finish."""
    if not job_dirs(sweep_dir):
        log.info("no job dir in %s: no sweep report", sweep_dir)
        return
    paths = write_sweep_report(sweep_dir, show=True)
    n_jobs, problems = job_problems(sweep_dir)
    if problems:
        log.warning(
            "%d of %d jobs failed or did not finish (listed in the sweep report)",
            len(problems),
            n_jobs,
        )
    log.info("sweep report: %s", paths["md"])
