"""`python -m pipeline predict`: parse flags into a PredictConfig, call `predict`, print the summary."""
from __future__ import annotations

import argparse

from classifiers import saved
from pipeline.prediction import PredictConfig, predict, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model directory, e.g. results/<run>/best")
    parser.add_argument("--data", required=True, help="image folder, or a feature cache (.h5) made the same way")
    parser.add_argument("--out", default=None, help="CSV path (default: predictions/<run>__<model>/<data name>.csv)")
    parser.add_argument("--batch-size", type=int, default=None, help="extraction batch size (default: as recorded)")
    parser.add_argument("--memory-budget", default=PredictConfig.memory_budget,
                        help="peak memory for feature data (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="re-extract even if the derived cache exists")
    add_trust_pickle(parser)


def add_trust_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a model.joblib of an older version; a pickle can run any code, so only for "
                             "folders you trust (README: Security)")


def run(args: argparse.Namespace) -> int:
    cfg = PredictConfig(model=args.model, data=args.data, out=args.out, batch_size=args.batch_size,
                        memory_budget=args.memory_budget, overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    print(summary(predict(cfg), saved.load_record(cfg.model)["class_names"]))
    return 0
