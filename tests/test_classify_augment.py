"""Stage two on caches with augmented views (docs/augment.md): folds group the views of one image, only clean
views are scored, near-copies cannot leak across folds, and the gain table compares clean and augmented caches."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from classifiers.data import open_cache
from classifiers.evaluate import evaluate, plan_evaluation
from classifiers.heads import get_head
from classifiers.holdout import holdout_mask
from classifiers.report import augment_gains, rank
from classifiers.testing import separable, with_views, write_cache
from features.errors import UsageError
from pipeline.classification import ClassifyConfig, classify, dataset_runs


def _augmented(path, X, y, split=None, k=3, noise=0.05, **attrs):
    rows = with_views(X, y, split, k=k, noise=noise)
    return write_cache(path, {"vec": rows.pop("X")}, **rows, **attrs)


def _straddlers(cache, fit_rows, score_rows) -> set[str]:
    """Images with rows on both sides of a split."""
    return set(cache.paths[fit_rows]) & set(cache.paths[score_rows])


def test_views_of_an_image_never_straddle_outer_or_inner_folds(tmp_path):
    X, y = separable(20, 3, 8, seed=1)
    cache = open_cache(_augmented(tmp_path / "a.h5", X, y, k=3))
    assert len(cache.labels) == 60 * 4 and cache.augment == "toy×3"
    plan = plan_evaluation(cache.labels, cache.split, cache.label_names, 5, 0, images=cache.images, view=cache.view)
    assert plan.scheme == "cv5" and plan.inner_cv == 5
    scored = np.concatenate([score for _, score in plan.folds])
    assert sorted(scored.tolist()) == np.flatnonzero(cache.view == 0).tolist()  # every image scored once, clean
    for fit_rows, score_rows in plan.folds:
        assert not _straddlers(cache, fit_rows, score_rows)
        assert set(np.unique(cache.view[fit_rows])) == {0, 1, 2, 3}  # training parts take every view
        for inner_fit, inner_score in plan.inner_folds(fit_rows, cache.labels[fit_rows], 0):
            assert not _straddlers(cache, fit_rows[inner_fit], fit_rows[inner_score])
            assert (cache.view[fit_rows[inner_score]] == 0).all()


def test_without_views_the_folds_are_the_stratified_row_folds_of_before(tmp_path):
    """A clean cache (no `view` dataset) is split exactly as before augmentation existed."""
    from sklearn.model_selection import StratifiedKFold

    X, y = separable(12, 2, 4, seed=0)
    cache = open_cache(write_cache(tmp_path / "c.h5", {"vec": X}, y))
    assert (cache.view == 0).all() and cache.augment == ""
    plan = plan_evaluation(cache.labels, cache.split, cache.label_names, 3, 7, images=cache.images, view=cache.view)
    expected = StratifiedKFold(3, shuffle=True, random_state=7).split(X, y)
    for (fit, score), (a, b) in zip(plan.folds, expected):
        assert fit.tolist() == a.tolist() and score.tolist() == b.tolist()


def test_only_clean_views_are_scored(tmp_path):
    """Augmented views here are huge noise: scored, they would pull accuracy to chance and double the count."""
    X, y = separable(30, 3, 16, seed=3)
    split = np.array(["train", "val"] * 45)
    rows = with_views(X, y, split, k=2, noise=40.0)
    path = write_cache(tmp_path / "noisy.h5", {"vec": rows.pop("X")}, **rows)
    no_split = _augmented(tmp_path / "noisy_cv.h5", X, y, k=2, noise=40.0)
    run = classify(ClassifyConfig(features=f"{path},{no_split}", heads="knn", cv=3, out=str(tmp_path / "run"),
                                  save_all=True))
    runs = dataset_runs(run)  # two datasets (one with splits, one without): each ranked on its own
    assert len(runs) == 2
    board = pd.concat([pd.read_csv(r / "leaderboard.csv") for r in runs]).set_index("scheme")
    assert board.loc["val", "n_eval"] == 45 and board.loc["val", "n_fit"] == 45 * 3
    assert board.loc["val", "n_fit_images"] == 45 and board.loc["cv3", "n_eval"] == 90
    assert board["accuracy"].min() == 1.0
    for model in (m for r in runs for m in (r / "models").iterdir()):
        oof = pd.read_csv(model / "eval_predictions.csv")
        assert oof["path"].is_unique and len(oof) in (45, 90)


def test_near_copies_in_views_do_not_inflate_cv_accuracy_on_shuffled_labels(tmp_path):
    """Leakage guard: 1-NN finds an image's own near-copy whenever its views straddle folds."""
    X, y = separable(40, 2, 32, seed=4)
    shuffled = np.random.default_rng(1).permutation(y)
    cache = open_cache(_augmented(tmp_path / "leak.h5", X, shuffled, k=4, noise=0.01))
    knn = get_head("knn")
    grouped = plan_evaluation(cache.labels, cache.split, cache.label_names, 5, 0, images=cache.images,
                              view=cache.view)
    rows = np.arange(len(cache.labels))
    with h5py.File(cache.path) as file:
        X_all = file["features/vec"][:]
    honest = evaluate(knn, X_all, cache.labels, rows, grouped, 2, seed=0).scores["accuracy"]
    leaky = evaluate(knn, X_all, cache.labels, rows,
                     plan_evaluation(cache.labels, cache.split, cache.label_names, 5, 0), 2, seed=0)
    assert honest < 0.5 + 0.15, honest
    assert leaky.scores["accuracy"] > 0.9  # row-level folds: the guard above has teeth
    run = classify(ClassifyConfig(features=str(cache.path), heads="knn,logreg", out=str(tmp_path / "run")))
    assert pd.read_csv(run / "leaderboard.csv")["accuracy"].max() < 0.5 + 0.15


def test_gain_table_compares_clean_and_augmented_caches(tmp_path):
    X, y = separable(25, 2, 12, seed=5, spread=2.5)  # overlapping classes: the heads are not all perfect
    clean = write_cache(tmp_path / "clean.h5", {"vec": X}, y)
    augmented = _augmented(tmp_path / "aug.h5", X, y, k=2, noise=0.3, source_fingerprint="other")
    run = classify(ClassifyConfig(features=f"{clean},{augmented}", heads="logreg,ridge", cv=3,
                                  out=str(tmp_path / "run")))
    board = pd.read_csv(run / "leaderboard.csv")
    assert sorted(board["augment"].fillna("")) == ["", "", "toy×2", "toy×2"]
    gains = pd.read_csv(run / "augment_gain.csv")
    assert sorted(gains["head"]) == ["logreg", "ridge"] and (gains["augment"] == "toy×2").all()
    for _, row in gains.iterrows():
        pick = board[board["head"] == row["head"]].fillna({"augment": ""}).set_index("augment")
        assert row["gain"] == pytest.approx(pick.loc["toy×2", "accuracy"] - pick.loc["", "accuracy"])
        assert row["n_fit_images"] == 50 and row["n_fit"] == 150
    report = (run / "report.md").read_text()
    assert "## Gain from augmentation" in report and "toy×2" in report
    alone = classify(ClassifyConfig(features=str(clean), heads="ridge", out=str(tmp_path / "alone")))
    assert not (alone / "augment_gain.csv").exists() and "augment" not in (alone / "leaderboard.md").read_text()


def test_gains_pair_each_augmented_row_with_its_clean_twin_on_known_accuracies():
    """Hand-made leaderboard rows: the gain is augmented minus clean accuracy of the same data, layer and head;
    a row without a clean twin gets none; the leaderboard carries the gain on the augmented row only."""
    same = {"data_id": "d", "backbone": "lite0", "reduce": "none", "scheme": "val", "balanced_accuracy": 0.5,
            "log_loss": 0.3, "n_fit_images": 40, "cache": "c"}
    rows = [{**same, "layer": "avg_pool", "head": "logreg", "augment": "", "accuracy": 0.80, "fit_s": 2.0},
            {**same, "layer": "avg_pool", "head": "logreg", "augment": "standard×4", "accuracy": 0.86, "fit_s": 10.0,
             "n_fit": 200, "cache": "a"},
            {**same, "layer": "avg_pool", "head": "ridge", "augment": "", "accuracy": 0.90, "fit_s": 1.0},
            {**same, "layer": "avg_pool", "head": "ridge", "augment": "standard×4", "accuracy": 0.85, "fit_s": 3.0,
             "n_fit": 200, "cache": "a"},
            {**same, "layer": "top", "head": "logreg", "augment": "standard×4", "accuracy": 0.70, "fit_s": 1.0,
             "n_fit": 200, "cache": "a"}]
    gains = augment_gains(pd.DataFrame(rows))
    assert list(gains["head"]) == ["logreg", "ridge"]  # best gain first; the `top` row has no clean twin
    np.testing.assert_allclose(gains["gain"], [0.06, -0.05], atol=1e-12)
    np.testing.assert_allclose(gains["fit_s_ratio"], [5.0, 3.0])
    board = rank(rows)
    gain = {(r.layer, r.head, r.augment): r.augment_gain for r in board.itertuples()}
    assert gain[("avg_pool", "logreg", "standard×4")] == pytest.approx(0.06)
    assert gain[("avg_pool", "ridge", "standard×4")] == pytest.approx(-0.05)
    assert np.isnan(gain[("avg_pool", "logreg", "")]) and np.isnan(gain[("top", "logreg", "standard×4")])


def test_saved_model_extracts_clean_views_at_predict_time(tmp_path):
    X, y = separable(10, 2, 6, seed=6)
    path = _augmented(tmp_path / "a.h5", X, y, k=2, augment_seed=3,
                      config_json=json.dumps({"backbone": "toynet", "augment": 2, "augment_policy": "toy"}))
    run = classify(ClassifyConfig(features=str(path), heads="ridge", cv=2, out=str(tmp_path / "run")))
    record = json.loads((run / "best" / "model.json").read_text())
    assert json.loads(record["config_json"])["augment"] == 0
    assert (record["augment"], record["augment_policy"], record["augment_seed"]) == (2, "toy", 3)
    assert record["n_fit"] == 60


def test_streaming_heads_group_views_in_their_validation_split(tmp_path):
    X, y = separable(40, 2, 16, seed=7)
    rows = with_views(X, y, k=3)
    images = np.unique(rows["paths"], return_inverse=True)[1]
    held = holdout_mask(rows["labels"], 0.2, np.random.default_rng(0), images)
    for image in np.unique(images):
        assert len(set(held[images == image])) == 1  # an image is held out with all its views, or not at all
    assert held.sum() == 4 * 16  # 20 % of the 40 images per class, 4 rows each
    path = write_cache(tmp_path / "a.h5", {"vec": rows.pop("X")}, **rows)
    run = classify(ClassifyConfig(features=str(path), heads="sgd", cv=2, memory_budget="100KiB",
                                  out=str(tmp_path / "run")))
    board = pd.read_csv(run / "leaderboard.csv")
    assert bool(board.loc[0, "streamed"]) and board.loc[0, "accuracy"] > 0.95 and board.loc[0, "n_eval"] == 80


def test_augmented_views_outside_train_are_refused(tmp_path):
    X, y = separable(4, 2, 3)
    rows = with_views(X, y, np.array(["train", "val"] * 4), k=1)
    rows["split"][:] = "val"  # now an augmented view claims to be an evaluation image
    path = write_cache(tmp_path / "bad.h5", {"vec": rows.pop("X")}, **rows)
    with pytest.raises(UsageError, match=r"augmented row\(s\) unlabelled or outside the 'train' split.*view 1"):
        open_cache(path)
