"""Data configs as data (timm's pretrained_cfg): one record per backbone (input size, crop fraction, interpolation,
mean/std or preprocessing mode, layout), filled alike by the registry, .keras sidecars and .onnx sidecars, printed by
`make backbones`; and every mode's numpy steps equal to Keras' preprocessing. Needs no weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features import backbones
from features.backbones import get_backbone, list_backbones
from features.errors import UsageError
from features.preprocess import (DataConfig, MODE_DESCRIPTIONS, numpy_preprocess, resolve_preprocess, steps)
from tests.conftest import LITE0

ROWS = {row[0]: row for row in backbones._APPLICATIONS}  # name -> (name, constructor, module, size, mode)
MODES = [*MODE_DESCRIPTIONS, "mean=127,std=128", "mean=123.675/116.28/103.53,std=58.395/57.12/57.375"]


def random_pixels(seed: int = 0) -> np.ndarray:
    """A batch of random RGB pixels in [0, 255], float32 as the extractor passes them (not only whole numbers)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 256, (2, 5, 7, 3)), rng.uniform(0, 255, (2, 5, 7, 3))]).astype(np.float32)


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbones_record_preprocesses_as_its_familys_preprocess_input(name):
    """All 40 entries: the record's mode, applied in numpy, equals keras.applications.<family>.preprocess_input."""
    import keras

    _, _, module, size, _ = ROWS[name]
    spec = get_backbone(name)
    data = spec.data
    x = random_pixels()
    family = np.asarray(getattr(keras.applications, module).preprocess_input(x.copy()))  # in place: a copy
    np.testing.assert_allclose(numpy_preprocess(data.preprocess)(x), family, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(spec.preprocess.fn(x.copy())), family, rtol=1e-6, atol=1e-6)
    mean, std = data.mean_std()  # the same map written as (x - mean) / std in the record's channel order
    ordered = x[..., ::-1] if data.channels == "BGR" else x
    np.testing.assert_allclose((ordered - mean) / np.asarray(std), family, rtol=1e-4, atol=1e-4)
    assert (data.input_size, data.layout) == (size, "NHWC") and 0 < data.crop_fraction <= 1
    assert data.interpolation in ("bilinear", "bicubic")


@pytest.mark.parametrize("mode", MODES)
def test_numpy_steps_equal_keras_for_every_mode(mode):
    """caffe, tf and torch: bit for bit Keras' numpy path (same float32 operations in the same order); none and
    mean/std: the TensorFlow ops resolve_preprocess uses in the graph."""
    x = random_pixels(1)
    want = np.asarray(resolve_preprocess(mode).fn(x.copy()), np.float32)
    got = numpy_preprocess(mode)(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    if mode in ("caffe", "tf", "torch"):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(x, random_pixels(1))  # the input is not changed in place


def test_the_steps_and_the_record_say_what_each_mode_does():
    assert steps("caffe") == (("bgr", ()), ("sub", (103.939, 116.779, 123.68)))
    assert steps("mean=1/2/3,std=4/5/6") == (("sub", (1.0, 2.0, 3.0)), ("div", (4.0, 5.0, 6.0)))
    assert DataConfig(224, "torch").mean_std() == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert DataConfig(224, "none").mean_std() == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert DataConfig(224, "caffe").channels == "BGR" and DataConfig(224, "tf").channels == "RGB"
    with pytest.raises(UsageError, match="preprocess 'scale' is not valid"):
        steps("scale")


def test_the_registry_records_how_each_family_was_evaluated():
    """EfficientNet: size / (size + 32), bicubic (its TF reference); ConvNeXt bicubic; the rest 0.875 bilinear."""
    for i, (size, crop) in enumerate([(224, 0.875), (240, 0.8824), (260, 0.8904), (300, 0.9036), (380, 0.9223),
                                      (456, 0.9344), (528, 0.9429), (600, 0.9494)]):
        data = get_backbone(f"efficientnetb{i}").data
        assert (data.input_size, data.crop_fraction, data.interpolation) == (size, crop, "bicubic")
    assert (get_backbone("convnexttiny").data.crop_fraction, get_backbone("convnexttiny").data.interpolation) == \
        (0.875, "bicubic")
    assert get_backbone("vgg19").data == DataConfig(224, "caffe", 0.875, "bilinear", "NHWC")


def test_a_keras_sidecar_fills_the_same_record(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"PK")  # never loaded here
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps({"preprocess": "torch", "input_size": 96, "crop_fraction": 0.95,
                                   "interpolation": "bicubic"}))
    assert get_backbone(str(tmp_path / "m.keras")).data == DataConfig(96, "torch", 0.95, "bicubic", "NHWC")
    assert get_backbone(str(LITE0)).data == DataConfig(224, "mean=127,std=128", 0.875, "bilinear", "NHWC")
    for meta, message in [
        ({"crop_fraction": 0}, r"crop_fraction 0 is not valid. Expected the share of the shorter side that the "
                               r"model's centre crop keeps, a number in \(0, 1\] such as 0.875."),
        ({"crop_fraction": True}, "crop_fraction True is not valid"),
        ({"interpolation": "cubic"}, "interpolation 'cubic' is not valid. Expected one of: bilinear, bicubic, area, "
                                     "nearest, lanczos."),
        ({"layout": "NCHW"}, "layout 'NCHW' is for .onnx backbones; a .keras model takes NHWC"),
    ]:
        sidecar.write_text(json.dumps({"preprocess": "tf", **meta}))
        with pytest.raises(UsageError, match=message):
            get_backbone(str(tmp_path / "m.keras"))


def test_make_backbones_prints_every_record_in_one_table(capsys):
    from pipeline.inspect_cmd import add_backbones_arguments, run_backbones
    import argparse

    parser = argparse.ArgumentParser()
    add_backbones_arguments(parser)
    assert run_backbones(parser.parse_args([])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "size", "crop", "interp", "input", "chan", "mean", "std", "preprocess"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(list_backbones()) <= set(rows)
    assert rows["vgg19"][1:] == ["224", "0.875", "bilinear", "NHWC", "BGR", "103.939/116.779/123.68", "1", "caffe"]
    assert rows["efficientnetb7"][1:4] == ["600", "0.9494", "bicubic"]
    assert rows["densenet121"][5:] == ["RGB", "123.675/116.28/103.53", "58.395/57.12/57.375", "torch"]
    assert rows["models/efficientnet_lite0/efficientnet_lite0_imagenet.keras"][6:] == ["127", "128",
                                                                                      "mean=127,std=128"]


def test_the_centre_crop_keeps_the_share_the_backbones_record_declares(tiny_backbone, class_folder, tmp_path):
    """A sidecar's crop_fraction 1.0 (the whole short side) reaches the resize: the cached features equal the model
    on images cropped at 1.0, differ from those at the default 0.875, and the cache records the share it used."""
    import shutil

    import h5py
    import keras

    from features.images import load_image
    from features.store import read_attrs
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    model_file = shutil.copy(tiny_backbone, tmp_path / "whole.keras")
    meta = json.loads(tiny_backbone.with_suffix(".json").read_text())
    (tmp_path / "whole.json").write_text(json.dumps({**meta, "crop_fraction": 1.0}))
    cfg = ExtractConfig(backbone=str(model_file), data=str(class_folder), image_size=32, workers=1)
    whole = extract(cfg.replace(out=str(tmp_path / "whole.h5")), verbose=False).path
    usual = extract(cfg.replace(backbone=str(tiny_backbone), out=str(tmp_path / "usual.h5")), verbose=False).path
    assert (read_attrs(whole).crop_fraction, read_attrs(usual).crop_fraction) == (1.0, 0.875)
    with h5py.File(whole) as f:
        paths, got = f["paths"].asstr()[()], f["features/avg_pool"][()]
    model, spec = keras.models.load_model(tiny_backbone), get_backbone(str(model_file))

    def forward(crop: float) -> np.ndarray:
        pixels = np.stack([load_image(class_folder / p, 32, "crop", crop=crop) for p in paths]).astype("float32")
        return np.asarray(model(spec.preprocess.fn(pixels), training=False))

    np.testing.assert_allclose(got, forward(1.0), rtol=1e-4, atol=1e-5)
    assert np.abs(got - forward(0.875)).max() > 1e-3
