"""Plain `make classify` in a folder of many caches: one leaderboard per dataset, no dataset counted twice."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from classifiers.testing import separable, write_cache
from features.errors import UsageError
from pipeline.classification import ClassifyConfig, classify, dataset_runs
from tests.conftest import fails_in_one_line


def _dataset(folder, name: str, n: int, seed: int, root: str, layers=("avg",), **attrs):
    X, y = separable(n, 2, 8, seed=seed, spread=1.0)
    split = np.where(np.arange(len(y)) % 4 == 0, "val", "train")
    paths = [f"{s}/{'ab'[c]}/img{i:03d}.jpg" for i, (s, c) in enumerate(zip(split, y))]
    return write_cache(folder / name, {layer: X * (k + 1) for k, layer in enumerate(layers)}, y, label_names=["a", "b"],
                       split=split, paths=paths, data_root=root, **attrs), X, y, split, paths


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """cache/: a dataset at two layers, the same data as two shards plus their merge and a copy of the merge, a
    second dataset, and an unlabelled cache made for prediction."""
    folder = tmp_path_factory.mktemp("cache")
    _, X, y, split, paths = _dataset(folder, "ants__net__l1+l2.h5", 40, 0, "/data/ants", layers=("l1", "l2"),
                                     source_fingerprint="ants")
    merged = write_cache(folder / "ants__other.h5", {"avg": X + 1}, y, label_names=["a", "b"], split=split,
                         paths=paths, data_root="/data/ants", backbone="othernet", source_fingerprint="ants")
    for i, rows in enumerate([np.arange(len(y))[0::2], np.arange(len(y))[1::2]]):
        write_cache(folder / f"ants__other.shard{i}-of-2.h5", {"avg": X[rows] + 1}, y[rows], label_names=["a", "b"],
                    split=split[rows], paths=[paths[r] for r in rows], data_root="/data/ants", backbone="othernet",
                    source_fingerprint="ants", shard=f"{i}/2")
    shutil.copy(merged, folder / "copy-of-other.h5")
    _dataset(folder, "bees__net__avg.h5", 12, 1, "/data/bees", source_fingerprint="bees")
    write_cache(folder / "new-images.h5", {"avg": X[:5]}, [-1] * 5, label_names=[], paths=paths[:5],
                data_root="/data/new", layout="unlabelled")
    return folder


def test_plain_classify_ranks_each_dataset_on_its_own(crowded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATURE_CACHE_DIR", str(crowded))
    run = classify(ClassifyConfig(heads="logreg,knn", out=str(tmp_path / "run"), report=False))
    runs = dataset_runs(run)
    assert [r.name for r in runs] == ["ants", "bees"]
    ants = pd.read_csv(run / "ants" / "leaderboard.csv")
    used = sorted({p.split("/")[-1] for p in ants["cache"]})
    assert used == ["ants__net__l1+l2.h5", "ants__other.h5"]  # no shard, no copy, no other dataset
    assert len(ants) == 2 * 3  # 2 heads x (l1, l2, other's avg)
    bees = pd.read_csv(run / "bees" / "leaderboard.csv")
    assert set(bees["cache"].map(lambda p: p.split("/")[-1])) == {"bees__net__avg.h5"} and len(bees) == 2
    assert "ants/report.html" in (run / "index.html").read_text()
    err = capsys.readouterr().err
    for skipped in ("new-images.h5: it has no labels", "ants__other.shard0-of-2.h5: shard 0/2 of an extraction "
                    f"whose merged cache {crowded / 'ants__other.h5'} is used", "copy-of-other.h5: the same features as"):
        assert skipped in err, err
    ants_notes = json.loads((run / "ants" / "run.json").read_text())["notes"]  # what its report lists
    assert any("shard0-of-2.h5" in n for n in ants_notes) and any("copy-of-other.h5" in n for n in ants_notes)
    assert not any("new-images.h5" in n for n in ants_notes)  # the run's note, on the index page
    assert "new-images.h5" in (run / "index.html").read_text()
    record = json.loads((run / "ants" / "best" / "model.json").read_text())
    assert record["data_root"] == "/data/ants"
    assert str(run / "ants" / "best") in (run / "ants" / "report.md").read_text()


def test_the_cli_prints_one_summary_per_dataset_and_the_index(crowded, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("FEATURE_CACHE_DIR", str(crowded))
    assert main(["classify", "--heads", "logreg", "--out", str(tmp_path / "r"), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "== dataset ants ==" in out and "== dataset bees ==" in out
    assert out.count(f"every file it wrote is listed in {tmp_path / 'r' / 'manifest.json'}") == 2  # the run's one
    assert out.rstrip().endswith(f"index: {tmp_path / 'r' / 'index.html'}")


def test_a_named_shard_or_unlabelled_cache_is_used_or_refused_as_named(crowded, tmp_path, capsys):
    shard = crowded / "ants__other.shard0-of-2.h5"
    run = classify(ClassifyConfig(features=str(shard), heads="logreg", out=str(tmp_path / "s"), report=False))
    assert pd.read_csv(run / "leaderboard.csv")["cache"].str.endswith("shard0-of-2.h5").all()
    beside = classify(ClassifyConfig(features=f"{shard},{crowded / 'ants__net__l1+l2.h5'}", heads="logreg",
                                     out=str(tmp_path / "b"), report=False))  # not its merge: half the images
    used = [pd.read_csv(r / "leaderboard.csv")["cache"].iloc[0] for r in dataset_runs(beside)]
    assert sorted(p.split("/")[-1] for p in used) == ["ants__net__l1+l2.h5", "ants__other.shard0-of-2.h5"]
    line = fails_in_one_line(capsys, ["classify", "--features", str(crowded / "new-images.h5"), "--heads", "logreg",
                                      "--out", str(tmp_path / "u")])
    assert "new-images has no labelled images" in line


def test_only_unusable_caches_is_one_line(crowded, tmp_path):
    with pytest.raises(UsageError, match="none of the 1 selected caches can be ranked"):
        classify(ClassifyConfig(features=str(crowded / "new-*.h5"), out=str(tmp_path / "x")))


def test_the_leaderboard_is_sorted_by_the_metric_asked_for(tmp_path, capsys):
    X, y = separable(30, 3, 8, seed=2, spread=3.0)
    y[:40] = 0  # imbalanced
    cache = write_cache(tmp_path / "c.h5", {"v": X}, y)
    for metric in ("balanced_accuracy", "log_loss"):
        run = classify(ClassifyConfig(features=str(cache), heads="logreg,knn,ridge", metric=metric, cv=3,
                                      out=str(tmp_path / metric), report=False))
        board = pd.read_csv(run / "leaderboard.csv").sort_values("rank")
        values = board[metric].dropna().tolist()  # a head without probabilities has no log-loss: ranked last
        assert values == sorted(values, reverse=metric != "log_loss") and len(values) >= 2
        assert (board["ranked_by"] == metric).all()
    line = fails_in_one_line(capsys, ["classify", "--features", str(cache), "--metric", "f1", "--out",
                                      str(tmp_path / "x")])
    assert "metric 'f1' is not valid. Expected one of: accuracy, balanced_accuracy, macro_f1, log_loss" in line


def test_the_console_ends_with_the_first_screens_warnings_then_the_report(tmp_path):
    from classifiers.report import summary

    X, y = separable(20, 2, 8, seed=4, spread=1.0)
    split = np.where(np.arange(len(y)) % 4 == 0, "val", "train")
    X[4] = X[5]  # a val image that is a copy of a train image: leakage
    cache = write_cache(tmp_path / "c.h5", {"v": X}, y, split=split, data_root=str(tmp_path))
    run = classify(ClassifyConfig(features=str(cache), heads="logreg", out=str(tmp_path / "run")))
    lines = summary(run).splitlines()
    counts = json.loads((run / "warnings.json").read_text())
    leaks = next(c["count"] for c in counts if c["section"] == "duplicates")
    assert leaks >= 1 and lines[-1] == f"report:  {run / 'report.html'}"
    assert lines[-2].startswith("check:   ") and "cross-split near-duplicate" in lines[-2]


def test_each_datasets_report_fits_the_window_and_says_what_to_use_first(crowded, tmp_path, monkeypatch):
    """The issue's scenario end to end in Chromium: plain classify over the crowded cache folder, then every
    dataset's report.html fits 1280 and 800 px with the model, its interval, the predict command and the warnings
    on its first screen; the index links them."""
    from tests.test_report import SCREEN_HEIGHT, WIDTHS, _browse, _chromium, assert_outputs_documented

    chromium = _chromium()
    pytest.importorskip("playwright", reason="the layout is measured with Playwright (pip install playwright)")
    monkeypatch.setenv("FEATURE_CACHE_DIR", str(crowded))
    run = classify(ClassifyConfig(heads="logreg,knn", out=str(tmp_path / "run")))
    for folder in dataset_runs(run):
        best = pd.read_csv(folder / "leaderboard.csv").query("chosen").iloc[0]
        found = _browse(chromium, folder / "report.html", None)
        assert found["errors"] == []
        for width in WIDTHS:
            seen = found["layout"][width]
            assert seen["scroll"] <= seen["viewport"] == width
            assert seen["card_top"] is not None and seen["card_bottom"] <= SCREEN_HEIGHT
            card = " ".join(seen["card"].split())
            assert f"accuracy {best['accuracy']:.3f} (95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f})" in card
            assert f"make predict MODEL={folder}/best DATA=<new images>" in card
            assert "cross-split near-duplicate" in card and "likely label error" in card
    index = (run / "index.html").read_text()
    assert 'href="ants/report.html"' in index and 'href="bees/report.html"' in index
    assert_outputs_documented(run)
