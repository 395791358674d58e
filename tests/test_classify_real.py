"""The pretrained Lite0 on the shipped real photos (data/hymenoptera-small) through both stages.

The session's one Lite0 extraction (conftest.lite0_hymenoptera) serves every test of this module.
"""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from classifiers.data import load_reduced, open_cache
from classifiers.reduce import get_reduce
from pipeline.classification import ClassifyConfig, classify
from pipeline.prediction import PredictConfig, predict
from tests.conftest import HYMENOPTERA

# measured 0.935 (143/153) on the shipped set on 2026-11-30, as were the other default heads; 0.92 = 141/153 leaves
# two images for floating-point differences between machines
LOGREG_FLOOR = 0.92


@pytest.fixture(scope="module")
def logreg_run(lite0_hymenoptera, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    return classify(ClassifyConfig(features=str(lite0_hymenoptera), layer=["avg_pool"], heads="logreg", out=str(out)))


def test_logreg_linear_probe_on_lite0_features_is_accurate_on_val(logreg_run):
    row = pd.read_csv(logreg_run / "leaderboard.csv").iloc[0]
    assert row["head"] == "logreg" and row["scheme"] == "val" and row["n_eval"] == 153
    assert row["accuracy"] >= LOGREG_FLOOR, row.to_dict()


def test_avg_reduce_of_the_last_map_equals_the_models_own_pooling(lite0_hymenoptera):
    cache = open_cache(lite0_hymenoptera)
    rows = np.arange(len(cache.labels))
    reduced = load_reduced(cache, "top_activation", get_reduce("avg"), rows, rows, budget=64 * 2**20)
    with h5py.File(lite0_hymenoptera) as f:
        np.testing.assert_allclose(reduced.X, f["features/avg_pool"][:], rtol=1e-4, atol=1e-4)


def test_predict_on_the_val_images_reproduces_the_reported_accuracy(logreg_run, tmp_path):
    reported = pd.read_csv(logreg_run / "leaderboard.csv").iloc[0]["accuracy"]
    csv = predict(PredictConfig(model=str(logreg_run / "best"), data=str(HYMENOPTERA / "val"),
                                out=str(tmp_path / "val.csv")))
    table = pd.read_csv(csv)
    assert len(table) == 153 and set(table["label"]) == {"ants", "bees"}
    assert (table["label"] == table["predicted"]).mean() == pytest.approx(reported, abs=1 / 153 + 1e-9)


@pytest.mark.slow  # three Lite0 extractions of the 398 photos and a classify: about a minute on 2 cores
def test_the_photos_as_tar_shards_extract_classify_and_update_like_the_folder(lite0_hymenoptera, logreg_run, tmp_path):
    """The shipped photos packed as WebDataset shards (a key per image, its class in a `.cls` member, the split in
    the shard's name, 6 samples a shard): the cache holds the folder's features, labels and splits row for row, the
    same probe scores the folder's accuracy, and a shard added later is computed alone and gives a fresh run's
    cache."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract
    from tests.conftest import LITE0
    from tests.test_tars import pack
    from tests.test_update import assert_same, contents

    pack(HYMENOPTERA, tmp_path / "shards")
    late = sorted((tmp_path / "shards").glob("val-*.tar"))[-1]
    late.rename(tmp_path / late.name)  # delivered later
    cfg = ExtractConfig(backbone=str(LITE0), data=str(tmp_path / "shards"), layer=["avg_pool"],
                        out=str(tmp_path / "tars.h5"))
    assert extract(cfg, verbose=False).status == "written"
    (tmp_path / late.name).rename(late)
    updated = extract(cfg, verbose=False)
    assert updated.status == "updated" and 0 < updated.processed <= 6
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(updated.path), contents(fresh.path))

    tar_cache, folder_cache = open_cache(updated.path), open_cache(lite0_hymenoptera)
    assert len(tar_cache.labels) == len(folder_cache.labels) >= 396
    np.testing.assert_array_equal(tar_cache.labels, folder_cache.labels)
    np.testing.assert_array_equal(tar_cache.split, folder_cache.split)
    assert list(tar_cache.label_names) == list(folder_cache.label_names) == ["ants", "bees"]
    with h5py.File(updated.path) as t, h5py.File(lite0_hymenoptera) as f:
        np.testing.assert_allclose(t["features/avg_pool"][:], f["features/avg_pool"][:], rtol=1e-5, atol=1e-5)
    run = classify(ClassifyConfig(features=str(updated.path), heads="logreg", out=str(tmp_path / "run")))
    tar_row, folder_row = (pd.read_csv(r / "leaderboard.csv").iloc[0] for r in (run, logreg_run))
    assert (tar_row["scheme"], tar_row["n_eval"]) == ("val", 153)
    assert tar_row["accuracy"] == pytest.approx(folder_row["accuracy"], abs=1 / 153)
    assert tar_row["accuracy"] >= LOGREG_FLOOR
