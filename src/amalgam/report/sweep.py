"""Aggregate a sweep: per variant (overrides minus seed), mean and std over seeds."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from amalgam.report.run import atomic_path, atomic_write, md_table

log = logging.getLogger("amalgam")
SKIP_DIRS = {"eval", "wandb", ".submitit", "checkpoints"}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job's results.json below `sweep_dir` (re-evaluations under eval/ are skipped)."""
    out = []
    for p in sorted(Path(sweep_dir).rglob("results.json")):
        if SKIP_DIRS & set(p.relative_to(sweep_dir).parts[:-1]):
            continue
        r = json.loads(p.read_text())
        r["_path"] = str(p)
        out.append(r)
    return out


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
    commits = Counter(p.get("git_commit") or "unknown" for p in provs)
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


def markdown(
    rows: list[dict[str, Any]], sweep_dir: str | Path, results: list[dict[str, Any]] = ()
) -> str:
    header, body = table_rows(rows)
    rules = ", ".join(sorted({t for r in rows for t in r["targets"]}))
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        "Test accuracy in %, mean ± std over seeds. Task columns: task-aware accuracy; "
        "joint: argmax over the union (teachers: their ensemble under the target rule, "
        f"{rules}).",
        "",
        *md_table(header, body),
    ]
    if results:
        lines += ["", *provenance_notes(list(results))]
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


def write_sweep_report(sweep_dir: str | Path, show: bool = False) -> dict[str, Path]:
    """report.md, report.csv and report.png in `sweep_dir`; raises if no results were found."""
    sweep_dir = Path(sweep_dir)
    results = collect(sweep_dir)
    if not results:
        raise FileNotFoundError(f"no results.json below {sweep_dir}: did the jobs finish?")
    rows = aggregate(results)
    paths = {
        "md": sweep_dir / "report.md",
        "csv": sweep_dir / "report.csv",
        "png": sweep_dir / "report.png",
    }
    atomic_write(paths["csv"], to_csv(rows))
    atomic_write(paths["md"], markdown(rows, sweep_dir, results))
    with atomic_path(paths["png"]) as tmp:
        plot(rows, tmp)
    if show:
        header, body = table_rows(rows)
        table = Table(title=f"sweep: {len(results)} runs, {len(rows)} variants")
        for h in header:
            table.add_column(h, justify="left" if h == "variant" else "right", overflow="fold")
        for b in body:
            table.add_row(*b)
        Console().print(table)
    return paths


class AggregateOnMultirunEnd(Callback):
    """Hydra callback: write the sweep report when a multirun ends (if any job wrote results)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not collect(sweep_dir):
            log.info("no results.json in %s: no sweep report", sweep_dir)
            return
        paths = write_sweep_report(sweep_dir, show=True)
        log.info("sweep report: %s", paths["md"])
