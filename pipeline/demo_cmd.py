"""`make demo`: the whole two-stage flow on the data and model shipped in the repo, offline."""
from __future__ import annotations

import argparse

from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.summary import print_extract_summary

# Stage ends of Lite0 from early to late: the leaderboard then shows which depth transfers best.
DEMO_LAYERS = ["block3b_add", "block5c_add", "block6d_add", "avg_pool"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ExtractConfig()
    p.add_argument("--data", default=d.data)
    p.add_argument("--out", default=None, help="results folder; default results/<timestamp>/")


def run(args: argparse.Namespace) -> int:
    from classifiers.report import summary
    from pipeline.classification import ClassifyConfig, classify

    cfg = ExtractConfig(data=args.data, layer=DEMO_LAYERS)
    print(f"[1/2] extract: {cfg.backbone} at {', '.join(DEMO_LAYERS)} on {cfg.data}")
    result = extract(cfg)
    if result.status != "up-to-date":
        print_extract_summary(result)
    print(f"\n[2/2] classify: default heads on {result.path}")
    run_dir = classify(ClassifyConfig(features=str(result.path), out=args.out))
    print(summary(run_dir))
    print(f"\ndemo done. cache: {result.path}\nresults: {run_dir} (report.md, leaderboard.md, *.png, best/)\n"
          f"next: make predict MODEL={run_dir}/best DATA=path/to/new/images\n"
          f"report: {run_dir / 'report.html'}  (open it in a browser)")
    return 0
