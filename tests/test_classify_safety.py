"""classify survives a tiny class, tiny data and a failing head, never mixes two runs in one results folder, and
never deletes what it did not write there (issue 10: item 9 and 'Mixes runs'; issue 23)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier

from classifiers.heads import HEADS, HeadSpec, list_heads
from classifiers.testing import separable, write_cache
from features.errors import UsageError
from pipeline import api, classification
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main
from tests.conftest import fails_in_one_line


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
    (out / "models" / "stale").mkdir()  # a folder the run did not write
    before = (out / "leaderboard.csv").read_text()

    with pytest.raises(UsageError, match=r"--out '.*R' is not empty and is an earlier classify run with another "
                                         r"configuration; it is left as it is"):
        classify(ClassifyConfig(features=str(other), heads="ridge", out=str(out)))
    with pytest.raises(UsageError, match=r"--out '.*R' holds what its earlier classify run did not write "
                                         r"\(models/stale\); classify replaces only its own run"):
        classify(ClassifyConfig(**cfg.__dict__))
    assert (out / "leaderboard.csv").read_text() == before and (out / "models" / "stale").is_dir()

    (out / "models" / "stale").rmdir()
    classify(ClassifyConfig(**cfg.__dict__))  # the same command again replaces its own run as a whole
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


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_deletes_nothing_classify_did_not_write(tmp_path, capsys, monkeypatch):
    """Issue 23: the same classify again into its results folder deleted predict's CSVs there and a file the user
    put there. Now it refuses in one line and leaves the folder as it was; and the report cites the results folder,
    not the staging folder it was written in."""
    X, y = separable(8, 2, 8, seed=5)
    cache = write_cache(tmp_path / "c.h5", {"vec": X}, y)
    out = tmp_path / "R"
    argv = ["classify", "--features", str(cache), "--heads", "ridge", "--cv", "2", "--out", str(out), "--no-report"]
    assert main(argv) == 0
    assert f"`make predict MODEL={out / 'best'} DATA=<image folder>`" in (out / "report.md").read_text()
    assert not [p for p in out.rglob("*.*") if p.suffix in {".md", ".json", ".csv"} and ".partial-" in p.read_text()]
    monkeypatch.chdir(tmp_path)
    assert api.predict(model=out / "best", data=cache).csv == Path("predictions") / "R__best" / "c.csv"
    assert not (out / "best" / "predictions").exists()  # predict never writes into a model folder by default
    predicted = api.predict(model=out / "best", data=cache, out=out / "best" / "predictions" / "c.csv").csv
    assert predicted == out / "best" / "predictions" / "c.csv"  # but a user may put it there
    (out / "mine.txt").write_text("my notes\n")
    before = _files(out)
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert (f"error: --out '{out}' holds what its earlier classify run did not write (best/predictions, mine.txt); "
            f"classify replaces only its own run and deletes nothing else. Choose a new --out, or move those out of "
            f"'{out}' first.") in err
    assert _files(out) == before

    # predict writing into the old run while the rerun runs: caught when the new run is put in place
    shutil.move(out / "best" / "predictions", tmp_path / "moved")
    (out / "mine.txt").unlink()
    run = classification._run

    def run_while_predict_writes(*args):
        run(*args)
        shutil.copytree(tmp_path / "moved", out / "best" / "predictions")

    monkeypatch.setattr(classification, "_run", run_while_predict_writes)
    with pytest.raises(UsageError, match=r"holds what its earlier classify run did not write \(best/predictions\); "
                                         r"classify replaces only its own run and deletes nothing else, so this run "
                                         r"is kept in '.*\.R\.partial-\d+/R'\. Choose a new --out"):
        classify(ClassifyConfig(features=str(cache), heads="ridge", cv=2, out=str(out), report=False))
    assert (out / "best" / "predictions" / "c.csv").read_bytes() == before["best/predictions/c.csv"]
    assert (tmp_path / f".R.partial-{os.getpid()}" / "R" / "leaderboard.csv").is_file()


def test_an_out_name_too_long_for_the_filesystem_is_refused_before_any_work(tmp_path, capsys):
    """Issue 23: the name fits, but not the hidden staging folder '.<name>.partial-<pid>' beside it."""
    X, y = separable(8, 2, 8, seed=5)
    cache = write_cache(tmp_path / "c.h5", {"vec": X}, y)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("r" * (limit - 5))
    stage = f".{out.name}.partial-{os.getpid()}"
    line = fails_in_one_line(capsys, ["classify", "--features", str(cache), "--heads", "ridge", "--out", str(out)])
    assert (f"--out '{out}' is too long for the filesystem at '{tmp_path}': it needs the name "
            f"'{stage[:20]}…{stage[-25:]}' ({len(stage)} bytes), over the limit of {limit} bytes per name. Choose a "
            f"--out whose name is at least {len(stage) - limit} bytes shorter.") in line
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["c.h5"]


def test_two_classes_of_four_images_give_a_leaderboard(tmp_path, capsys):
    """Issue 23: with 4 images per class every head failed: the inner CV of the hyperparameter search asked for 4
    folds where a training fold has 3 images of a class. The inner CV now follows the smallest class, and says so."""
    X, y = separable(4, 2, 8, seed=1)
    run = api.classify(features=write_cache(tmp_path / "t.h5", {"vec": X}, y), out=tmp_path / "run", report=False)
    board = run.leaderboard
    assert sorted(board["head"]) == [name for name in list_heads() if HEADS[name].default]
    assert board["status"].eq("ok").all() and board["accuracy"].eq(1.0).all()  # separable: every head is right
    assert board["scheme"].eq("cv4").all() and board["inner_cv"].eq(3).all()
    note = "t: inner CV reduced to 3 folds (from 4): the smallest class has 3 training images in some fold."
    assert f"warning: {note}" in capsys.readouterr().err
    report = (run.run_dir / "report.md").read_text()
    assert f"- {note}" in report and "hyperparameters chosen by 3-fold inner CV within each training fold" in report
