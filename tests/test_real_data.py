"""The pretrained Lite0 on real photos (skipped when ../shared is absent)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from features.images import load_image
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from tests.conftest import LITE0, shared_path

ANT, BEE = 310, 309  # ImageNet classes


@pytest.fixture(scope="module")
def hymenoptera_cache(tmp_path_factory):
    data = shared_path("datasets", "hymenoptera")
    cfg = ExtractConfig(backbone=str(LITE0), data=str(data), layer=["avg_pool", "predictions"],
                        out=str(tmp_path_factory.mktemp("c") / "lite0.h5"))
    return data, extract(cfg, verbose=False).path


def test_lite0_on_hymenoptera_writes_a_complete_cache(hymenoptera_cache):
    _, path = hymenoptera_cache
    with h5py.File(path) as f:
        assert f.attrs["complete"] and f.attrs["layout"] == "splits"
        n = f.attrs["num_images"]
        assert n + len(f["skipped"]) == 398 and n >= 396
        assert f["features/avg_pool"].shape == (n, 1280)
        split = f["split"].asstr()[()]
        assert (split == "train").sum() >= 243 and (split == "val").sum() == 153


def test_pretrained_lite0_recognises_ants_and_bees_through_the_cache(hymenoptera_cache):
    """ImageNet top-1 on val: the model's own README reports 0.871 (ants) and 0.831 (bees) with this preprocessing."""
    _, path = hymenoptera_cache
    with h5py.File(path) as f:
        top1 = f["features/predictions"][()].argmax(axis=1)
        names, labels, split = f["label_names"].asstr()[()], f["labels"][()], f["split"].asstr()[()]
    val = split == "val"
    for cls, imagenet in [("ants", ANT), ("bees", BEE)]:
        rows = val & (labels == list(names).index(cls))
        assert (top1[rows] == imagenet).mean() >= 0.78, cls


def test_cached_lite0_features_equal_the_documented_forward_pass(hymenoptera_cache):
    import keras

    data, path = hymenoptera_cache
    with h5py.File(path) as f:
        rel = f["paths"].asstr()[:8]
        cached = f["features/avg_pool"][:8]
    model = keras.models.load_model(LITE0, compile=False)
    feat = keras.Model(model.input, model.get_layer("avg_pool").output)
    x = (np.stack([load_image(data / p, 224, "crop") for p in rel]).astype("float32") - 127.0) / 128.0
    np.testing.assert_allclose(cached, np.asarray(feat(x, training=False)), rtol=1e-4, atol=1e-4)


def test_odd_inputs_folder_goes_through_the_pipeline(tmp_path):
    """Every good/ file becomes a row, every bad/ file a skip with a reason, and the run completes."""
    odd = shared_path("datasets", "odd-inputs")
    cfg = ExtractConfig(backbone=str(LITE0), data=str(odd), out=str(tmp_path / "odd.h5"), batch_size=4)
    with h5py.File(extract(cfg, verbose=False).path) as f:
        rows = set(f["paths"].asstr()[()])
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][()]}
        assert f.attrs["complete"]
    good = {f"good/{p.name}" for p in (odd / "good").iterdir()}
    bad = {f"bad/{p.name}" for p in (odd / "bad").iterdir()}
    assert rows == good
    assert set(skipped) == bad | {"README.md"}
    assert all(skipped[b] for b in bad)
