"""Reports: one run's student-vs-teacher table, and a sweep's aggregate over seeds."""

from amalgam.report.run import log_to, markdown, rich_table, show, write
from amalgam.report.sweep import (
    AggregateOnMultirunEnd,
    aggregate,
    collect,
    job_problems,
    write_sweep_report,
)

__all__ = [
    "AggregateOnMultirunEnd",
    "aggregate",
    "collect",
    "job_problems",
    "log_to",
    "markdown",
    "rich_table",
    "show",
    "write",
    "write_sweep_report",
]
