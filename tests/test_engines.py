"""Engines: ONNX Runtime and TensorFlow compute the same features (1e-5 relative), each one bit for bit run after run;
the export is kept once beside the caches; `auto`, fallback and refusals behave as documented."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

import features.engines as engines
from features.backbones import get_backbone
from features.engines import EngineOptions, Graph, onnx_forward, resolve_engine, tf_forward
from features.errors import UsageError
from features.images import load_image
from features.model import build_base, cut, installed_version
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import LITE0, ROOT


def real_pixels(n: int, size: int) -> np.ndarray:
    paths = sorted((ROOT / "data" / "hymenoptera-small" / "train").rglob("*.jpg"))[:n]
    return np.stack([load_image(p, size, "crop") for p in paths])


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Within 1e-5 of the features' scale, elementwise."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("backbone,layer,size,pool", [(str(LITE0), "avg_pool", 224, "none"),
                                                      ("vgg19", "block2_pool", 48, "avg")])
def test_onnx_runtime_equals_tensorflow_and_is_deterministic(backbone, layer, size, pool, tmp_path):
    spec = get_backbone(backbone)
    keras.utils.set_random_seed(0)
    model = cut(build_base(spec, "imagenet" if backbone == str(LITE0) else "none", size), [layer])
    graph = Graph(lambda: model, spec.preprocess.fn, 4, size, pool)
    pixels = real_pixels(4, size)
    ref = tf_forward(graph, EngineOptions())(pixels)
    kept = EngineOptions(export=tmp_path / "g.onnx")
    ort = onnx_forward(graph, kept)
    got = ort(pixels)
    assert len(got) == 1 and got[0].shape == ref[0].shape and got[0].dtype == np.float32
    assert_close(got[0], ref[0])
    assert np.abs(ref[0]).max() > 0  # not a trivially equal all-zero output
    again = onnx_forward(graph, kept)  # a new session on the kept file, as a resumed run or another shard gets
    assert (tmp_path / "g.onnx").exists()
    assert np.array_equal(again(pixels)[0], got[0]) and np.array_equal(ort(pixels)[0], got[0])


def test_float16_storage_is_cast_inside_the_graph(tmp_path):
    keras.utils.set_random_seed(0)
    spec = get_backbone("vgg19")
    model = cut(build_base(spec, "none", 32), ["block1_pool"])
    graph = Graph(lambda: model, spec.preprocess.fn, 2, 32, "max", "float16")
    pixels = real_pixels(2, 32)
    got = onnx_forward(graph, EngineOptions())(pixels)[0]
    assert got.dtype == np.float16 and got.shape == (2, 64)
    want = tf_forward(graph, EngineOptions())(pixels)[0]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3)  # float16's step


def test_onnx_runtime_runs_sub_batches_that_fit_the_activation_budget(monkeypatch, tmp_path):
    import onnx

    keras.utils.set_random_seed(0)
    spec = get_backbone("vgg19")
    model = cut(build_base(spec, "none", 32), ["block1_pool"])
    graph = Graph(lambda: model, spec.preprocess.fn, 4, 32, "avg")
    assert engines.peak_activation_bytes(graph) == 32 * 32 * 64 * 4  # block1_conv1/2's output; weights not counted
    pixels = real_pixels(4, 32)
    whole = onnx_forward(graph, EngineOptions(export=tmp_path / "whole.onnx"))(pixels)[0]
    monkeypatch.setattr(engines, "ACTIVATION_BUDGET", 2 * 32 * 32 * 64 * 4)
    assert engines.onnx_batch(graph) == 2
    got = onnx_forward(graph, EngineOptions(export=tmp_path / "sub.onnx"))(pixels)[0]
    assert onnx.load(tmp_path / "sub.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert got.shape == whole.shape and np.abs(whole).max() > 0
    assert np.array_equal(got, whole)  # a slot's features do not depend on how many images share its call
    monkeypatch.setattr(engines, "ACTIVATION_BUDGET", 0)
    assert engines.onnx_batch(graph) == 1  # one image larger than the budget still runs
    with pytest.raises(UsageError, match="sub.onnx computes batches of 2, which do not divide the batch size 3; "
                                         "delete it"):
        onnx_forward(dataclasses.replace(graph, batch_size=3), EngineOptions(export=tmp_path / "sub.onnx"))


def test_auto_picks_onnx_on_cpu_tf_on_gpu_or_for_tf_only_options(tmp_path):
    path = tmp_path / "g.onnx"
    assert resolve_engine("auto", "float32", False, 0, path) == "onnx"
    assert resolve_engine("auto", "float32", False, 1, path) == "tf"
    assert resolve_engine("auto", "mixed", False, 0, path) == "tf"
    assert resolve_engine("auto", "float32", True, 0, path) == "tf"
    engines.unsupported_marker(path).write_text("ExportError: no\n")
    assert resolve_engine("auto", "float32", False, 0, path) == "tf"  # known not to export: no second attempt
    with pytest.raises(UsageError, match="engine 'onnx' does not implement --precision mixed"):
        resolve_engine("onnx", "mixed", False, 0, path)
    with pytest.raises(UsageError, match="engine 'gpu' is not valid. Expected one of: auto, tf, onnx"):
        resolve_engine("gpu", "float32", False, 0, path)


@pytest.fixture
def vgg_cfg(class_folder, tmp_path) -> ExtractConfig:
    """VGG19 block2_pool at 48 px with a weights file, so the export is kept (random weights are not)."""
    weights = tmp_path / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 48).save_weights(weights)
    return ExtractConfig(backbone="vgg19", weights=str(weights), data=str(class_folder), layer=["block2_pool"],
                         image_size=48, batch_size=8, pool="avg", out=str(tmp_path / "c" / "onnx.h5"))


def read(path) -> tuple[np.ndarray, dict]:
    with h5py.File(path) as f:
        return f["features/block2_pool"][()], dict(f.attrs)


def test_export_is_kept_beside_the_caches_and_reruns_are_bit_identical(vgg_cfg, tmp_path):
    first = extract(vgg_cfg, verbose=False)
    feats, attrs = read(first.path)
    assert first.engine == "onnx" and attrs["engine"] == "onnx" and attrs["onnxruntime_version"]
    exported = list((tmp_path / "c" / "engines").glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    again = extract(vgg_cfg.replace(overwrite=True), verbose=False)
    assert np.array_equal(read(again.path)[0], feats)
    assert exported[0].stat().st_mtime_ns == stamp  # paid once
    with pytest.raises(UsageError, match="engine: 'onnx' -> 'tf'"):
        extract(vgg_cfg.replace(engine="tf"), verbose=False)
    tf_feats, tf_attrs = read(extract(vgg_cfg.replace(engine="tf", out=str(tmp_path / "c" / "tf.h5")),
                                      verbose=False).path)
    assert tf_attrs["engine"] == "tf"
    assert_close(feats, tf_feats)


def test_a_run_on_a_kept_export_neither_builds_the_model_nor_imports_tensorflow(vgg_cfg):
    """What makes every run after the first start in 1-2 s instead of 8-9 (TensorFlow's import, the model's build)
    and stay at 40% of the memory: the kept export, its sub-batch and the versions the cache records are
    all read without TensorFlow, and the features are the same bits. Nor is scikit-learn or pandas imported (a
    folder without a labels CSV): 0.4-0.6 s of every rerun and update."""
    first = read(extract(vgg_cfg, verbose=False).path)
    flags = ["--backbone", "vgg19", "--weights", vgg_cfg.weights, "--data", vgg_cfg.data, "--layer", "block2_pool",
             "--image-size", "48", "--batch-size", "8", "--pool", "avg", "--out", vgg_cfg.out]
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('IMPORTED', [m for m in ('tensorflow', 'keras', 'tf2onnx', 'sklearn', 'pandas') if m in sys.modules]); "
            "sys.exit(rc)")
    for extra in (["--overwrite"], []):  # computed again, then confirmed up to date
        run = subprocess.run([sys.executable, "-c", code, "extract", *flags, *extra], capture_output=True, text=True,
                             cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "IMPORTED []" in run.stdout and "exporting" not in run.stdout
    again = read(vgg_cfg.out)
    assert np.array_equal(again[0], first[0])
    assert {k: again[1][k] for k in ("keras_version", "tensorflow_version", "onnxruntime_version")} == \
        {k: first[1][k] for k in ("keras_version", "tensorflow_version", "onnxruntime_version")}


def test_versions_are_read_from_the_installed_distributions_as_the_modules_report_them():
    import onnxruntime
    import sklearn
    import tensorflow as tf

    assert installed_version("tensorflow") == tf.__version__ and installed_version("keras") == keras.__version__
    assert installed_version("onnxruntime") == onnxruntime.__version__ and installed_version("h5py") == h5py.__version__
    assert installed_version("sklearn") == sklearn.__version__  # provided under another name: scikit-learn
    assert installed_version("no_such_module_here") == "unknown"


def test_a_graph_that_does_not_export_falls_back_under_auto_and_fails_under_onnx(vgg_cfg, monkeypatch, capsys):
    def unsupported(graph, path):
        raise engines.ExportError("ValueError: tf2onnx has no conversion for op 'Foo'")

    monkeypatch.setattr(engines, "export_onnx", unsupported)
    res = extract(vgg_cfg, verbose=True)
    assert res.engine == "tf" and read(res.path)[1]["engine"] == "tf"
    assert read(res.path)[1]["engine_reason"] == ("fallback: this graph does not export to ONNX (ValueError: tf2onnx "
                                                  "has no conversion for op 'Foo')")
    assert "note: this model does not export to ONNX (ValueError: tf2onnx has no conversion" in capsys.readouterr().out
    assert extract(vgg_cfg, verbose=False).status == "up-to-date"  # the marker makes auto choose tf from the start
    with pytest.raises(UsageError, match="engine 'onnx': this model does not export to ONNX .*op 'Foo'.*--engine tf"):
        extract(vgg_cfg.replace(engine="onnx", out=vgg_cfg.out.replace("onnx.h5", "explicit.h5")), verbose=False)
