"""`python -m amalgam.report <sweep dir>`: aggregate every job's results.json of a sweep."""

from __future__ import annotations

import argparse

from amalgam.report.sweep import write_sweep_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep_dir", help="a Hydra multirun dir (or any dir holding results.json files)")
    args = p.parse_args()
    paths = write_sweep_report(args.sweep_dir, show=True)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
