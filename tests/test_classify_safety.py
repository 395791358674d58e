"""classify survives a tiny class and a failing head, and never mixes two runs in one results folder
(issue 10: item 9 and 'Mixes runs')."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier

from classifiers.heads import HEADS, HeadSpec
from classifiers.testing import separable, write_cache
from features.errors import UsageError
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main


@pytest.fixture
def ants_and_a_bee(tmp_path):
    """10 ants + 1 bee + 6 wasps: the lone bee once crashed the whole run inside scikit-learn."""
    X, y = separable(10, 3, 8, seed=3)
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:1], np.flatnonzero(y == 2)[:6]]
    return write_cache(tmp_path / "tiny.h5", {"vec": X[keep]}, y[keep], label_names=["ants", "bees", "wasps"])


class Broken(DummyClassifier):
    def fit(self, X, y, **kwargs):
        raise RuntimeError("this head is broken")


@pytest.fixture
def broken_head(monkeypatch):
    monkeypatch.setitem(HEADS, "broken", HeadSpec("broken", lambda random_state: Broken(), {}, False, False, "raises"))


def test_a_class_too_small_to_fit_is_dropped_with_a_warning(ants_and_a_bee, tmp_path, capsys):
    run = classify(ClassifyConfig(features=str(ants_and_a_bee), heads="ridge", cv=3, out=str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert "dropped class(es) 'bees' (1 image): a class needs at least 2 images" in err
    board = pd.read_csv(run / "leaderboard.csv")
    assert list(board["status"]) == ["ok"] and board["n_fit"].eq(16).all()
    assert board["accuracy"].min() > 0.9  # ants and wasps are separable
    assert set(pd.read_csv(run / "best" / "eval_predictions.csv")["label"]) == {"ants", "wasps"}


def test_fewer_than_two_classes_left_is_refused_in_one_line(tmp_path, capsys):
    X, y = separable(10, 2, 8, seed=3)
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:1]]  # 10 ants + 1 bee
    path = write_cache(tmp_path / "t.h5", {"vec": X[keep]}, y[keep], label_names=["ants", "bees"])
    assert main(["classify", "--features", str(path), "--heads", "logreg", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("only 1 class(es) ('ants') have at least 2 images; too few: 'bees' (1 image). classify needs two "
            "classes") in err
    assert not (tmp_path / "r").exists()


def test_a_failing_head_is_recorded_and_the_others_are_saved(ants_and_a_bee, tmp_path, broken_head, capsys):
    run = classify(ClassifyConfig(features=str(ants_and_a_bee), heads="broken,ridge", cv=3,
                                  out=str(tmp_path / "run"), save_all=True))
    board = pd.read_csv(run / "leaderboard.csv").set_index("head")
    assert board.loc["broken", "status"] == "failed" and np.isnan(board.loc["broken", "accuracy"])
    assert board.loc["broken", "error"] == "RuntimeError: this head is broken"
    assert board.loc["ridge", "status"] == "ok" and board.loc["ridge", "rank"] == 1
    assert json.loads((run / "best" / "model.json").read_text())["head"] == "ridge"
    assert [d.name.rsplit("__", 1)[1] for d in (run / "models").iterdir()] == ["ridge"]
    assert "head 'broken' failed (RuntimeError: this head is broken)" in capsys.readouterr().err
    assert "RuntimeError: this head is broken" in (run / "leaderboard.md").read_text()


def test_every_head_failing_is_one_line(ants_and_a_bee, tmp_path, broken_head):
    with pytest.raises(UsageError, match="every head failed: broken: RuntimeError: this head is broken"):
        classify(ClassifyConfig(features=str(ants_and_a_bee), heads="broken", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == [ants_and_a_bee]  # .tiny.h5.lock aside


def test_a_results_folder_never_mixes_two_runs(ants_and_a_bee, tmp_path):
    X, y = separable(8, 2, 8, seed=5)
    other = write_cache(tmp_path / "other.h5", {"vec": X}, y)
    out = tmp_path / "R"
    cfg = ClassifyConfig(features=str(ants_and_a_bee), heads="ridge,knn", cv=2, out=str(out), save_all=True)
    classify(cfg)
    (out / "models" / "stale").mkdir()  # a file the next run of the same command does not write
    before = (out / "leaderboard.csv").read_text()

    with pytest.raises(UsageError, match=r"--out '.*R' is not empty and is an earlier classify run with another "
                                         r"configuration; it is left as it is"):
        classify(ClassifyConfig(features=str(other), heads="ridge", out=str(out)))
    assert (out / "leaderboard.csv").read_text() == before and (out / "models" / "stale").is_dir()

    classify(ClassifyConfig(**cfg.__dict__))  # the same command again replaces the run as a whole
    assert not (out / "models" / "stale").exists()
    assert sorted(d.name.rsplit("__", 1)[1] for d in (out / "models").iterdir()) == ["knn", "ridge"]
    # no staging folder left (the caches' hidden lock files stay by design)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".h5.lock")] == []

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    with pytest.raises(UsageError, match="is not empty and is not a classify results folder"):
        classify(ClassifyConfig(features=str(other), heads="ridge", out=str(tmp_path / "notes")))
    (tmp_path / "file").write_text("mine\n")
    with pytest.raises(UsageError, match=r"--out '.*file' is a file. Expected a results folder"):
        classify(ClassifyConfig(features=str(other), heads="ridge", out=str(tmp_path / "file")))
    assert (tmp_path / "file").read_text() == "mine\n" and (tmp_path / "notes" / "todo.txt").exists()
