"""`python -m benchmarks` (`make bench`): run the benchmark sections and write benchmarks/results.md, .csv and plots.

Benchmarks sit above every package of the tool and import it; nothing in the tool imports them."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.bench import ALL_SECTIONS, default_out, parse_scale_images, parse_sections, run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", default="all",
                        help=f"comma-separated section numbers {ALL_SECTIONS[0]}-{ALL_SECTIONS[-1]}, or 'all' "
                             "(default). Example: --sections 1,3")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that every section runs (the smoke test); figures are not meaningful")
    parser.add_argument("--scale-images", default=None,
                        help="section 10: comma-separated numbers of images, at least two ascending (default: "
                             "10000,100000,300000). Example: --scale-images 100000,1000000")
    parser.add_argument("--out", default=None,
                        help="folder for results.md, results.csv and the PNG plots (default: benchmarks/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        numbers = parse_sections(args.sections)
        scale_images = parse_scale_images(args.scale_images)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out()
    sections = run_bench(numbers, args.quick, out, scale_images=scale_images,
                         log=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    for s in sections:
        status = {True: "met", False: "NOT met", None: "report"}[s.met]
        print(f"{s.number}. {s.title.split(' (')[0]}: {s.value} [{status}]")
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
