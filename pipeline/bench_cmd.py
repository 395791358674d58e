"""`python -m pipeline bench`: run the benchmark sections and write benchmarks/results.md, .csv and plots."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from features.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", default="all",
                        help="comma-separated section numbers 1-7, or 'all' (default). Example: --sections 1,3")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that every section runs (the smoke test); figures are not meaningful")
    parser.add_argument("--out", default=None,
                        help="folder for results.md, results.csv and the PNG plots (default: benchmarks/)")


def run(args: argparse.Namespace) -> int:
    from benchmarks.bench import default_out, parse_sections, run_bench

    try:
        numbers = parse_sections(args.sections)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out) if args.out else default_out()
    sections = run_bench(numbers, args.quick, out, log=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    for s in sections:
        status = {True: "met", False: "NOT met", None: "report"}[s.met]
        print(f"{s.number}. {s.title.split(' (')[0]}: {s.value} [{status}]")
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}")
    return 0
