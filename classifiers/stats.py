"""Honest uncertainty for the leaderboard: 95% intervals, paired tests on the same images, and the best choice.

Why: on a few hundred scored images several heads often differ by one or two images. A row is *tied* with the top
when an exact McNemar test on the images both scored cannot tell them apart (p >= ALPHA); among the tied rows the
one with the lower log-loss (better calibrated probabilities) wins, then the faster fit. `choose` is the only
place that decides which model is "best".
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest, t

ALPHA = 0.05
LEVEL = 0.95
N_BOOT = 4000


def bootstrap_ci(correct: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """Percentile bootstrap of accuracy over the scored images. Resampling n images of which a fraction p is
    correct and counting the correct ones is a Binomial(n, p) draw, so no (n_boot, n) matrix is built."""
    n = len(correct)
    if n == 0:
        return np.nan, np.nan
    draws = np.random.default_rng(seed).binomial(n, float(np.mean(correct)), size=n_boot) / n
    tail = (1 - LEVEL) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def fold_ci(mean: float, std: float, folds: int) -> tuple[float, float]:
    """Student-t interval of the mean over CV folds (`std` is the population std of the fold scores)."""
    if folds < 2 or pd.isna(std):
        return np.nan, np.nan
    half = t.ppf(1 - (1 - LEVEL) / 2, folds - 1) * std / np.sqrt(folds - 1)
    return float(max(0.0, mean - half)), float(min(1.0, mean + half))


def mcnemar_p(a: pd.Series, b: pd.Series) -> float:
    """Exact McNemar p-value of two heads' correctness (bool Series indexed by image) on the images both scored."""
    a, b = a.align(b, join="inner")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0 if len(a) else np.nan
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def _interval(row: pd.Series, correct: pd.Series | None, seed: int) -> tuple[float, float]:
    """The row's 95% interval; one already in the row (a leaderboard re-ranked from its CSV) is kept."""
    if correct is None and not pd.isna(row.get("ci_low", np.nan)):
        return row["ci_low"], row["ci_high"]
    scheme = str(row["scheme"])
    if scheme.startswith("cv"):
        return fold_ci(row["accuracy"], row.get("accuracy_std", np.nan), int(scheme[2:]))
    return bootstrap_ci(correct.to_numpy(), seed) if correct is not None else (np.nan, np.nan)


def choose(table: pd.DataFrame, correct: dict[int, pd.Series] | None = None, seed: int = 0) -> pd.DataFrame:
    """The leaderboard with `ci_low`, `ci_high`, `p_vs_top` and `tied` columns, the chosen best row first.

    `table` is sorted by accuracy (best first) and has a `row_id` column keying `correct` (per row, a bool Series
    of correct predictions indexed by image path). Without `correct` nothing can be paired: only the top is tied.
    """
    correct = correct or {}
    top = correct.get(table["row_id"].iloc[0])
    cis = [_interval(row, correct.get(row["row_id"]), seed) for _, row in table.iterrows()]
    p = [mcnemar_p(correct[i], top) if top is not None and i in correct else np.nan for i in table["row_id"]]
    table = table.assign(ci_low=[c[0] for c in cis], ci_high=[c[1] for c in cis], p_vs_top=p)
    table["tied"] = table["p_vs_top"].fillna(0) >= ALPHA
    table.loc[table.index[0], "tied"] = True
    order = table.assign(_loss=table["log_loss"].fillna(np.inf), _untied=~table["tied"])
    order = order.sort_values(["_untied", "_loss", "fit_s"], kind="stable") if table["tied"].sum() > 1 else order
    return table.loc[order.index].reset_index(drop=True)


def explain(table: pd.DataFrame) -> str:
    """One paragraph for the report: why the first row of `choose`'s table is the best."""
    best, tied = table.iloc[0], table[table["tied"]]
    name = f"`{best['head']}` on {best['layer']}/{best['reduce']}"
    top = table.loc[table["accuracy"].idxmax()]
    if len(tied) == 1:
        return (f"{name} has the highest accuracy ({best['accuracy']:.4f}); no other row is statistically tied with "
                f"it (exact McNemar test on the same images, p < {ALPHA}).")
    others = tied.iloc[1:]
    losses = ", ".join(f"{r['head']}/{r['layer']} {r['log_loss']:.3g}" for _, r in others.head(4).iterrows()
                       if not pd.isna(r["log_loss"]))
    return (f"{len(tied)} rows are statistically tied with the top accuracy {top['accuracy']:.4f} (exact McNemar "
            f"test on the same images, p >= {ALPHA}); among them {name} has the lowest log-loss "
            f"({best['log_loss']:.3g}" + (f"; vs {losses}" if losses else "") + "; equal log-losses would go to the faster fit), "
            f"so it is the best model (accuracy {best['accuracy']:.4f}, 95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f}).")
