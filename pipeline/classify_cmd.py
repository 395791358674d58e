"""`python -m pipeline classify`: parse flags into a ClassifyConfig, call `classify`, print the summary."""
from __future__ import annotations

import argparse

from classifiers.heads import HEADS, TRANSFORMS, list_heads
from classifiers.reduce import get_reduce, list_reduces
from classifiers.report import summary
from pipeline.classification import ClassifyConfig, classify, dataset_runs

_DEFAULTS = ClassifyConfig()


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def catalogue() -> str:
    """What HEADS= and REDUCE= accept, one line each."""
    lines = ["heads (* = in the default set; 'all' = every one):"]
    lines += [f"  {name:<8}{'*' if HEADS[name].default else ' '} {HEADS[name].summary}" for name in list_heads()]
    lines += [f"  {prefix}+<head>  {prefix.upper()} in front of any head, e.g. {prefix}+logreg" for prefix in TRANSFORMS]
    lines += ["reduces (default: avg for spatial maps, none for vectors):"]
    lines += [f"  {name:<8}  " + ("e.g. " + name.replace("<k>", "4") + ": " if "<k>" in name else "")
              + get_reduce(name.replace("<k>", "4")).summary for name in list_reduces()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default=_DEFAULTS.features,
                        help="cache file, comma-separated files, or a glob (default: every complete cache/*.h5)")
    parser.add_argument("--layer", type=_names, default=[], help="comma-separated layers (default: all in each cache)")
    parser.add_argument("--heads", default=_DEFAULTS.heads,
                        help="'default' (fast set), 'all', or comma-separated names; see --list")
    parser.add_argument("--reduce", type=_names, default=[],
                        help="comma-separated: avg, max, avgmax, grid2, grid4, flatten, pca<k> "
                             "(default: avg for maps, none for vectors)")
    parser.add_argument("--cv", type=int, default=_DEFAULTS.cv, help="folds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--out", default=_DEFAULTS.out, help="run directory (default: results/<UTC timestamp>/)")
    parser.add_argument("--memory-budget", default=_DEFAULTS.memory_budget,
                        help="peak memory for feature data, e.g. 512MiB (default: %(default)s)")
    parser.add_argument("--metric", default=_DEFAULTS.metric,
                        help="sort the leaderboard by accuracy (default) | balanced_accuracy | macro_f1 | log_loss "
                             "(for imbalanced data)")
    parser.add_argument("--save-all", action="store_true", help="save every model, not only the best")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip report.html (its learning curve and data audit)")
    parser.add_argument("--list", action="store_true", help="list heads and reductions, then exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(catalogue())
        return 0
    cfg = ClassifyConfig(features=args.features, layer=args.layer, heads=args.heads, reduce=args.reduce, cv=args.cv,
                         seed=args.seed, out=args.out, memory_budget=args.memory_budget, metric=args.metric,
                         save_all=args.save_all, report=args.report)
    run_dir = classify(cfg)
    runs = dataset_runs(run_dir)
    print("\n\n".join(summary(run) if len(runs) == 1 else f"== dataset {run.name} ==\n{summary(run)}" for run in runs))
    if len(runs) > 1:
        print(f"\n{len(runs)} datasets, each ranked on its own; index: {run_dir / 'index.html'}")
    return 0
