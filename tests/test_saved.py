"""The saved-model folder (classifiers/saved.py): opening one never runs code from it, damage is one line, the folder
works after being copied elsewhere, and model.json is strict JSON."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

from sklearn.pipeline import Pipeline

from classifiers import saved
from classifiers.heads import get_head, list_heads
from classifiers.reduce import get_reduce
from classifiers.testing import separable, write_cache
from conftest import write_images
from features.backbones import get_backbone, load_keras
from features.errors import UsageError
from features.model import build_base
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main
from pipeline.prediction import PredictConfig, predict, summary


class RunsAShellCommand:
    """A pickle that would run `touch <marker>` when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class NotOurs:
    """A type this project never saves; building it would leave a marker file."""

    marker = None

    def __setstate__(self, state):
        open(NotOurs.marker, "w").close()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A held-out split toy cache, a linsvm classify run on it (no probabilities: log-loss is NaN)."""
    folder = tmp_path_factory.mktemp("saved")
    X, y = separable(45, 3, 8, seed=3, spread=3.0)
    split = np.where(np.arange(len(y)) % 3 == 0, "val", "train")
    cache = write_cache(folder / "c.h5", {"vec": X}, y, label_names=["a", "b", "c"], split=split)
    run = classify(ClassifyConfig(features=str(cache), heads="linsvm", out=str(folder / "run")))
    return folder, run, cache


def _copy_model(run, dest):
    shutil.copytree(run / "best", dest)
    return dest


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", list_heads() + ["pca+logreg"])
def test_every_head_round_trips_through_the_allow_listed_format(tmp_path, head, n_classes):
    """Each registered head, behind a reduce step, loads back with only the allow-listed types and predicts the same."""
    rng = np.random.default_rng(n_classes)
    X, y = rng.normal(size=(40, 2, 2, 6)).astype("float32"), np.arange(40) % n_classes
    X[np.arange(40), 0, 0, y] += 2.0
    model = Pipeline([("reduce", get_reduce("avg").build()), ("head", get_head(head).build(0))])
    if head == "mlp":
        model.set_params(head__epochs=2)
    model.fit(X, y)
    saved.save(tmp_path, model, {"class_names": list("abc"[:n_classes]), "log_loss": np.float64("nan")})
    loaded = saved.load_head(tmp_path, saved.load_record(tmp_path))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert (tmp_path / saved.KERAS_HEAD).exists() == (head == "mlp")


def test_model_json_is_strict_json_with_nan_as_null(toy):
    _, run, _ = toy
    text = (run / "best" / "model.json").read_text()
    record = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert record["metrics"]["log_loss"] is None and record["head"] == "linsvm"
    assert record["model_file"] == "model.skops" and record["format"] == saved.FORMAT
    assert not list((run / "best").glob("*.joblib"))


def test_a_pickle_in_a_results_folder_is_refused_and_never_run(toy, tmp_path, capsys):
    folder, run, cache = toy
    model = _copy_model(run, tmp_path / "best")
    marker = tmp_path / "pwned"
    (model / "model.joblib").write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    record = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**record, "model_file": "model.joblib"}))
    assert main(["predict", "--model", str(model), "--data", str(cache), "--out", str(tmp_path / "p.csv")]) == 2
    line = _one_line_error(capsys)
    assert "model.joblib" in line and "--trust-pickle" in line and "can run any code" in line
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    # finetune refuses it the same way, before any network is built
    assert main(["finetune", "--model", str(model), "--out", str(tmp_path / "ft")]) == 2
    assert "--trust-pickle" in _one_line_error(capsys) and not marker.exists()


def test_trust_pickle_loads_an_older_joblib_model_with_a_warning(toy, tmp_path, capsys):
    import joblib

    folder, run, cache = toy
    model = _copy_model(run, tmp_path / "best")
    joblib.dump(saved.load_head(model, saved.load_record(model)), model / "model.joblib")
    record = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**record, "model_file": "model.joblib"}))
    (model / "model.skops").unlink()
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(model), "--data", str(cache), "--out", str(out), "--trust-pickle"]) == 0
    assert "warning: loading the pickle" in capsys.readouterr().err
    reference = predict(PredictConfig(model=str(run / "best"), data=str(cache), out=str(tmp_path / "ref.csv")))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(reference))


@pytest.mark.parametrize("damage,expected", [
    (lambda m: (m / "model.skops").write_bytes(os.urandom(300)), "model.skops' cannot be read"),
    (lambda m: (m / "model.skops").write_bytes((m / "model.skops").read_bytes()[:200]), "cannot be read"),
    (lambda m: (m / "model.skops").unlink(), "does not exist"),
    (lambda m: (m / "model.json").write_text('{"model_file": "model.skops", '), "is not valid JSON"),
    (lambda m: (m / "model.json").write_text("[1, 2]"), "is not a model record"),
])
def test_a_damaged_model_folder_is_one_line(toy, tmp_path, capsys, damage, expected):
    _, run, cache = toy
    model = _copy_model(run, tmp_path / "best")
    damage(model)
    assert main(["predict", "--model", str(model), "--data", str(cache), "--out", str(tmp_path / "p.csv")]) == 2
    assert expected in _one_line_error(capsys)


def test_a_head_file_with_a_foreign_type_is_refused_before_it_is_built(toy, tmp_path):
    import skops.io

    _, run, _ = toy
    model = _copy_model(run, tmp_path / "best")
    NotOurs.marker = str(tmp_path / "built")
    skops.io.dump({"head": NotOurs()}, model / "model.skops")
    with pytest.raises(UsageError, match="holds types this tool never writes.*NotOurs"):
        saved.load_head(model, saved.load_record(model))
    assert not (tmp_path / "built").exists()


def test_keras_files_with_code_or_garbage_are_one_line(tmp_path):
    import keras

    inputs = keras.Input((4, 4, 3))
    lam = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    lam.save(tmp_path / "lam.keras")
    with pytest.raises(UsageError, match="lam.keras' contains a Lambda layer"):
        build_base(get_backbone(str(tmp_path / "lam.keras"), "tf"), "imagenet", 4)
    (tmp_path / "junk.keras").write_bytes(b"not a zip archive at all")
    with pytest.raises(UsageError, match=r"junk.keras' is not a Keras model: a .keras file is a zip archive"):
        load_keras(tmp_path / "junk.keras", "backbone")
    shutil.make_archive(str(tmp_path / "zip"), "zip", tmp_path, "junk.keras")  # a zip, but no Keras model inside
    shutil.move(tmp_path / "zip.zip", tmp_path / "zip.keras")
    with pytest.raises(UsageError, match=r"zip.keras' is not a readable Keras model \(\w+Error"):
        load_keras(tmp_path / "zip.keras", "backbone")


def test_predict_refuses_to_replace_files_it_did_not_write(toy, tmp_path, capsys):
    _, run, cache = toy
    notes = tmp_path / "notes.csv"
    notes.write_text("notes\n")
    assert main(["predict", "--model", str(run / "best"), "--data", str(cache), "--out", str(notes)]) == 2
    assert "notes.csv' exists and is not an earlier prediction CSV" in _one_line_error(capsys)
    assert notes.read_text() == "notes\n"
    images = tmp_path / "images"
    write_images(images, 2, seed=0)
    precious = tmp_path / "x.h5"
    precious.write_text("precious\n")
    assert main(["predict", "--model", str(run / "best"), "--data", str(images), "--out", str(tmp_path / "x.csv")]) == 2
    assert "x.h5'" in _one_line_error(capsys) and precious.read_text() == "precious\n"
    # its own earlier output for this model is replaced
    out = tmp_path / "p.csv"
    for _ in range(2):
        assert main(["predict", "--model", str(run / "best"), "--data", str(cache), "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def file_backbone_run(tmp_path_factory, tiny_backbone):
    """Images -> features of a `.keras` backbone given by a path relative to the working directory (as
    `make extract DATA=... BACKBONE=models/x.keras` does) -> a logreg run; (images, run, backbone)."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    root = tmp_path_factory.mktemp("reloc")
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / "data" / name, 8, seed=k)
    here = os.getcwd()
    os.chdir(tiny_backbone.parents[1])
    try:
        cache = extract(ExtractConfig(backbone=str(tiny_backbone.relative_to(tiny_backbone.parents[1])),
                                      data=str(root / "data"), out=str(root / "c.h5"), batch_size=8),
                        verbose=False).path
        run = classify(ClassifyConfig(features=str(cache), heads="logreg", cv=2, out=str(root / "run")))
    finally:
        os.chdir(here)
    return root, run, tiny_backbone


def test_a_copied_model_folder_predicts_from_another_directory(file_backbone_run, tmp_path, monkeypatch):
    root, run, backbone = file_backbone_run
    record = saved.load_record(run / "best")
    assert record["backbone_file_sha256"] and record["backbone_abspath"] == str(backbone.resolve())
    copy = _copy_model(run, tmp_path / "elsewhere" / "best")
    monkeypatch.chdir(tmp_path)  # the recorded relative backbone path means nothing here
    table = pd.read_csv(predict(PredictConfig(model=str(copy), data=str(root / "data"), out="p.csv")),
                        keep_default_na=False)
    assert len(table) == 16 and set(table["predicted"]) <= {"cats", "dogs"} and (table["error"] == "").all()
    assert (table["label"] == table["predicted"]).mean() > 0.5


def test_a_missing_backbone_is_named_with_its_hash_and_found_in_the_model_folder(file_backbone_run, tmp_path,
                                                                                 monkeypatch):
    root, run, backbone = file_backbone_run
    copy = _copy_model(run, tmp_path / "best")
    record = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**record, "backbone_abspath": str(tmp_path / "gone.keras")}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=f"{backbone.name}' \\(sha256 {record['backbone_file_sha256']}\\)"):
        predict(PredictConfig(model=str(copy), data=str(root / "data"), out="p.csv"))
    shutil.copy(backbone, copy)  # the fix the message gives: a copy in the model folder
    assert saved.locate_backbone(saved.load_record(copy), copy) == str(copy / backbone.name)


def test_predict_reports_every_file_it_could_not_use(file_backbone_run, tmp_path):
    _, run, _ = file_backbone_run
    data = tmp_path / "new"
    write_images(data, 3, seed=5)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "notes.txt").write_text("not an image\n")
    csv = predict(PredictConfig(model=str(run / "best"), data=str(data), out=str(tmp_path / "p.csv")))
    table = pd.read_csv(csv, keep_default_na=False)
    failed = table[table["error"] != ""]
    # a file that is no image by its name (notes.txt) is ignored; one that claims to be and is not is listed
    assert len(table) == 4 and failed["path"].map(lambda p: p.rsplit("/", 1)[-1]).tolist() == ["broken.jpg"]
    assert (failed["predicted"] == "").all() and (failed["p_cats"] == "").all()
    text = summary(csv, ["cats", "dogs"])
    assert "predicted 3 images" in text and "could not use 1 file(s)" in text and "broken.jpg: " in text
