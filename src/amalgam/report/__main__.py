"""`python -m amalgam.report <sweep dir>`: aggregate every job's results.json of a sweep (report.md,
report.csv per variant, jobs.csv per job, report.png), and list the jobs that failed (their
failure.json) or did not finish (neither file)."""

from __future__ import annotations

import argparse
import sys

from amalgam.report.sweep import job_problems, write_sweep_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep_dir", help="a Hydra multirun dir (or any dir holding results.json files)")
    args = p.parse_args()
    try:
        paths = write_sweep_report(args.sweep_dir, show=True)
    except FileNotFoundError as e:
        sys.exit(f"Error: {e}: is it a sweep dir?")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    n_jobs, problems = job_problems(args.sweep_dir)
    if problems:
        print(f"{len(problems)} of {n_jobs} jobs failed or did not finish: see {paths['md']}")


if __name__ == "__main__":
    main()
