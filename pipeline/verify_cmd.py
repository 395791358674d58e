"""`python -m pipeline verify CACHE`: read every row of a cache, checking chunk checksums and NaN/inf.

Exit 0 when the file is sound, 1 when rows are damaged (each damaged dataset named with its rows, then the fix),
2 when the path is not a complete cache of this tool.
"""
from __future__ import annotations

import argparse

from features.store import fix_hint, verify


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="a feature cache (.h5), e.g. cache/x.h5")


def run(args: argparse.Namespace) -> int:
    report = verify(args.cache)
    for name in report.unchecked:
        print(f"note: {name} has no checksums (written before they existed): only NaN/inf were checked. "
              f"{fix_hint(report.path)}")
    if not report.damage:
        print(f"ok: {report.path}: {report.rows} rows, every checksum and value sound")
        return 0
    for damage in report.damage:
        print(f"damaged: {report.path}: {damage.line()}")
    print(fix_hint(report.path))
    return 1
