"""`tipdistill report <dir>... [--out DIR] [--results FILE]`: the command over report.py (tables, plots)
and evidence.py (the verdicts on the paper's claims). Its own module because evidence builds on report:
the command that calls both sits above them, so neither imports the other back."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tipdistill.evidence import write_results
from tipdistill.report import MEM_FLOOR_GIB, ReportError, load_report, write_report


def main_report(argv: list[str]) -> int:
    """`tipdistill report <dir>... [--out DIR] [--results FILE]`: print the markdown; exit 1 with one line on no runs."""
    parser = argparse.ArgumentParser(prog="tipdistill report", description="Compare finished runs side by side.")
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or multirun / grid directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.* and plots (default: the first path)")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the verdicts on the paper's claims, with tables and plots, to this markdown file "
                             "(e.g. docs/results.md; its figures go to a folder beside it)")
    parser.add_argument("--mem-floor-gib", type=float, default=MEM_FLOOR_GIB,
                        help=f"CPU (RSS) update peaks below this are reported as below resolution (default {MEM_FLOOR_GIB})")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.paths[0]
    try:
        rep = load_report(args.paths, args.mem_floor_gib)
        write_report(rep, out)
        if args.results is not None:
            write_results(rep, args.paths, args.results, command=["tipdistill", "report", *argv])
    except ReportError as exc:
        print(f"tipdistill report: {exc}", file=sys.stderr)
        return 1
    print((out / "report.md").read_text(), end="")
    print(f"written: {out / 'report.csv'}, {out / 'report.md'}, {out / 'curves.csv'} and plots in {out}")
    if args.results is not None:
        print(f"results: {args.results}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_report(sys.argv[1:]))
