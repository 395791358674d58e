"""`classify` on generated caches with a known answer: perfect when separable, chance when labels are shuffled,
honest splits, the files it writes, and one clear line for each user mistake."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from classifiers.testing import separable, write_cache
from features.errors import UsageError
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main


def _maps(X: np.ndarray, side: int = 4, seed: int = 0) -> np.ndarray:
    """Spatial maps whose average over H, W is X (plus zero-mean noise that cancels per row)."""
    noise = np.random.default_rng(seed).normal(size=(len(X), side, side, X.shape[1])).astype(np.float32)
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    return X[:, None, None, :] + noise


@pytest.fixture
def toy(tmp_path):
    """3 separable classes, a 4-D map layer and a 2-D vector layer, no splits, plus 10 unlabelled garbage rows."""
    X, y = separable(30, 3, 24, seed=1)
    garbage = np.random.default_rng(9).normal(scale=50, size=(10, 24)).astype(np.float32)
    X, y = np.r_[X, garbage], np.r_[y, -np.ones(10, int)]
    return write_cache(tmp_path / "toy.h5", {"map": _maps(X), "vec": X}, y, label_names=["a", "b", "c"])


def test_separable_toy_cache_is_classified_perfectly(toy, tmp_path):
    run = classify(ClassifyConfig(features=str(toy), heads="default", out=str(tmp_path / "run"), cv=3))
    board = pd.read_csv(run / "leaderboard.csv")
    assert len(board) == 2 * 5  # (map/avg, vec/none) x 5 default heads
    assert set(board["reduce"]) == {"avg", "none"} and set(board["scheme"]) == {"cv3"}
    assert board["accuracy"].min() == 1.0 and board["macro_f1"].min() == 1.0
    assert (board["n_fit"] == 90).all()  # the 10 unlabelled rows are never used
    record = json.loads((run / "best" / "model.json").read_text())
    assert record["class_names"] == ["a", "b", "c"] and record["seed"] == 0
    assert record["metrics"]["accuracy"] == 1.0 and record["backbone"] == "toynet"
    for key in ("source_fingerprint", "backbone_file_sha256", "weights", "layer", "pool", "image_size", "resize",
                "preprocessing", "dtype", "config_json", "reduce"):
        assert key in record
    oof = pd.read_csv(run / "best" / "eval_predictions.csv")
    assert len(oof) == 90 and (oof["label"] == oof["predicted"]).all()  # out-of-fold, every labelled row once
    for name in ("leaderboard.md", "report.md", "accuracy.png", "best/confusion_matrix.png", "best/model.skops"):
        assert (run / name).stat().st_size > 0
    assert "**Best:**" in (run / "report.md").read_text()


def test_shuffled_labels_score_at_chance(tmp_path):
    """Guards against leakage: with labels unrelated to the features nothing may beat chance by much."""
    X, y = separable(60, 3, 32, seed=2)
    shuffled = np.random.default_rng(5).permutation(y)
    path = write_cache(tmp_path / "shuffled.h5", {"vec": X}, shuffled)
    run = classify(ClassifyConfig(features=str(path), heads="logreg,knn,pca+logreg", out=str(tmp_path / "run")))
    board = pd.read_csv(run / "leaderboard.csv")
    assert board["accuracy"].max() < 1 / 3 + 0.15, board[["head", "accuracy"]]
    assert board["accuracy"].mean() == pytest.approx(1 / 3, abs=0.1)


def test_splits_fit_on_train_and_score_the_held_out_split_once(tmp_path):
    X, y = separable(40, 2, 16, seed=4)
    split = np.where(np.arange(len(y)) % 4 == 0, "val", "train")
    split[np.arange(len(y)) % 8 == 1] = "test"
    path = write_cache(tmp_path / "s.h5", {"vec": X}, y, split=split)
    run = classify(ClassifyConfig(features=str(path), heads="logreg", reduce=["pca8"], out=str(tmp_path / "run")))
    row = pd.read_csv(run / "leaderboard.csv").iloc[0]
    assert row["scheme"] == "test" and row["n_fit"] == (split == "train").sum()
    assert row["n_eval"] == (split == "test").sum() and row["accuracy"] == 1.0 and row["reduce"] == "pca8"
    scored = pd.read_csv(run / "best" / "eval_predictions.csv")
    assert set(scored["split"]) == {"test"}
    assert "scored on 'test'; the 'val' rows are not used" in (run / "report.md").read_text()


def test_tiny_and_imbalanced_classes_warn_instead_of_crashing(tmp_path, capsys):
    X, y = separable(20, 3, 8, seed=6)
    keep = np.r_[np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:2]]  # class 'c' has 2 images < 5 folds
    path = write_cache(tmp_path / "tiny.h5", {"vec": X[keep]}, y[keep], label_names=["a", "b", "c"])
    run = classify(ClassifyConfig(features=str(path), heads="logreg,ridge", out=str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert "fewer images than the 5 folds: 'c' (2)" in err and "imbalanced" in err
    assert pd.read_csv(run / "leaderboard.csv")["accuracy"].notna().all()


def test_grid_and_avgmax_reduce_spatial_maps(toy, tmp_path):
    run = classify(ClassifyConfig(features=str(toy), layer=["map"], heads="ridge", reduce=["grid2", "avgmax"],
                                  out=str(tmp_path / "run"), cv=3))
    board = pd.read_csv(run / "leaderboard.csv").set_index("reduce")
    assert board.loc["grid2", "dim"] == 4 * 24 and board.loc["avgmax", "dim"] == 2 * 24
    assert board["accuracy"].min() == 1.0


def _error_line(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit code 2 and exactly one stderr line; return it."""
    assert main(["classify", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_user_mistakes_give_one_clear_line(toy, tmp_path, capsys):
    missing = tmp_path / "nope.h5"
    assert f"'{missing}' does not exist" in _error_line(capsys, "--features", str(missing))
    incomplete = write_cache(tmp_path / "half.h5", {"vec": np.zeros((4, 2))}, [0, 1, 0, 1], complete=False)
    assert "is incomplete" in _error_line(capsys, "--features", str(incomplete))
    assert "Unknown head 'lgreg'" in _error_line(capsys, "--features", str(toy), "--heads", "lgreg")
    line = _error_line(capsys, "--features", str(toy), "--layer", "mapp")
    assert "Unknown layer 'mapp'" in line and "map, vec" in line
    assert "Unknown reduce 'avr'" in _error_line(capsys, "--features", str(toy), "--reduce", "avr")
    unlabelled = write_cache(tmp_path / "u.h5", {"vec": np.zeros((4, 2))}, [-1] * 4, label_names=["a"])
    assert "has no labelled images" in _error_line(capsys, "--features", str(unlabelled))
    assert "Invalid memory size '2 lots'" in _error_line(capsys, "--features", str(toy), "--memory-budget", "2 lots")


def test_default_features_are_the_complete_caches_in_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEATURE_CACHE_DIR", raising=False)
    with pytest.raises(UsageError, match="No complete feature caches under 'cache'"):
        classify(ClassifyConfig())
    (tmp_path / "cache").mkdir()
    X, y = separable(10, 2, 4)
    write_cache(tmp_path / "cache" / "ok.h5", {"vec": X}, y)
    write_cache(tmp_path / "cache" / "partial.h5", {"vec": X}, y, complete=False)
    run = classify(ClassifyConfig(heads="ridge", cv=2))
    assert run.parent.name == "results" and len(pd.read_csv(run / "leaderboard.csv")) == 1
    assert "skipped incomplete cache 'cache/partial.h5'" in capsys.readouterr().err
    monkeypatch.setenv("FEATURE_CACHE_DIR", "elsewhere")  # the folder is configurable
    with pytest.raises(UsageError, match="No complete feature caches under 'elsewhere'"):
        classify(ClassifyConfig())
