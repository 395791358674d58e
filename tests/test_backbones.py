"""Every registry entry is usable as documented; user .keras files declare their preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features.backbones import get_backbone, list_backbones
from features.errors import UsageError
from features.model import build_base
from features.preprocess import resolve_preprocess
from tests.conftest import LITE0

FAMILIES = ["vgg16", "vgg19", "resnet50", "resnet101", "resnet50v2", "inceptionv3", "xception", "mobilenet",
            "mobilenetv2", "mobilenetv3small", "mobilenetv3large", "densenet121", "efficientnetb0", "efficientnetb7",
            "efficientnetv2b0", "efficientnetv2s", "convnexttiny"]


def test_every_family_of_the_issue_is_registered():
    assert set(FAMILIES) <= set(list_backbones())
    assert list_backbones("efficientnetb*") == [f"efficientnetb{i}" for i in range(8)]


@pytest.mark.parametrize("name", list_backbones())
def test_registry_entry_has_its_own_preprocess_and_native_size(name):
    spec = get_backbone(name)
    assert spec.input_size in (224, 240, 260, 299, 300, 331, 380, 384, 456, 480, 528, 600)
    assert spec.preprocess.description.startswith("keras.applications.")
    assert "/255" not in spec.preprocess.description


def test_caffe_preprocessing_of_a_known_pixel_is_bgr_mean_subtracted():
    x = np.array([[[[255.0, 128.0, 0.0]]]], "float32")  # one RGB pixel
    got = np.asarray(get_backbone("vgg19").preprocess.fn(x)).ravel()
    np.testing.assert_allclose(got, [0 - 103.939, 128 - 116.779, 255 - 123.68], atol=1e-4)  # B, G, R


def test_tf_and_mean_std_preprocessing():
    x = np.array([0.0, 127.5, 255.0], "float32").reshape(1, 1, 1, 3)  # keras preprocesses numpy in place: copy
    np.testing.assert_allclose(np.asarray(resolve_preprocess("tf").fn(x.copy())).ravel(), [-1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(resolve_preprocess("mean=127,std=128").fn(x)).ravel(),
                               [-127 / 128, 0.5 / 128, 1.0], atol=1e-6)
    with pytest.raises(UsageError, match="preprocess 'mean=1' is not valid"):
        resolve_preprocess("mean=1")


def test_shipped_lite0_declares_its_preprocessing_in_a_sidecar():
    spec = get_backbone(str(LITE0))
    assert spec.preprocess.description == "RGB, (x - 127.0) / 128.0" and spec.default_layer == "avg_pool"


def test_user_model_without_declared_preprocessing_is_refused(tmp_path):
    import keras

    inp = keras.Input((None, None, 3))
    keras.Model(inp, keras.layers.Conv2D(4, 3, name="c")(inp)).save(tmp_path / "m.keras")
    with pytest.raises(UsageError, match="does not declare its preprocessing.*never assumed"):
        get_backbone(str(tmp_path / "m.keras"))
    assert get_backbone(str(tmp_path / "m.keras"), "torch").preprocess.description.startswith("torch")
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": "caffe", "input_size": 96}))
    assert get_backbone(str(tmp_path / "m.keras")).input_size == 96


@pytest.mark.parametrize("name", ["vgg19", "resnet50", "mobilenetv3small", "efficientnetb0"])
def test_backbones_build_at_native_size_without_weights(name):
    spec = get_backbone(name)
    model = build_base(spec, "none", spec.input_size)
    assert model.input_shape == (None, spec.input_size, spec.input_size, 3) and not model.trainable
