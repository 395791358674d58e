"""The Python API for notebooks: `from pipeline import extract, classify, predict, audit`.

Keyword arguments are the CLI flags (`--batch-size` -> `batch_size`; a comma list may be a Python list); each call
returns a small result object with paths and tables instead of printing. TensorFlow loads only inside `extract`
and `predict`. Example:

    >>> from pipeline import extract, classify
    >>> cache = extract(data="data/hymenoptera-small", layer=["avg_pool"])  # doctest: +SKIP
    >>> run = classify(features=cache.path, heads="logreg,knn")  # doctest: +SKIP
    >>> run.leaderboard.head(), run.best_model, run.report  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from features.errors import UsageError


def _config(cls, flags: dict, lists: tuple[str, ...] = ()):
    """`cls(**flags)` with a one-line error naming an unknown keyword; `lists` fields also take 'a,b' strings."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise UsageError(f"Unknown argument(s) {', '.join(unknown)}. Expected some of: {', '.join(known)}.")
    for name in lists:
        if isinstance(flags.get(name), str):
            flags[name] = [part.strip() for part in flags[name].split(",") if part.strip()]
    paths = {name: str(value) for name, value in flags.items() if isinstance(value, Path)}
    return cls(**{**flags, **paths})


def extract(**flags):
    """Stage one, like `python -m pipeline extract`; returns the ExtractResult (`.path` is the cache)."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract as run

    return run(_config(ExtractConfig, flags, ("layer",)))


@dataclass
class ClassifyResult:
    run_dir: Path
    leaderboard: pd.DataFrame  # best first (see classifiers.stats.choose)
    best_model: Path  # the folder `predict(model=...)` takes
    report: Path  # report.html
    datasets: list["ClassifyResult"] = field(default_factory=list)  # when several datasets were selected: one each


def _result(run_dir: Path) -> ClassifyResult:
    return ClassifyResult(run_dir, pd.read_csv(run_dir / "leaderboard.csv"), run_dir / "best", run_dir / "report.html")


def classify(**flags) -> ClassifyResult:
    """Stage two, like `python -m pipeline classify`."""
    from pipeline.classification import ClassifyConfig
    from pipeline.classification import classify as run
    from pipeline.classification import dataset_runs

    run_dir = run(_config(ClassifyConfig, flags, ("layer", "reduce")))
    runs = [_result(path) for path in dataset_runs(run_dir)]
    if len(runs) == 1:
        return runs[0]
    # several datasets: each ranked on its own; the first is the one `leaderboard`, `best_model` and `report` show
    return dataclasses.replace(runs[0], run_dir=run_dir, report=run_dir / "index.html", datasets=runs)


@dataclass
class PredictResult:
    csv: Path
    predictions: pd.DataFrame  # path, predicted, p_<class>..., [label]


def predict(**flags) -> PredictResult:
    """A saved model on new images, like `python -m pipeline predict`."""
    from pipeline.prediction import PredictConfig
    from pipeline.prediction import predict as run

    csv = run(_config(PredictConfig, flags))
    return PredictResult(csv, pd.read_csv(csv, keep_default_na=False))


def audit(features, layer: str | None = None, reduce: str | None = None, threshold: float | None = None,
          memory_budget: str = "2GiB", seed: int = 0):
    """The data audit of one cache, like `python -m pipeline audit` without the files: an Audit of tables."""
    from classifiers.audit import DUPLICATE_SIMILARITY, audit_cache
    from classifiers.data import open_cache
    from classifiers.memory import parse_bytes

    return audit_cache(open_cache(features), layer, reduce, parse_bytes(memory_budget), seed,
                       DUPLICATE_SIMILARITY if threshold is None else threshold)
