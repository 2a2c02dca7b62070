"""Reports: one run's student-vs-teacher table, and a sweep's aggregate over seeds.

A sweep's numbers as pandas DataFrames: `jobs_frame(sweep_dir)` (one row per job: variant,
seed, method, targets, accuracies in %, and the other results.json fields) and
`variants_frame(jobs)` (one row per variant: n, seeds, mean and std of each accuracy).
`write_sweep_report(sweep_dir)` writes them as jobs.csv and report.csv, with report.md and
report.png drawn from them.
"""

from amalgam.report.run import log_to, markdown, rich_table, show, write
from amalgam.report.sweep import (
    AggregateOnMultirunEnd,
    bar_figure,
    collect,
    job_problems,
    jobs_frame,
    variants_frame,
    write_sweep_report,
)

__all__ = [
    "AggregateOnMultirunEnd",
    "bar_figure",
    "collect",
    "job_problems",
    "jobs_frame",
    "log_to",
    "markdown",
    "rich_table",
    "show",
    "variants_frame",
    "write",
    "write_sweep_report",
]
