"""classifiers/stats.py to the last number: each interval recomputed directly from its definition, the boundaries of
every rule (a tie at p == ALPHA, two folds, one image), the intervals a re-ranked CSV keeps, and `explain`'s exact
sentences. Written against the mutants `make mutate MODULES=classifiers/stats.py` left alive (docs/testing.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, t

from classifiers import stats
from classifiers.stats import ALPHA, N_BOOT, bootstrap_ci, choose, explain, fold_ci, mcnemar_p


def binomial_bootstrap(correct: np.ndarray, seed: int) -> tuple[float, float]:
    """The interval as documented: N_BOOT Binomial(n, accuracy) draws from default_rng(seed), 2.5/97.5 percentiles."""
    n = len(correct)
    draws = np.random.default_rng(seed).binomial(n, correct.mean(), size=N_BOOT) / n
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


CORRECT = np.arange(100_000) % 7 != 0  # 6/7 right: a grid fine enough that seeds 0, 1 and 7 give three intervals


def test_bootstrap_interval_is_the_seeded_binomial_percentile_interval():
    assert bootstrap_ci(CORRECT) == pytest.approx(binomial_bootstrap(CORRECT, 0), abs=1e-12)  # default seed 0
    assert bootstrap_ci(CORRECT, seed=7) == pytest.approx(binomial_bootstrap(CORRECT, 7), abs=1e-12)
    assert bootstrap_ci(CORRECT, seed=1) != pytest.approx(bootstrap_ci(CORRECT, seed=0), abs=1e-6)
    assert bootstrap_ci(CORRECT, seed=7) != pytest.approx(bootstrap_ci(CORRECT, seed=0), abs=1e-6)
    assert bootstrap_ci(CORRECT, seed=7) == bootstrap_ci(CORRECT, seed=7)  # reproducible, never the OS's entropy


def test_bootstrap_of_no_images_is_nan_and_of_one_image_is_that_image():
    assert np.isnan(bootstrap_ci(np.array([], bool))).all()
    assert bootstrap_ci(np.array([True])) == (1.0, 1.0) and bootstrap_ci(np.array([False])) == (0.0, 0.0)


def test_fold_interval_from_two_folds_on_and_nan_below_or_without_a_spread():
    half = t.ppf(0.975, 1) * 0.05 / np.sqrt(1)  # two folds: one degree of freedom, std / sqrt(folds - 1)
    assert fold_ci(0.8, 0.05, 2) == pytest.approx((0.8 - half, min(1.0, 0.8 + half)))
    assert fold_ci(0.5, 0.05, 3) == pytest.approx((0.5 - t.ppf(0.975, 2) * 0.05 / np.sqrt(2),
                                                   0.5 + t.ppf(0.975, 2) * 0.05 / np.sqrt(2)))
    assert np.isnan(fold_ci(0.8, 0.05, 1)).all() and np.isnan(fold_ci(0.8, 0.05, 0)).all()
    assert np.isnan(fold_ci(0.8, np.nan, 5)).all()


def test_fold_interval_is_clipped_to_zero_and_one():
    low, high = fold_ci(0.98, 0.2, 5)
    assert high == 1.0 and low == pytest.approx(0.98 - t.ppf(0.975, 4) * 0.2 / 2)
    assert fold_ci(0.02, 0.2, 5)[0] == 0.0


def test_mcnemar_of_heads_with_no_image_in_common_is_nan_and_of_balanced_disagreement_is_one():
    a = pd.Series([True, False], index=["x", "y"])
    assert np.isnan(mcnemar_p(a, pd.Series([True], index=["z"])))
    b = pd.Series([False, True, True], index=["x", "y", "z"])  # one discordant pair each way
    assert mcnemar_p(a, b) == 1.0
    c = pd.Series([False, True] * 10, index=[f"i{k}" for k in range(20)])
    d = pd.Series([True] * 20, index=c.index)  # 10 pairs all for d, and 3 more the other way
    d.iloc[[1, 3, 5]] = False
    assert mcnemar_p(c, d) == pytest.approx(binomtest(3, 13, 0.5).pvalue)


def _table(*rows: dict) -> pd.DataFrame:
    base = {"head": "h", "layer": "avg_pool", "reduce": "none", "scheme": "val", "accuracy": 0.9, "log_loss": 0.3,
            "fit_s": 1.0}
    return pd.DataFrame([{**base, **row} for row in rows]).assign(row_id=lambda df: np.arange(len(df)))


def _correct(wrong, n: int = 1000) -> pd.Series:
    return pd.Series(~np.isin(np.arange(n), list(wrong)), index=[f"img{i}" for i in range(n)])


def test_choose_adds_exactly_its_four_columns_and_pairs_every_row_with_the_first():
    table = _table({"head": "a", "accuracy": 0.85}, {"head": "b", "accuracy": 0.84}, {"head": "c", "accuracy": 0.70})
    correct = {0: _correct(range(150)), 1: _correct(range(160)), 2: _correct(range(300))}
    chosen = choose(table, correct, seed=3)  # seeds 0 and 3 give row 0 two intervals (checked below)
    assert list(chosen.columns) == [*table.columns, "ci_low", "ci_high", "p_vs_top", "tied"]
    assert list(chosen.index) == [0, 1, 2]
    assert list(chosen["p_vs_top"]) == [1.0, binomtest(0, 10).pvalue, binomtest(0, 150).pvalue]
    for row in range(3):
        assert (chosen.loc[row, "ci_low"], chosen.loc[row, "ci_high"]) == bootstrap_ci(
            correct[row].to_numpy(), seed=3)
    assert (chosen.loc[0, "ci_low"], chosen.loc[0, "ci_high"]) != bootstrap_ci(correct[0].to_numpy())
    default = choose(table, correct)
    assert (default.loc[0, "ci_low"], default.loc[0, "ci_high"]) == bootstrap_ci(correct[0].to_numpy(), seed=0)


def test_a_p_value_of_exactly_alpha_is_a_tie(monkeypatch):
    monkeypatch.setattr(stats, "mcnemar_p", lambda a, b: ALPHA)
    table = _table({"head": "top", "accuracy": 0.95, "log_loss": 0.9}, {"head": "calibrated", "log_loss": 0.1})
    chosen = choose(table, {0: _correct([]), 1: _correct([])})
    assert list(chosen["tied"]) == [True, True] and list(chosen["head"]) == ["calibrated", "top"]


def test_rows_without_per_image_results_are_not_paired():
    table = _table({"head": "a", "accuracy": 0.95}, {"head": "b", "log_loss": 0.1}, {"head": "c", "log_loss": 0.01})
    only_two = choose(table, {0: _correct(range(10)), 1: _correct(range(11))})  # c failed: no per-image results
    assert list(only_two["head"]) == ["b", "a", "c"] and np.isnan(only_two.loc[2, "p_vs_top"])
    no_top = choose(table, {1: _correct(range(11)), 2: _correct(range(12))})  # nothing to pair with
    assert list(no_top["head"]) == ["a", "b", "c"] and no_top["p_vs_top"].isna().all()
    assert list(no_top["tied"]) == [True, False, False]


def test_with_only_the_top_tied_the_accuracy_order_stands_whatever_the_log_losses():
    table = _table({"head": "a", "accuracy": 0.95, "log_loss": 0.9}, {"head": "b", "accuracy": 0.7, "log_loss": 0.5},
                   {"head": "c", "accuracy": 0.6, "log_loss": 0.1, "fit_s": 0.1})
    chosen = choose(table, {0: _correct([]), 1: _correct(range(60)), 2: _correct(range(80))})
    assert list(chosen["head"]) == ["a", "b", "c"] and list(chosen["tied"]) == [True, False, False]


def test_a_missing_log_loss_counts_as_an_infinite_one_so_the_faster_fit_wins():
    table = _table({"head": "inf", "log_loss": np.inf, "fit_s": 2.0}, {"head": "nan", "log_loss": np.nan, "fit_s": 1.0})
    chosen = choose(table, {0: _correct(range(5)), 1: _correct(range(5))})
    assert list(chosen["head"]) == ["nan", "inf"]


def test_a_re_ranked_csv_keeps_its_intervals_and_fresh_results_replace_them():
    table = _table({"head": "a", "ci_low": 0.1, "ci_high": 0.2}, {"head": "b", "ci_low": np.nan, "ci_high": np.nan})
    kept = choose(table)
    assert (kept.loc[0, "ci_low"], kept.loc[0, "ci_high"]) == (0.1, 0.2)
    assert np.isnan(kept.loc[1, "ci_low"]) and np.isnan(kept.loc[1, "ci_high"])
    fresh = choose(table, {0: _correct(range(20))})
    assert (fresh.loc[0, "ci_low"], fresh.loc[0, "ci_high"]) == bootstrap_ci(_correct(range(20)).to_numpy())


@pytest.mark.parametrize("folds", [5, 10])
def test_a_cross_validated_row_gets_the_t_interval_of_its_folds(folds):
    table = _table({"scheme": f"cv{folds}", "accuracy": 0.85, "accuracy_std": 0.04})
    chosen = choose(table, {0: _correct(range(30))})  # per-image results do not replace the fold interval
    half = t.ppf(0.975, folds - 1) * 0.04 / np.sqrt(folds - 1)
    assert (chosen.loc[0, "ci_low"], chosen.loc[0, "ci_high"]) == pytest.approx((0.85 - half, 0.85 + half))
    assert choose(_table({"scheme": "cv5", "accuracy": 0.85}))[["ci_low", "ci_high"]].isna().all(axis=None)


def _explained(rows, correct=None) -> pd.DataFrame:
    return choose(_table(*rows), correct)


def test_explain_says_why_a_lone_top_is_best():
    table = _explained([{"head": "logreg", "accuracy": 0.9512}, {"head": "knn", "accuracy": 0.5}],
                       {0: _correct([]), 1: _correct(range(100))})
    assert explain(table) == ("`logreg` on avg_pool/none has the highest accuracy (0.9512); no other row is "
                              "statistically tied with it (exact McNemar test on the same images, p < 0.05).")


def test_explain_names_the_log_losses_of_at_most_four_other_tied_rows():
    heads = ["best", "h1", "h2", "nan", "h3", "h4", "h5"]
    losses = [0.05, 0.1, 0.2, np.nan, 0.3, 0.4, 0.5]
    rows = [{"head": h, "accuracy": 0.9, "log_loss": x} for h, x in zip(heads, losses)]
    table = _explained(rows, {i: _correct(range(20)) for i in range(len(rows))})
    best = table.iloc[0]
    assert list(table["head"]) == ["best", "h1", "h2", "h3", "h4", "h5", "nan"]
    assert explain(table) == (
        "7 rows are statistically tied with the top accuracy 0.9000 (exact McNemar test on the same images, p >= "
        "0.05); among them `best` on avg_pool/none has the lowest log-loss (0.05; vs h1/avg_pool 0.1, h2/avg_pool "
        "0.2, h3/avg_pool 0.3, h4/avg_pool 0.4; equal log-losses would go to the faster fit), so it is the best "
        f"model (accuracy 0.9000, 95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f}).")
    two = _explained([rows[0], rows[3]], {0: _correct(range(20)), 1: _correct(range(20))})  # no other loss known
    assert "lowest log-loss (0.05; equal log-losses would go to the faster fit), so" in explain(two)
