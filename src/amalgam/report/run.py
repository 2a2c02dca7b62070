"""The student-vs-teacher report: results.json, results.md, a bar chart, a rich table."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from amalgam.files import atomic_open, atomic_path, atomic_write_text  # noqa: F401
from amalgam.results import FILE, write_results


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(task, classes, teacher, student, student - teacher) per task, then the joint row."""
    out = []
    for name, t in results["tasks"].items():
        delta = 100 * (t["student_acc"] - t["teacher_acc"])
        out.append(
            (
                name,
                str(len(t["classes"])),
                pct(t["teacher_acc"]),
                pct(t["student_acc"]),
                f"{delta:+.2f}",
            )
        )
    j = results["joint"]
    delta = 100 * (j["student_acc"] - j["teacher_ensemble_acc"])
    n = sum(len(t["classes"]) for t in results["tasks"].values())
    rule = j.get("target_rule", "Concat")
    ref = j.get("teacher_ensemble_concat_acc")
    label = "joint (ensemble for teachers)" if ref is None else f"joint (teachers: {rule} ensemble)"
    out.append(
        (label, str(n), pct(j["teacher_ensemble_acc"]), pct(j["student_acc"]), f"{delta:+.2f}")
    )
    if ref is not None:  # the same teachers under the reference code's rule
        delta = 100 * (j["student_acc"] - ref)
        out.append(
            (
                "joint (teachers: Concat, the reference rule)",
                str(n),
                pct(ref),
                pct(j["student_acc"]),
                f"{delta:+.2f}",
            )
        )
    return out


HEADER = ("task", "classes", "teacher acc %", "student acc %", "delta")


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def confusion_rows(results: dict[str, Any], who: str) -> list[list[str]]:
    """Rows of the task confusion of `who` (student | teachers): true task, then counts."""
    c = results["task_confusion"]
    return [[t, *(str(v) for v in row)] for t, row in zip(c["tasks"], c[who], strict=True)]


def confusion_markdown(results: dict[str, Any]) -> list[str]:
    """The task-confusion tables (student, teacher ensemble); empty without the entry."""
    c = results.get("task_confusion")
    if not c:
        return []
    rule = results.get("joint", {}).get("target_rule", "Concat")
    lines = [
        "",
        "Task confusion on the test images: rows are the true task, columns the task of the "
        "joint argmax (a class listed by several tasks counts for the first of them).",
    ]
    for who, title in (("student", "student"), ("teachers", f"teacher ensemble ({rule})")):
        head = [f"{title}: true \\ predicted", *c["tasks"]]
        lines += ["", *md_table(head, confusion_rows(results, who))]
    return lines


def markdown(results: dict[str, Any]) -> str:
    rule = results.get("joint", {}).get("target_rule", "Concat")
    lines = [
        f"# Results: {results.get('method', '?')} (seed {results.get('seed', '?')})",
        "",
        "Task-aware accuracy per task (argmax inside the task's classes; the teacher uses its own "
        "head), and joint accuracy over the union (teachers: argmax of the target rule's "
        f"distribution, rule {rule}).",
        "",
        *md_table(HEADER, rows(results)),
        *confusion_markdown(results),
    ]
    p = results.get("params")
    if p:
        lines += [
            "",
            f"Parameters: student {p['student']:,}, teachers "
            + ", ".join(f"{k} {v:,}" for k, v in p["teachers"].items()),
        ]
    s = results.get("throughput_img_s")
    if s:
        lines += [
            f"Throughput (img/s, eval, batch {s['batch']}, {s['device']}): student "
            f"{s['student']:.0f}, teachers "
            + ", ".join(f"{k} {v:.0f}" for k, v in s["teachers"].items())
        ]
    c = results.get("provenance")
    if c:
        lines += [f"Code: {code_line(c)}"]
    return "\n".join(lines) + "\n"


def code_line(c: dict[str, Any]) -> str:
    """'amalgam 0.1.0, commit 1a2b3c4d5e6f (uncommitted changes), torch 2.x, timm 1.x' from a
    provenance dict."""
    commit = c.get("git_commit")
    where = f", commit {commit[:12]}" if commit else ", no git commit"
    dirty = " (uncommitted changes)" if c.get("git_dirty") else ""
    machine = c.get("gpu") or f"{c.get('cpu')}, {c.get('threads')} threads"
    return (
        f"amalgam {c.get('amalgam')}{where}{dirty}, torch {c.get('torch')}, "
        f"timm {c.get('timm')}, lightning {c.get('lightning')}; {machine}"
    )


def rich_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"amalgam: {results.get('method', '?')} student vs teachers (test set)")
    for h in HEADER:
        table.add_column(h, justify="left" if h == "task" else "right")
    for r in rows(results):
        style = "green" if r[-1].startswith("+") else "red"
        table.add_row(*r[:-1], f"[{style}]{r[-1]}[/{style}]")
    return table


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*results["tasks"], "joint"]
    teacher = [t["teacher_acc"] for t in results["tasks"].values()]
    teacher.append(results["joint"]["teacher_ensemble_acc"])
    student = [t["student_acc"] for t in results["tasks"].values()]
    student.append(results["joint"]["student_acc"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * v for v in teacher], 0.4, label="teacher / ensemble")
    ax.bar([x + 0.2 for x in xs], [100 * v for v in student], 0.4, label="student")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title(f"{results.get('method', '')} student vs teachers")
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


def atomic_write(path: Path, text: str) -> None:
    """Old content or new, never a torn file (temp file + fsync + os.replace)."""
    atomic_write_text(path, text)


def write(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json first (most valuable), then results.md and results.png, each atomically
    (a crash leaves the previous file or the new one, never a torn one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / FILE, "md": out / "results.md", "png": out / "results.png"}
    write_results(results, out)  # the schema checked first (amalgam.results)
    atomic_write(paths["md"], markdown(results))
    plot(results, paths["png"])
    return paths


def confusion_table(results: dict[str, Any], who: str) -> Table:
    c = results["task_confusion"]
    table = Table(title=f"task confusion, {who} (rows: true task, columns: predicted task)")
    table.add_column("true \\ predicted")
    for t in c["tasks"]:
        table.add_column(t, justify="right")
    for r in confusion_rows(results, who):
        table.add_row(*r)
    return table


def show(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(rich_table(results))
    if results.get("task_confusion"):
        for who in ("student", "teachers"):
            console.print(confusion_table(results, who))


def log_to(loggers: list[Any], results: dict[str, Any], png: Path | None = None) -> None:
    """Scalar accuracies to every logger; the table and the plot to wandb."""
    metrics = {f"test/{n}/student_acc": t["student_acc"] for n, t in results["tasks"].items()}
    metrics |= {f"test/{n}/teacher_acc": t["teacher_acc"] for n, t in results["tasks"].items()}
    metrics["test/joint/student_acc"] = results["joint"]["student_acc"]
    metrics["test/joint/teacher_ensemble_acc"] = results["joint"]["teacher_ensemble_acc"]
    for lg in loggers:
        lg.log_metrics(metrics)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.log_table("results", columns=list(HEADER), data=[list(r) for r in rows(results)])
            if png is not None:
                lg.experiment.log({"results_plot": wandb.Image(str(png))})
        if hasattr(lg, "save"):
            lg.save()
