"""Aggregate a sweep: per variant (overrides minus seed), mean and std over seeds; and list the
jobs that failed or did not finish.

A failed job records its error itself: `AggregateOnMultirunEnd.on_job_end` writes `failure.json`
into the job's dir, in the process that ran the job (the main process with the basic launcher,
a worker with joblib, a cluster job with submitit). A job dir with `.hydra/overrides.yaml` but
neither results.json nor failure.json was killed (or still runs). Every file read back
(results.json, overrides.yaml, failure.json) is untrusted: JSON or `yaml.safe_load` only, and a
malformed one is listed as such in the report.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import statistics
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from amalgam.report.run import atomic_path, atomic_write, md_table

log = logging.getLogger("amalgam")
SKIP_DIRS = {"eval", "wandb", ".submitit", "checkpoints"}
FAILURE = "failure.json"  # a failed job's record, in its dir
OVERRIDES = Path(".hydra") / "overrides.yaml"
MAX_LINE = 300  # characters of an error's first line in the report
MAX_TRACEBACK = 20_000  # characters of the traceback kept in a failure record
UNFINISHED = "no results.json and no failure record: killed, or still running"


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


def _numbers(d: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(d, dict) and all(
        isinstance(d.get(k), int | float) and not isinstance(d.get(k), bool) for k in keys
    )


def result_problem(r: Any) -> str | None:
    """Why a parsed results.json cannot be aggregated; None when it can."""
    if not isinstance(r, dict):
        return "not a JSON object"
    tasks = r.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return "no 'tasks' entry"
    for name, t in tasks.items():
        if not _numbers(t, ("student_acc", "teacher_acc")):
            return f"task '{name}' lacks a numeric student_acc or teacher_acc"
    if not _numbers(r.get("joint"), ("student_acc", "teacher_ensemble_acc")):
        return "'joint' lacks a numeric student_acc or teacher_ensemble_acc"
    if r.get("seed") is not None and not isinstance(r["seed"], int):
        return "'seed' is not an integer"
    for key in ("provenance", "teacher_hashes"):
        if r.get(key) is not None and not isinstance(r[key], dict):
            return f"'{key}' is not an object"
    return None


def read_results(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the results, None), or (None, why the file is unreadable or malformed)."""
    r, why = read_json(path)
    why = why or result_problem(r)
    return (None, why) if why else (r, None)


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


def read_overrides(job_dir: Path) -> str:
    """The job's overrides on one line, from Hydra's `.hydra/overrides.yaml`."""
    path = job_dir / OVERRIDES
    if not path.is_file():
        return "(no .hydra/overrides.yaml)"
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        return f"(malformed .hydra/overrides.yaml: {type(e).__name__})"
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return "(malformed .hydra/overrides.yaml: not a list of strings)"
    return " ".join(overrides)


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


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: seeds, and (mean, std) of every accuracy, in percent."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[str(r.get("variant") or r.get("method", "?"))].append(r)
    rows = []
    for variant, rs in groups.items():
        row: dict[str, Any] = {
            "variant": variant,
            "n": len(rs),
            "seeds": sorted(r.get("seed") for r in rs),
            "uses_labels": any(r.get("uses_labels") for r in rs),
            "targets": sorted({str(r.get("targets", "Concat")) for r in rs}),
            "tasks": {},
        }
        for task in rs[0]["tasks"]:
            row["tasks"][task] = {
                who: mean_std([100 * r["tasks"][task][f"{who}_acc"] for r in rs])
                for who in ("student", "teacher")
            }
        row["joint"] = {
            "student": mean_std([100 * r["joint"]["student_acc"] for r in rs]),
            "teacher": mean_std([100 * r["joint"]["teacher_ensemble_acc"] for r in rs]),
        }
        rows.append(row)
    return sorted(rows, key=lambda r: r["variant"])


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def ensembles_differ(rows: list[dict[str, Any]]) -> bool:
    """Whether the variants' teacher ensembles differ in joint accuracy (a sweep over
    `targets=`: each rule makes its own ensemble), so no one teachers' joint figure fits all."""
    return len({fmt(r["joint"]["teacher"]) for r in rows}) > 1


def draw_bars(
    ax: Any, rows: list[dict[str, Any]], teacher_label: str, teacher_style: dict | None = None
) -> None:
    """Grouped bars on `ax`, one group per task plus joint: the teachers, then each variant's
    student (mean ± std over seeds as error bars). When the variants' ensembles differ, the
    teachers get no joint bar and each variant's ensemble is a dashed mark over its joint bar."""
    cols = [*rows[0]["tasks"], "joint"]

    def pick(r: dict[str, Any], who: str, c: str) -> tuple[float, float]:
        return r["joint"][who] if c == "joint" else r["tasks"][c][who]

    per_row = ensembles_differ(rows)
    teachers = [pick(rows[0], "teacher", c) for c in cols]
    if per_row:
        teachers[-1] = (float("nan"), float("nan"))
    series = [(teacher_label, teachers)]
    series += [(r["variant"], [pick(r, "student", c) for c in cols]) for r in rows]
    width = 0.8 / len(series)

    def xs(i: int) -> list[float]:
        return [j + (i - (len(series) - 1) / 2) * width for j in range(len(cols))]

    for i, (name, vals) in enumerate(series):
        style = (teacher_style or {}) if i == 0 else {}
        ax.bar(
            xs(i),
            [v[0] for v in vals],
            width,
            yerr=[v[1] for v in vals],
            capsize=2,
            label=name,
            **style,
        )
    lows = [v[0] for _, vals in series for v in vals if v[0] == v[0]]
    if per_row:
        for i, r in enumerate(rows, start=1):
            x, y = xs(i)[-1], r["joint"]["teacher"][0]
            label = "teacher ensemble (the variant's rule)" if i == 1 else None
            ax.hlines(y, x - width / 2, x + width / 2, "k", "--", label=label)
            lows.append(y)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(max(0.0, min(lows) - 10), 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body: the teachers' row first (task-aware accuracy of each teacher on its
    task; joint: their ensemble), then one row per variant. When the variants' teacher
    ensembles differ (a sweep over `targets=`: each rule makes its own ensemble), the joint
    cell of the teachers' row would be one rule's figure only, so each variant's row gets its
    ensemble in a column of its own and the teachers' row says so."""
    tasks = list(rows[0]["tasks"])
    per_row = ensembles_differ(rows)
    header = ["variant", "seeds", *[f"{t} student" for t in tasks], "joint student"]
    first = [
        "teachers (ensemble for joint)",
        "-",
        *[fmt(rows[0]["tasks"][t]["teacher"]) for t in tasks],
        "per variant ->" if per_row else fmt(rows[0]["joint"]["teacher"]),
    ]
    if per_row:
        header.append("joint teacher ensemble")
        first.append("-")
    body = [first]
    for r in rows:
        name = r["variant"] + (" (USES LABELS)" if r["uses_labels"] else "")
        cells = [
            name,
            str(r["n"]),
            *[fmt(r["tasks"][t]["student"]) for t in tasks],
            fmt(r["joint"]["student"]),
        ]
        if per_row:
            cells.append(fmt(r["joint"]["teacher"]))
        body.append(cells)
    return header, body


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
    rows: list[dict[str, Any]],
    sweep_dir: str | Path,
    results: list[dict[str, Any]] = (),
    problems: list[dict[str, str]] = (),
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
    if rows:
        header, body = table_rows(rows)
        rules = ", ".join(sorted({t for r in rows for t in r["targets"]}))
        lines += [
            "Test accuracy in %, mean ± std over seeds. Task columns: task-aware accuracy; "
            "joint: argmax over the union (teachers: their ensemble under the target rule, "
            f"{rules}).",
            "",
            *md_table(header, body),
        ]
    else:
        lines.append("No job wrote a readable results.json: no table.")
    if results:
        lines += ["", *provenance_notes(list(results))]
    lines += problems_markdown(list(problems), n_jobs)
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    tasks = list(rows[0]["tasks"])
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["variant", "n", "seeds", "uses_labels"]
    for t in [*tasks, "joint"]:
        cols += [f"{t}_{who}_{s}" for who in ("student", "teacher") for s in ("mean", "std")]
    w.writerow(cols)
    for r in rows:
        vals: list[Any] = [r["variant"], r["n"], " ".join(map(str, r["seeds"])), r["uses_labels"]]
        for t in tasks:
            for who in ("student", "teacher"):
                vals += [f"{v:.4f}" for v in r["tasks"][t][who]]
        for who in ("student", "teacher"):
            vals += [f"{v:.4f}" for v in r["joint"][who]]
        w.writerow(vals)
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols, n_series = len(rows[0]["tasks"]) + 1, len(rows) + 1
    fig, ax = plt.subplots(figsize=(2 + 1.6 * n_cols * max(1, n_series / 3), 4))
    draw_bars(ax, rows, "teachers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def show_tables(rows: list[dict[str, Any]], n_results: int, problems: list[dict[str, str]]) -> None:
    """The report's tables on the console."""
    console = Console()
    if rows:
        header, body = table_rows(rows)
        table = Table(title=f"sweep: {n_results} runs, {len(rows)} variants")
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
    """report.md in `sweep_dir`, with report.csv and report.png when any job finished; report.md
    lists the jobs that failed or did not finish. Raises if `sweep_dir` holds no job."""
    sweep_dir = Path(sweep_dir)
    results = collect(sweep_dir)
    n_jobs, problems = job_problems(sweep_dir)
    if not results and not problems:
        raise FileNotFoundError(f"no results.json and no job dir below {sweep_dir}")
    rows = aggregate(results)
    paths = {
        "md": sweep_dir / "report.md",
        "csv": sweep_dir / "report.csv",
        "png": sweep_dir / "report.png",
    }
    if rows:
        atomic_write(paths["csv"], to_csv(rows))
    atomic_write(paths["md"], markdown(rows, sweep_dir, results, problems, n_jobs))
    if rows:
        with atomic_path(paths["png"]) as tmp:
            plot(rows, tmp)
    else:  # no table: no csv and no plot (nor stale ones)
        for kind in ("csv", "png"):
            paths.pop(kind).unlink(missing_ok=True)
    if show:
        show_tables(rows, len(results), problems)
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
