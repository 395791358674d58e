"""`predict` on generated caches: it reproduces classify's held-out accuracy and refuses mismatched features."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from classifiers.testing import separable, write_cache
from features.errors import UsageError
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.prediction import PredictConfig, predict, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A split toy cache (noisy, so accuracy < 1), the classify run on it, and a cache of only its val rows."""
    folder = tmp_path_factory.mktemp("pred")
    X, y = separable(60, 3, 16, seed=7, spread=4.0)
    maps = np.repeat(np.repeat(X[:, None, None, :], 3, axis=1), 3, axis=2)
    split = np.where(np.arange(len(y)) % 3 == 0, "val", "train")
    names = ["ant", "bee", "wasp"]
    cache = write_cache(folder / "all.h5", {"map": maps}, y, label_names=names, split=split)
    run = classify(ClassifyConfig(features=str(cache), heads="logreg,knn", out=str(folder / "run")))
    val = split == "val"
    val_cache = write_cache(folder / "val.h5", {"map": maps[val]}, y[val], label_names=names)
    return folder, run, val_cache, maps[val], y[val]


def test_predict_reproduces_the_reported_held_out_accuracy(trained):
    folder, run, val_cache, _, _ = trained
    reported = pd.read_csv(run / "leaderboard.csv").iloc[0]
    assert reported["scheme"] == "val" and 0.5 < reported["accuracy"] < 1.0  # not trivially perfect
    csv = predict(PredictConfig(model=str(run / "best"), data=str(val_cache), out=str(folder / "p.csv")))
    table = pd.read_csv(csv)
    assert list(table.columns) == ["path", "predicted", "p_ant", "p_bee", "p_wasp", "label", "error"]
    assert (table["label"] == table["predicted"]).mean() == pytest.approx(reported["accuracy"], abs=1e-12)
    assert table[["p_ant", "p_bee", "p_wasp"]].sum(axis=1).to_numpy() == pytest.approx(1.0)
    held_out = pd.read_csv(run / "best" / "eval_predictions.csv")
    np.testing.assert_array_equal(held_out["predicted"], table["predicted"])  # same rows, same order
    assert (f"accuracy on {len(table)} images labelled with a model class: {reported['accuracy']:.4f}"
            in summary(csv, ["ant", "bee", "wasp"]))


def test_accuracy_scores_only_labels_the_model_knows(tmp_path):
    rows = [("a.jpg", "ant", "ant"), ("b.jpg", "bee", "ant"), ("c.jpg", "ant", "odd"), ("d.jpg", "ant", "")]
    csv = tmp_path / "p.csv"
    pd.DataFrame(rows, columns=["path", "predicted", "label"]).assign(error="").to_csv(csv, index=False)
    text = summary(csv, ["ant", "bee"])
    assert "accuracy on 2 images labelled with a model class: 0.5000 (1 with another label not scored)" in text
    odd = tmp_path / "odd.csv"
    pd.DataFrame(rows[2:], columns=["path", "predicted", "label"]).assign(error="").to_csv(odd, index=False)
    assert "accuracy on" not in summary(odd, ["ant", "bee"]).replace(str(odd), "")


def test_unlabelled_data_gets_predictions_without_a_label_column(trained, tmp_path):
    _, run, _, maps, _ = trained
    data = write_cache(tmp_path / "new.h5", {"map": maps[:5]}, [-1] * 5, label_names=[], layout="unlabelled")
    table = pd.read_csv(predict(PredictConfig(model=str(run / "best"), data=str(data), out=str(tmp_path / "p.csv"))))
    assert len(table) == 5 and "label" not in table and set(table["predicted"]) <= {"ant", "bee", "wasp"}


def test_an_augmented_cache_gets_one_prediction_per_image(trained, tmp_path):
    """Augmented views are training rows: predict reads the clean view of each image only."""
    _, run, _, maps, y = trained
    view = np.array([0, 1, 2] * 4, np.int16)
    rows = np.repeat(np.arange(4), 3)
    paths = [f"img{i}.jpg" for i in rows]
    data = write_cache(tmp_path / "aug.h5", {"map": maps[rows]}, y[rows], label_names=["ant", "bee", "wasp"],
                       paths=paths, view=view)
    table = pd.read_csv(predict(PredictConfig(model=str(run / "best"), data=str(data), out=str(tmp_path / "p.csv"))))
    assert list(table["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]
    assert list(table["label"]) == [["ant", "bee", "wasp"][c] for c in y[:4]]


@pytest.mark.parametrize("attrs,expected", [
    ({"backbone": "othernet"}, "backbone: model 'toynet', data 'othernet'"),
    ({"preprocessing": "caffe"}, "preprocessing: model 'none (synthetic features)', data 'caffe'"),
    ({"image_size": 64, "dtype": "float16"}, "2 difference(s)"),
    ({"decoder": "opencv-0.1"}, "decoder: model 'toy', data 'opencv-0.1'"),
    ({"interpolation": "linear"}, "interpolation: model 'area', data 'linear'"),
    ({"precision": "mixed"}, "precision: model 'float32', data 'mixed'"),
    ({"engine": "tf"}, "engine: model 'onnx', data 'tf'"),
])
def test_features_made_differently_are_refused(trained, tmp_path, attrs, expected):
    _, run, _, maps, y = trained
    data = write_cache(tmp_path / "other.h5", {"map": maps}, y, **attrs)
    with pytest.raises(UsageError, match=re.escape(expected)):
        predict(PredictConfig(model=str(run / "best"), data=str(data), out=str(tmp_path / "p.csv")))


def test_changed_backbone_file_is_refused_before_extraction(trained, tmp_path, capsys):
    """The model records the sha256 of a user .keras backbone; a different file at that path is refused."""
    folder, run, _, _, _ = trained
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.skops").write_bytes((run / "best" / "model.skops").read_bytes())
    record = json.loads((run / "best" / "model.json").read_text())
    backbone = tmp_path / "net.keras"
    backbone.write_bytes(b"not the trained backbone")
    record |= {"backbone": str(backbone), "backbone_file_sha256": "0" * 64,
               "config_json": json.dumps({"backbone": str(backbone), "layer": ["map"]})}
    (model_dir / "model.json").write_text(json.dumps(record))
    images = tmp_path / "images"
    images.mkdir()
    assert main(["predict", "--model", str(model_dir), "--data", str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Backbone mismatch" in err[0] and str(backbone) in err[0]


def test_predict_mistakes_give_one_clear_line(trained, tmp_path, capsys):
    _, run, val_cache, _, _ = trained
    assert main(["predict", "--model", str(tmp_path), "--data", str(val_cache)]) == 2
    assert "No saved model at" in capsys.readouterr().err
    assert main(["predict", "--model", str(run / "best"), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_runs_the_graph_exported_for_training_however_the_backbone_path_is_spelled(
        tiny_backbone, class_folder, tmp_path, monkeypatch):
    """The training cache names its .keras backbone as given (relative, as `make extract BACKBONE=models/x.keras`);
    predict finds the file by its hash at an absolute path: the same file, so the same kept ONNX graph, never a
    second export."""
    (tmp_path / "models").mkdir()
    for suffix in (".keras", ".json"):
        shutil.copy(tiny_backbone.with_suffix(suffix), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    extract(ExtractConfig(backbone="models/tiny.keras", data=str(class_folder), engine="onnx", out="cache/c.h5",
                          batch_size=4, workers=1), verbose=False)
    exported = sorted((tmp_path / "cache" / "engines").glob("*.onnx"))
    run = classify(ClassifyConfig(features="cache/c.h5", heads="logreg", cv=3, out="results/r", report=False))
    assert json.loads((run / "best" / "model.json").read_text())["backbone_abspath"] == str(
        tmp_path / "models" / "tiny.keras")
    predict(PredictConfig(model=str(run / "best"), data=str(class_folder), out=str(tmp_path / "p" / "p.csv")))
    assert len(exported) == 1 and sorted((tmp_path / "cache" / "engines").glob("*.onnx")) == exported
