"""Intervals, paired tests and the best-model choice (classifiers/stats.py) on cases with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classifiers.report import rank
from classifiers.stats import bootstrap_ci, choose, explain, fold_ci, mcnemar_p


def test_bootstrap_interval_matches_the_normal_approximation_for_many_images():
    correct = np.r_[np.ones(360), np.zeros(40)].astype(bool)  # accuracy 0.9 on 400 images
    low, high = bootstrap_ci(correct)
    half = 1.96 * np.sqrt(0.9 * 0.1 / 400)
    assert low == pytest.approx(0.9 - half, abs=0.006) and high == pytest.approx(0.9 + half, abs=0.006)


def test_fold_interval_is_a_t_interval_of_the_fold_scores():
    folds = np.array([0.8, 0.9, 0.85, 0.95, 0.9])
    low, high = fold_ci(folds.mean(), folds.std(), len(folds))
    half = 2.776 * folds.std(ddof=1) / np.sqrt(5)  # t(0.975, 4) = 2.776
    assert (low, high) == pytest.approx((folds.mean() - half, folds.mean() + half), abs=1e-3)


def test_mcnemar_counts_only_the_images_where_the_heads_disagree():
    index = [f"img{i}" for i in range(100)]
    a = pd.Series(np.arange(100) >= 10, index=index)  # wrong on 0..9
    b = pd.Series(np.arange(100) >= 0, index=index)  # always right: 10 discordant pairs, all for b
    assert mcnemar_p(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p(a, b.iloc[10:]) == 1.0  # paired on the images both scored: there they agree


def _row(head: str, accuracy: float, log_loss: float, fit_s: float) -> dict:
    return {"data_id": "d", "backbone": "net", "layer": "avg_pool", "reduce": "none", "head": head, "scheme": "val",
            "augment": "", "cache": "c.h5", "accuracy": accuracy, "balanced_accuracy": accuracy,
            "log_loss": log_loss, "fit_s": fit_s, "n_fit": 100, "n_fit_images": 100}


def _correct(wrong: range, n: int = 150) -> pd.Series:
    return pd.Series(~np.isin(np.arange(n), list(wrong)), index=[f"d:{i}" for i in range(n)])


def test_among_heads_tied_with_the_top_the_lower_log_loss_wins():
    rows = [_row("knn", 140 / 150, 2.26, 0.1), _row("logreg", 139 / 150, 0.19, 0.5), _row("sgd", 100 / 150, 0.5, 0.1)]
    correct = {0: _correct(range(10)), 1: _correct(range(11)), 2: _correct(range(50))}
    table = rank(rows, correct)
    assert list(table["head"]) == ["logreg", "knn", "sgd"]
    assert list(table["tied"]) == [True, True, False]
    assert table.loc[2, "p_vs_top"] < 1e-6 and table.loc[0, "ci_low"] < 139 / 150 < table.loc[0, "ci_high"]
    assert "lowest log-loss" in explain(table) and "`logreg`" in explain(table)


def test_without_per_image_results_the_accuracy_order_stands():
    rows = [_row("knn", 0.90, 2.0, 0.1), _row("logreg", 0.95, 0.2, 0.5)]
    table = rank(rows)
    assert list(table["head"]) == ["logreg", "knn"] and list(table["tied"]) == [True, False]


def test_a_faster_head_wins_a_tie_of_equal_log_loss():
    table = pd.DataFrame([_row("slow", 0.9, 0.3, 5.0), _row("fast", 0.9, 0.3, 0.1)]).assign(row_id=[0, 1])
    chosen = choose(table, {0: _correct(range(15)), 1: _correct(range(15))})
    assert list(chosen["head"]) == ["fast", "slow"]


def test_audit_finds_planted_duplicates_and_outliers_in_synthetic_features():
    from classifiers.audit import audit
    from classifiers.testing import separable

    X, y = separable(30, 3, 64, seed=1, spread=2.0)
    X = np.abs(X)
    X[5] = X[40] * 1.01  # a near copy, in another split below
    X[7] = 50 * np.random.default_rng(2).normal(size=64)  # far from everything
    meta = pd.DataFrame({"path": [f"img{i}.jpg" for i in range(len(y))], "y": y,
                         "split": np.where(np.arange(len(y)) % 2, "val", "train"),
                         "label": np.array(["a", "b", "c"])[y]})
    found = audit(X, meta, ["a", "b", "c"], threshold=0.999)
    pair = found.duplicates.iloc[0]
    assert {pair["path_a"], pair["path_b"]} == {"img5.jpg", "img40.jpg"} and pair["cross_split"]
    assert "img7.jpg" in set(found.outliers["path"])
