"""Learning curve: accuracy of one head against the number of training images per class.

Why: whether collecting more images pays is the first question after a leaderboard. The head keeps the
hyperparameters chosen on the full training set; for each size, `repeats` random draws of that many images per
class (all their views) are fitted and scored on the same held-out images (the first fold under CV).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from classifiers.data import take_rows
from classifiers.evaluate import Plan, class_scores
from classifiers.heads import HeadSpec
from classifiers.report import save_figure

SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
REPEATS = 5
BUDGET_S = 60.0  # seconds of fitting after which no larger size is started


def draw(images: np.ndarray, y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (into `images`/`y`) of every row of `per_class` random images of each class."""
    chosen = []
    for c in np.unique(y):
        ids = np.unique(images[y == c])
        chosen.append(rng.choice(ids, size=min(per_class, len(ids)), replace=False))
    return np.flatnonzero(np.isin(images, np.concatenate(chosen)))


def _accuracy(spec: HeadSpec, params: dict, X, rows: np.ndarray, y: np.ndarray, fit: np.ndarray,
              score: np.ndarray, seed: int) -> float:
    """Fit on positions `fit`, score on `score` (positions into X); NaN when the head cannot fit so few rows
    (e.g. k nearest neighbours with more neighbours than images)."""
    model = spec.build(seed).set_params(**params)
    X_score = take_rows(X, score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.fit(take_rows(X, fit), y[rows[fit]])
            scores, _ = class_scores(model, X_score, int(y.max()) + 1)
            predicted = np.argmax(scores, axis=1) if scores is not None else model.predict(X_score)
        except ValueError:
            return np.nan
    return float(np.mean(predicted == y[rows[score]]))


def _point(accs: np.ndarray, per_class: int, n_train: int) -> dict:
    ok = accs[~np.isnan(accs)]
    stats = {k: getattr(ok, k)() if len(ok) else np.nan for k in ("mean", "std", "min", "max")}
    return {"per_class": per_class, "n_train": n_train, "runs": len(ok), **stats}


def learning_curve(spec: HeadSpec, params: dict, X, rows: np.ndarray, y: np.ndarray, plan: Plan, seed: int = 0,
                   repeats: int = REPEATS, budget_s: float = BUDGET_S) -> pd.DataFrame:
    """One row per size: per_class, n_train (images), runs, mean, std, min, max accuracy. `X[i]` holds cache row
    `rows[i]`; `y` is per cache row. The last row is every training image (one run; per_class = the smallest
    class). Sizes stop growing once `budget_s` seconds are spent (slow heads such as mlp get fewer points)."""
    position = {row: i for i, row in enumerate(rows.tolist())}
    fit_rows, score_rows = plan.folds[0]
    fit = np.array([position[r] for r in fit_rows])
    score = np.array([position[r] for r in score_rows])
    images, labels = plan.images[fit_rows], y[fit_rows]
    smallest = min(len(np.unique(images[labels == c])) for c in np.unique(labels))
    rng, out, start = np.random.default_rng(seed), [], time.perf_counter()
    for n in [n for n in SIZES if n < smallest]:
        picks = [fit[draw(images, labels, n, rng)] for _ in range(repeats)]
        accs = np.array([_accuracy(spec, params, X, rows, y, p, score, seed) for p in picks])
        out.append(_point(accs, n, len(np.unique(plan.images[rows[picks[0]]]))))
        if time.perf_counter() - start > budget_s:
            break
    full = np.array([_accuracy(spec, params, X, rows, y, fit, score, seed)])
    return pd.DataFrame(out + [_point(full, smallest, len(np.unique(images)))])


def size_ticks(sizes: list[int], gap: float = 0.15) -> list[float]:
    """The sizes to label on the log axis: each one at least `gap` decades from the previous, so labels never
    overlap; the last (every training image) is always kept.

    >>> size_ticks([1, 2, 5, 10, 20, 21])
    [1.0, 2.0, 5.0, 10.0, 21.0]
    """
    kept: list[float] = []
    for i, size in enumerate(sorted(set(sizes))):
        if kept and np.log10(size) - np.log10(kept[-1]) < gap:
            if i < len(set(sizes)) - 1:
                continue
            kept.pop()
        kept.append(float(size))
    return kept


def plot_curve(curve: pd.DataFrame, head: str, path) -> None:
    """learning_curve.png: mean accuracy ± std (bars) and the range of draws (band), log-scaled size axis labelled
    with the plain counts drawn (1, 2, 5, 10, ...), not powers of ten."""
    import matplotlib.pyplot as plt  # Agg: classifiers.report sets it on import
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(curve["per_class"], curve["min"], curve["max"], alpha=0.2, label="range of draws")
    ax.errorbar(curve["per_class"], curve["mean"], yerr=curve["std"].fillna(0), marker="o", capsize=3,
                label=f"{head}: mean ± std")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(size_ticks(curve["per_class"].tolist())))
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0f}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training images per class")
    ax.set_ylabel("accuracy on the scored images")
    ax.set_title("Learning curve: does more data pay?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
