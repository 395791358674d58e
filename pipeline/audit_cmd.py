"""`python -m pipeline audit`: near-duplicates (leakage across splits), likely label errors and outliers of a cache.

Writes duplicates.csv, label_issues.csv, outliers.csv and a self-contained audit.html into --out; prints a summary.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from classifiers.audit import DUPLICATE_SIMILARITY
from classifiers.memory import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="the feature cache (.h5) to audit")
    parser.add_argument("--layer", default=None, help="layer to compare images by (default: the cache's last)")
    parser.add_argument("--reduce", default=None, help="how a spatial map becomes a vector (default: avg)")
    parser.add_argument("--threshold", type=float, default=DUPLICATE_SIMILARITY,
                        help="cosine similarity from which two images count as near-duplicates (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: results/audit-<cache name>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the out-of-fold split (default: %(default)s)")
    parser.add_argument("--memory-budget", default="2GiB", help="peak memory for feature data (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from classifiers import html
    from classifiers.audit import audit_cache
    from classifiers.data import open_cache
    from pipeline.page import audit_sections, save_audit

    cache = open_cache(args.features)
    found = audit_cache(cache, args.layer, args.reduce, parse_bytes(args.memory_budget), args.seed, args.threshold)
    out = Path(args.out or Path("results") / f"audit-{cache.name}")
    save_audit(found, out)
    page = html.write_page(out / "audit.html", f"Data audit of {cache.name}", audit_sections(found, cache))
    print(f"{found.summary()}\nresults: {out}/ (duplicates.csv, label_issues.csv, outliers.csv)\nreport:  {page}")
    return 0
