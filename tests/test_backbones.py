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


# family -> (the keras.applications module whose preprocess_input it must use, what that does to a pixel), written
# out here from the Keras documentation, independently of the registry's own table
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
EXPECTED = {
    "caffe": lambda x: x[..., ::-1] - [103.939, 116.779, 123.68],
    "tf": lambda x: x / 127.5 - 1,
    "torch": lambda x: (x / 255 - MEAN) / STD,
    "none": lambda x: x,
}
FAMILY_PREPROCESS = {
    "vgg16": ("vgg16", "caffe"), "vgg19": ("vgg19", "caffe"), "resnet50": ("resnet", "caffe"),
    "resnet152": ("resnet", "caffe"), "resnet50v2": ("resnet_v2", "tf"), "inceptionv3": ("inception_v3", "tf"),
    "inceptionresnetv2": ("inception_resnet_v2", "tf"), "xception": ("xception", "tf"),
    "mobilenet": ("mobilenet", "tf"), "mobilenetv2": ("mobilenet_v2", "tf"),
    "mobilenetv3small": ("mobilenet_v3", "none"), "densenet121": ("densenet", "torch"),
    "nasnetmobile": ("nasnet", "tf"), "efficientnetb3": ("efficientnet", "none"),
    "efficientnetv2s": ("efficientnet_v2", "none"), "convnexttiny": ("convnext", "none"),
}
NATIVE_SIZE = {"inceptionv3": 299, "inceptionresnetv2": 299, "xception": 299, "efficientnetb3": 300,
               "efficientnetv2s": 384}


@pytest.fixture(scope="module")
def fixed_image() -> np.ndarray:
    """A 2x3 RGB image whose channels differ everywhere, so a swapped channel order or a wrong scale shows."""
    return np.array([[[255, 128, 0], [0, 64, 255], [10, 200, 30]],
                     [[90, 90, 90], [250, 5, 120], [33, 66, 99]]], "float32")[None]


@pytest.mark.parametrize("name", sorted(FAMILY_PREPROCESS))
def test_registry_entry_applies_its_familys_preprocess_input(name, fixed_image):
    import keras

    module, mode = FAMILY_PREPROCESS[name]
    spec = get_backbone(name)
    got = np.asarray(spec.preprocess.fn(fixed_image.copy()))  # keras preprocesses numpy in place: copies
    family = np.asarray(getattr(keras.applications, module).preprocess_input(fixed_image.copy()))
    np.testing.assert_allclose(got, family, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, EXPECTED[mode](fixed_image), rtol=1e-5, atol=1e-4)
    assert spec.preprocess.description.startswith(f"keras.applications.{module}.preprocess_input")
    assert spec.input_size == NATIVE_SIZE.get(name, 224)


@pytest.mark.parametrize("name", list_backbones())
def test_every_registry_entry_declares_a_family_preprocess_and_a_native_size(name):
    spec = get_backbone(name)
    assert spec.input_size in (224, 240, 260, 299, 300, 331, 380, 384, 456, 480, 528, 600)
    assert spec.preprocess.description.startswith("keras.applications.")


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
