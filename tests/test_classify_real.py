"""The pretrained Lite0 on real photos through both stages (skipped when ../shared is absent).

One extraction (avg_pool and the 7x7x1280 map before it) serves every test of this module.
"""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from classifiers.data import load_reduced, open_cache
from classifiers.reduce import get_reduce
from pipeline.classify import ClassifyConfig, classify
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.predict import PredictConfig, predict
from tests.conftest import LITE0, shared_path


@pytest.fixture(scope="module")
def hymenoptera(tmp_path_factory):
    data = shared_path("datasets", "hymenoptera")
    if not LITE0.exists():
        pytest.skip(f"{LITE0} is absent")
    folder = tmp_path_factory.mktemp("real")
    cfg = ExtractConfig(backbone=str(LITE0), data=str(data), layer=["avg_pool", "top_activation"],
                        out=str(folder / "lite0.h5"))
    cache = extract(cfg, verbose=False).path
    run = classify(ClassifyConfig(features=str(cache), layer=["avg_pool"], heads="logreg", out=str(folder / "run")))
    return data, cache, run


def test_logreg_linear_probe_on_lite0_features_reaches_092_on_val(hymenoptera):
    _, _, run = hymenoptera
    row = pd.read_csv(run / "leaderboard.csv").iloc[0]
    assert row["head"] == "logreg" and row["scheme"] == "val" and row["n_eval"] == 153
    assert row["accuracy"] >= 0.92, row.to_dict()


def test_avg_reduce_of_the_last_map_equals_the_models_own_pooling(hymenoptera):
    _, path, _ = hymenoptera
    cache = open_cache(path)
    rows = np.arange(len(cache.labels))
    reduced = load_reduced(cache, "top_activation", get_reduce("avg"), rows, rows, budget=64 * 2**20)
    with h5py.File(path) as f:
        np.testing.assert_allclose(reduced.X, f["features/avg_pool"][:], rtol=1e-4, atol=1e-4)


def test_predict_on_the_val_images_reproduces_the_reported_accuracy(hymenoptera, tmp_path):
    data, _, run = hymenoptera
    reported = pd.read_csv(run / "leaderboard.csv").iloc[0]["accuracy"]
    csv = predict(PredictConfig(model=str(run / "best"), data=str(data / "val"), out=str(tmp_path / "val.csv")))
    table = pd.read_csv(csv)
    assert len(table) == 153 and set(table["label"]) == {"ants", "bees"}
    assert (table["label"] == table["predicted"]).mean() == pytest.approx(reported, abs=1 / 153 + 1e-9)
