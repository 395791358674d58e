"""Fine-tuning stage: exact head conversion, frozen BatchNorm statistics, the two-phase run, predict on model.keras."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import Pipeline

from classifiers.convert import NotConvertible, to_keras
from classifiers.heads import get_head
from classifiers.network import build_network, set_phase, unfrozen_layers
from classifiers.reduce import get_reduce
from conftest import LITE0, ROOT
from features.backbones import get_backbone
from features.errors import UsageError
from pipeline.cli import main
from pipeline.finetune import plan_rows

SIZE = 96  # small input: Lite0 runs at any size, and the tests stay quick on a 2-core CPU


def _keras_head(model, X):
    import keras

    inputs = keras.Input(X.shape[1:])
    return keras.Model(inputs, keras.layers.Activation("softmax")(to_keras(model, inputs)))


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head,reduce", [("logreg", "avg"), ("logreg", "avgmax"), ("pca+logreg", "flatten"),
                                         ("sgd", "avg"), ("linsvm", "max"), ("ridge", "avg")])
def test_converted_head_reproduces_the_saved_pipeline(head, reduce, n_classes):
    rng = np.random.default_rng(n_classes)
    X = rng.normal(size=(90, 2, 2, 8)).astype("float32")
    y = rng.integers(0, n_classes, 90)
    X[np.arange(90), 0, 0, y] += 1.5
    model = Pipeline([("reduce", get_reduce(reduce).build()), ("head", get_head(head).build(0))]).fit(X, y)
    probs = np.asarray(_keras_head(model, X)(X))
    np.testing.assert_array_equal(probs.argmax(1), model.predict(X))
    # softmax of the converted logits is the head's own probability when it is a softmax/sigmoid model
    # (multiclass SGD normalises one-vs-rest sigmoids instead: only its decisions are exact)
    if head in ("logreg", "pca+logreg") or (head == "sgd" and n_classes == 2):
        np.testing.assert_allclose(probs, model.predict_proba(X), atol=2e-6)


def test_heads_without_a_keras_form_are_named_in_the_error():
    X, y = np.random.default_rng(0).normal(size=(20, 4)).astype("float32"), np.arange(20) % 2
    with pytest.raises(NotConvertible, match="KNeighborsClassifier has no exact Keras equivalent.*Convertible"):
        _keras_head(get_head("knn").build(0).fit(X, y), X)


def test_rows_score_the_stage_two_split_and_monitor_only_training_images():
    codes = np.array([0, 1] * 20 + [-1])
    splits = ["train"] * 30 + ["val"] * 10 + ["train"]
    plan = plan_rows(codes, splits, 0.2, seed=0)
    assert plan.scheme == "val" and sorted(plan.score) == list(range(30, 40))
    assert sorted(np.r_[plan.fit, plan.monitor]) == list(range(30)) and len(plan.monitor) == 6
    flat = plan_rows(codes, [""] * len(codes), 0.2, seed=0)
    assert flat.scheme == "holdout" and len(flat.score) == 8 and 40 not in np.r_[flat.fit, flat.monitor, flat.score]


def _lite0_network(tmp_path, n_classes=2):
    """Lite0 at SIZE with a converted logreg head fitted on random avg_pool-sized features."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 1280)).astype("float32"), np.arange(30) % n_classes
    head = Pipeline([("reduce", get_reduce("none").build()), ("head", get_head("logreg").build(0))]).fit(X, y)
    return build_network(get_backbone(str(LITE0)), "imagenet", SIZE, "avg_pool", "none", head, n_classes)


def test_unfreeze_counts_weighted_blocks_from_the_top_and_skips_batchnorm(tmp_path):
    _, trunk, _ = _lite0_network(tmp_path)
    names = [layer.name for layer in unfrozen_layers(trunk, "2")]
    assert names == ["block7a_expand_conv", "block7a_dwconv", "block7a_project_conv", "top_conv"]
    assert [layer.name for layer in unfrozen_layers(trunk, "top_conv")] == ["top_conv"]
    with pytest.raises(UsageError, match="unfreeze 'top_cnv'.*top, block7a, block6d.*Did you mean: top_conv"):
        unfrozen_layers(trunk, "top_cnv")


def test_batchnorm_statistics_do_not_change_in_phase_2(tmp_path):
    import keras

    model, trunk, start = _lite0_network(tmp_path)
    assert start == "converted"
    trained = set_phase(model, trunk, 2, "3")
    bns = [layer for layer in trunk.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before_bn = [np.array(w) for layer in bns for w in layer.weights]
    before = {layer.name: np.array(layer.kernel) for layer in trunk.layers if hasattr(layer, "kernel")}
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    model.fit(rng.normal(size=(8, SIZE, SIZE, 3)).astype("float32"), np.arange(8) % 2, batch_size=4, epochs=1,
              verbose=0)
    assert all(np.array_equal(a, np.array(w)) for a, w in zip(before_bn, [w for layer in bns for w in layer.weights]))
    changed = {name for name, kernel in before.items() if not np.array_equal(kernel, trunk.get_layer(name).kernel)}
    assert changed and changed <= set(trained) and "block6d_project_conv" in trained  # 3 blocks: top, 7a, 6d
    assert "block1a_project_conv" not in changed


def _write(folder, n, tint, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = cv2.resize(rng.integers(0, 256, (20, 25, 3), dtype=np.uint8), (100, 80)).astype(int)
        img[..., tint] += 70
        cv2.imwrite(str(folder / f"{i:02d}.jpg"), np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_backbone):
    """Split folder of tinted random textures -> extract with the tiny backbone -> classify logreg -> a 1+1 epoch
    fine-tune (the conversion, scoring and files are the point here, not Lite0's weights)."""
    from pipeline.classification import ClassifyConfig, classify
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract
    from pipeline.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    for split, n in [("train", 10), ("val", 6)]:
        for tint, name in [(0, "blue"), (2, "red")]:
            _write(root / "data" / split / name, n, tint, rng)
    cache = extract(ExtractConfig(backbone=str(tiny_backbone), data=str(root / "data"), out=str(root / "c.h5"),
                                  batch_size=8), verbose=False).path
    run = classify(ClassifyConfig(features=str(cache), heads="logreg", out=str(root / "run")))
    out = finetune(FinetuneConfig(model=str(run / "best"), head_epochs=1, epochs=1, batch_size=8), verbose=False)
    return root, run, out


def test_fine_tune_starts_exactly_at_the_stage_two_head(tuned):
    _, run, out = tuned
    record = json.loads((out / "model.json").read_text())
    stage_two = pd.read_csv(run / "best" / "eval_predictions.csv")
    assert record["head_start"] == "converted" and record["scheme"] == "val"
    assert record["metrics"]["start_accuracy"] == pytest.approx(record["stage_two"]["metrics"]["accuracy"], abs=1e-12)
    assert len(stage_two) == record["n_eval"] == 12 and record["n_fit"] + record["n_monitor"] == 20


def test_converted_network_reproduces_stage_two_probabilities_before_any_step(tuned):
    from classifiers import saved
    from classifiers.network import Images, clean, probabilities

    _, run, _ = tuned
    record = saved.load_record(run / "best")
    spec = get_backbone(record["backbone"])
    size = int(record["image_size"])
    model, _, start = build_network(spec, "imagenet", size, record["layer"], record["pool"],
                                    saved.load_head(run / "best", record), 2)
    stage_two = pd.read_csv(run / "best" / "eval_predictions.csv")
    root = Path(record["data_root"])
    images = Images(root, list(stage_two["path"]), np.arange(len(stage_two)))
    probs, rows = probabilities(model, clean(images, size, "crop", 0.875, 8, 0)(), spec.preprocess.fn)
    assert start == "converted" and list(rows) == list(range(len(stage_two)))
    np.testing.assert_allclose(probs, stage_two[["p_blue", "p_red"]].to_numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.array(["blue", "red"])[probs.argmax(1)], stage_two["predicted"])


def test_leaderboard_and_predict_use_the_fine_tuned_model(tuned, capsys):
    root, run, out = tuned
    board = pd.read_csv(run / "leaderboard.csv")
    assert list(board["rank"]) == list(range(1, len(board) + 1))
    assert sorted(board["head"]) == ["finetune:logreg", "logreg"]  # added beside the frozen head, not over it
    for head, folder in [("finetune:logreg", out), ("logreg", run / "best")]:
        held = pd.read_csv(folder / "eval_predictions.csv")  # each model's own predictions on the scored images
        row = board[board["head"] == head].iloc[0]
        assert row["accuracy"] == pytest.approx((held["predicted"] == held["label"]).mean()), head
        assert row["n_eval"] == len(held) == 12
    record = json.loads((out / "model.json").read_text())
    assert main(["predict", "--model", str(out), "--data", str(root / "data" / "val"), "--out",
                 str(root / "p.csv")]) == 0
    table = pd.read_csv(root / "p.csv")
    assert list(table.columns) == ["path", "predicted", "p_blue", "p_red", "label", "error"]
    assert (table["predicted"] == table["label"]).mean() == pytest.approx(record["metrics"]["accuracy"])
    held = pd.read_csv(out / "eval_predictions.csv")
    np.testing.assert_allclose(table["p_red"], held["p_red"], atol=1e-5)
    assert main(["finetune", "--model", str(run / "best")]) == 0  # complete: a no-op
    assert "up to date" in capsys.readouterr().out


def test_predict_refuses_a_cache_for_a_fine_tuned_model(tuned, capsys):
    root, _, out = tuned
    assert main(["predict", "--model", str(out), "--data", str(root / "c.h5")]) == 2
    assert "fine-tuned network: it reads images" in capsys.readouterr().err


@pytest.mark.slow
def test_short_fine_tune_on_hymenoptera_keeps_the_frozen_head_accuracy(tmp_path):
    from pipeline.classification import ClassifyConfig, classify
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract
    from pipeline.finetune import FinetuneConfig, finetune

    data = ROOT / "data" / "hymenoptera-small"
    cache = extract(ExtractConfig(data=str(data), image_size=160, out=str(tmp_path / "h.h5")), verbose=False).path
    run = classify(ClassifyConfig(features=str(cache), heads="logreg", out=str(tmp_path / "run")))
    out = finetune(FinetuneConfig(model=str(run / "best"), head_epochs=2, epochs=2), verbose=False)
    metrics = json.loads((out / "model.json").read_text())["metrics"]
    assert metrics["accuracy"] >= metrics["start_accuracy"] - 0.02 and metrics["start_accuracy"] > 0.85


def test_predict_with_a_fine_tuned_model_on_only_unreadable_files_is_one_line(tuned, tmp_path, capsys):
    _, _, out = tuned
    data = tmp_path / "odd"
    data.mkdir()
    for name in ("a.jpg", "b.png"):
        (data / name).write_bytes(b"\xff\xd8 not really an image")
    assert main(["predict", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"none of the 2 files under '{data}' could be used" in err[0]
    assert "a.jpg: " in err[0] and "b.png: " in err[0] and not (tmp_path / "p.csv").exists()
