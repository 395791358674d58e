"""A user's ONNX file as the backbone: declared by a sidecar like a .keras file, listed and cut at any tensor, run by
ONNX Runtime without TensorFlow, and giving the features of the Keras model it was exported from. The graphs here are
built with onnx.helper (no TensorFlow), except the Keras comparisons."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.backbones import get_backbone, sha256_file
from features.errors import UsageError
from features.images import load_image
from features.preprocess import numpy_preprocess
from features.schema import plain
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import HYMENOPTERA, LITE0, ROOT, run_cli

SIZE = 32


def tiny_onnx(path: Path, order: str = "NCHW", batch: int | str = "batch", side: int | str | None = None,
              preprocess: str | None = "torch", **sidecar) -> Path:
    """Conv -> Relu -> strided Conv -> Relu -> global pool -> MatMul, named as torch.onnx.export names tensors; fixed
    random weights; NHWC graphs transpose their input first, as tf2onnx exports do. `side=None`: free height and
    width; `order`: the input's layout. A sidecar beside it with `preprocess` and the fields `sidecar` gives, unless
    there is none of them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"conv1.weight": rng.normal(0, 0.1, (4, 3, 3, 3)), "conv2.weight": rng.normal(0, 0.1, (6, 4, 3, 3)),
               "fc.weight": rng.normal(0, 0.1, (6, 5))}
    x, nodes = "input", []
    if order == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["/to_nchw/Transpose_output_0"], perm=[0, 3, 1, 2]))
        x = "/to_nchw/Transpose_output_0"
    nodes += [
        helper.make_node("Conv", [x, "conv1.weight"], ["/conv1/Conv_output_0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/relu1/Relu_output_0"]),
        helper.make_node("Conv", ["/relu1/Relu_output_0", "conv2.weight"], ["/conv2/Conv_output_0"],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/relu2/Relu_output_0"]),
        helper.make_node("GlobalAveragePool", ["/relu2/Relu_output_0"], ["/pool/GlobalAveragePool_output_0"]),
        helper.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/Flatten_output_0"]),
        helper.make_node("MatMul", ["/Flatten_output_0", "fc.weight"], ["logits"]),
    ]
    shape = [batch, 3, side, side] if order == "NCHW" else [batch, side, side, 3]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
                              [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    meta = {**({"preprocess": preprocess} if preprocess else {}), **sidecar}
    if meta:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def reference(model: Path, pixels: np.ndarray, tensor: str, mode: str, layout: str) -> np.ndarray:
    """`tensor` of the original graph by ONNX Runtime, on pixels preprocessed by numpy_preprocess."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(model)
    if tensor not in [o.name for o in m.graph.output]:
        m.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    x = numpy_preprocess(mode)(pixels)
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([tensor], {"input": x.transpose(0, 3, 1, 2) if layout == "NCHW" else x})
    return outs[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """6 ants and 6 bees of the shipped photos, as DATA/<class>/."""
    root = tmp_path_factory.mktemp("photos") / "data"
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for src in sorted((HYMENOPTERA / "train" / name).glob("*.jpg"))[:6]:
            shutil.copy(src, root / name / src.name)
    return root


def features(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: v[()] for k, v in f["features"].items()} | {"paths": f["paths"][()]}


# ---- the sidecar and the data config ----------------------------------------------------------------------------

def test_layout_and_side_come_from_the_graph_and_the_rest_from_the_sidecar(tmp_path):
    spec = get_backbone(str(tiny_onnx(tmp_path / "nchw.onnx", input_size=48, crop_fraction=0.9,
                                      interpolation="bicubic")))
    assert spec.onnx and spec.file == tmp_path / "nchw.onnx"
    data = spec.data
    assert (data.input_size, data.preprocess, data.crop_fraction, data.interpolation, data.layout) == \
        (48, "torch", 0.9, "bicubic", "NCHW")
    assert spec.preprocess.description.endswith("; transposed to NCHW") and spec.preprocess.mode == "torch"
    nhwc = get_backbone(str(tiny_onnx(tmp_path / "nhwc.onnx", "NHWC", side=64, preprocess="tf")))
    assert (nhwc.data.layout, nhwc.input_size) == ("NHWC", 64)  # the fixed side, without input_size
    assert nhwc.preprocess.description == "tf: scaled to [-1, 1]"
    assert get_backbone(str(tmp_path / "nhwc.onnx"), "caffe").data.channels == "BGR"  # --preprocess over the sidecar
    with pytest.raises(UsageError, match="backbone '.*fixed.onnx' does not declare its preprocessing.*never assumed"):
        get_backbone(str(tiny_onnx(tmp_path / "fixed.onnx", preprocess=None)))


@pytest.mark.parametrize("build,message", [
    (dict(batch=1, side=3), r"input \(1, 3, 3, 3\) does not show whether it is NCHW or NHWC. Declare it in .*m.json: "
                            r"\"layout\": one of NHWC, NCHW."),
    (dict(order="NHWC", layout="NCHW"), r"layout 'NCHW' does not fit the model's input \(\?, \?, \?, 3\), which is "
                                        r"NHWC. Set \"layout\" to \"NHWC\" or remove it."),
    (dict(side=64, input_size=224), r"input_size 224 does not fit the model, whose input \(\?, 3, 64, 64\) is fixed "
                                    r"at 64. Set \"input_size\" to 64 or remove it."),
    (dict(layout="CHW"), r"layout 'CHW' is not valid. Expected one of: NHWC, NCHW."),
    (dict(crop_fraction=1.5), r"crop_fraction 1.5 is not valid. Expected .* a number in \(0, 1\] such as 0.875."),
])
def test_a_graph_that_does_not_fit_its_sidecar_is_refused_in_one_line(tmp_path, build, message):
    path = tiny_onnx(tmp_path / "m.onnx", **build)
    with pytest.raises(UsageError, match=message):
        get_backbone(str(path))


def test_files_that_are_not_usable_onnx_models_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xff not a protobuf \xff" * 10)
    junk.with_suffix(".json").write_text('{"preprocess": "tf"}')
    with pytest.raises(UsageError, match=r"backbone file '.*junk.onnx' is not (a readable ONNX model|an ONNX model)"):
        get_backbone(str(junk))
    two = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "two",
                            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
                            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(two), tmp_path / "two.onnx")
    (tmp_path / "two.json").write_text('{"preprocess": "tf"}')
    with pytest.raises(UsageError, match="takes 2 inputs \\(a, b\\); expected one image input"):
        get_backbone(str(tmp_path / "two.onnx"))
    with pytest.raises(UsageError, match="backbone file '.*gone.onnx' does not exist"):
        get_backbone(str(tmp_path / "gone.onnx"))


# ---- layers ------------------------------------------------------------------------------------------------------

def test_make_layers_lists_the_graphs_tensors_with_their_shapes_without_tensorflow(tmp_path):
    path = tiny_onnx(tmp_path / "net.onnx", input_size=SIZE)
    done = run_cli("layers", "--backbone", str(path), "--image-size", "40")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{path} at 40x40: 7 tensors (name, type, output shape per image, values per image)"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["relu1.Relu_output_0"][:4] == ["Relu", "(4,", "40,", "40)"]
    assert rows["conv2.Conv_output_0"][:4] == ["Conv", "(6,", "20,", "20)"]
    assert rows["logits"] == ["MatMul", "(5,)", "5", "<-", "default"]
    (tmp_path / "net.json").write_text(json.dumps({"preprocess": "torch", "default_layer": "/relu2/Relu_output_0"}))
    filtered = run_cli("layers", "--backbone", str(path), "--filter", "relu*")
    assert [line.split()[0] for line in filtered.stdout.splitlines()[1:]] == ["relu1.Relu_output_0",
                                                                               "relu2.Relu_output_0"]
    assert filtered.stdout.splitlines()[-1].endswith("<- default")  # the sidecar's default, named as in the graph


def test_layers_are_checked_before_any_image_is_read(tmp_path, photos):
    path = tiny_onnx(tmp_path / "net.onnx", input_size=SIZE)
    cfg = ExtractConfig(backbone=str(path), data=str(photos), out=str(tmp_path / "c.h5"), layer=["relu3"])
    with pytest.raises(UsageError, match=r"layer 'relu3' is not a tensor of backbone .* \(7 tensors; see 'make "
                                         r"layers BACKBONE=.*'\). Did you mean: .*relu"):
        extract(cfg, verbose=False)
    fixed = tiny_onnx(tmp_path / "fixed.onnx", side=SIZE)
    with pytest.raises(UsageError, match="image size 64 is not valid for backbone .* fixed at 32x32. Drop "
                                         "--image-size"):
        extract(cfg.replace(backbone=str(fixed), layer=[], image_size=64), verbose=False)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "engines").exists()


@pytest.mark.parametrize("change,message", [
    (dict(engine="tf"), "--engine tf needs TensorFlow. Drop --engine tf"),
    (dict(precision="mixed", jit=True), "--precision mixed and --jit need TensorFlow"),
    (dict(weights="none"), "weights 'none' is not valid for an ONNX backbone .*: its weights are in the file"),
])
def test_options_only_tensorflow_implements_are_refused(tmp_path, photos, change, message):
    path = tiny_onnx(tmp_path / "net.onnx", input_size=SIZE)
    with pytest.raises(UsageError, match=message):
        extract(ExtractConfig(backbone=str(path), data=str(photos), out=str(tmp_path / "c.h5"), **change),
                verbose=False)


def test_an_onnx_backbone_is_never_built_as_a_keras_model(tmp_path):
    from features.model import build_base

    spec = get_backbone(str(tiny_onnx(tmp_path / "net.onnx")))
    with pytest.raises(UsageError, match="is an ONNX graph, which runs on ONNX Runtime in extraction only; this "
                                         "command needs a Keras model"):
        build_base(spec, "default", SIZE)


# ---- extraction --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_extraction_runs_without_tensorflow_and_gives_onnx_runtimes_features(tmp_path, photos, layout):
    """In a fresh process (nothing imported TensorFlow before): a cut at an inner tensor, max-pooled over its height
    and width (NCHW inside the graph in both cases, as in a tf2onnx export), and the output, stored as float16; equal
    to ONNX Runtime on the original graph with the numpy preprocessing of the same pixels."""
    path = tiny_onnx(tmp_path / "net.onnx", layout, preprocess="caffe", input_size=SIZE)
    out = tmp_path / "c.h5"
    script = textwrap.dedent(f"""
        import sys
        from pipeline.config import ExtractConfig
        from pipeline.extraction import extract
        r = extract(ExtractConfig(backbone={str(path)!r}, data={str(photos)!r}, out={str(out)!r}, pool="max",
                                  layer=["/relu1/Relu_output_0", "logits"], dtype="float16", batch_size=4),
                    verbose=False)
        print(r.status, r.engine, sorted(r.layer_shapes.items()))
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["written onnx [('logits', (5,)), ('relu1.Relu_output_0', (4,))]",
                                        "tensorflow imported: False"]
    got = features(out)
    pixels = np.stack([load_image(photos / p.decode(), SIZE, "crop") for p in got["paths"]])
    inner = reference(path, pixels, "/relu1/Relu_output_0", "caffe", layout)
    np.testing.assert_allclose(got["relu1.Relu_output_0"], inner.max(axis=(2, 3)).astype(np.float16), rtol=1e-3)
    np.testing.assert_allclose(got["logits"], reference(path, pixels, "logits", "caffe", layout).astype(np.float16),
                               rtol=1e-3, atol=1e-4)
    with h5py.File(out) as f:
        attrs = {k: plain(v) for k, v in f.attrs.items()}
    assert attrs["engine"] == "onnx" and attrs["weights"] == f"sha256:{sha256_file(path)}"
    assert attrs["engine_reason"] == "rule: an ONNX file as the backbone runs on ONNX Runtime only"
    assert attrs["tf2onnx_version"] == "" and attrs["onnxruntime_version"]  # no converter touched the user's file
    assert attrs["backbone_file_sha256"] == sha256_file(path)
    assert attrs["layers"] == ["relu1.Relu_output_0", "logits"]
    assert attrs["preprocessing"].startswith("caffe: ") and attrs["preprocessing"].endswith(
        "; transposed to NCHW") == (layout == "NCHW")
    assert len(list((tmp_path / "engines").glob("*.onnx"))) == 1  # the cut copy, kept beside the cache


def test_avg_pool_and_a_graph_with_a_fixed_batch(tmp_path, photos):
    """A graph exported with batch 1 (torch.onnx.export without dynamic_axes) runs image by image."""
    path = tiny_onnx(tmp_path / "one.onnx", batch=1, side=SIZE, preprocess="mean=120/110/100,std=60/50/40")
    out = extract(ExtractConfig(backbone=str(path), data=str(photos), out=str(tmp_path / "c.h5"), pool="avg",
                                layer=["relu2.Relu_output_0"], batch_size=4), verbose=False).path
    import onnx

    kept = next((tmp_path / "engines").glob("*.onnx"))
    assert onnx.load(kept).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    got = features(out)
    pixels = np.stack([load_image(photos / p.decode(), SIZE, "crop") for p in got["paths"]])
    want = np.concatenate([reference(path, pixels[i:i + 1], "/relu2/Relu_output_0", "mean=120/110/100,std=60/50/40",
                                     "NCHW") for i in range(len(pixels))]).mean(axis=(2, 3))
    np.testing.assert_allclose(got["relu2.Relu_output_0"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="takes batches of exactly 1 images|which do not divide"):
        two = tiny_onnx(tmp_path / "two.onnx", batch=2, side=SIZE)
        extract(ExtractConfig(backbone=str(two), data=str(photos), out=str(tmp_path / "d.h5"), batch_size=3),
                verbose=False)


def test_resume_shards_merge_and_update_work_as_for_keras_models(tmp_path, photos, monkeypatch):
    import features.engines as engines
    from pipeline.merge import merge

    path = tiny_onnx(tmp_path / "net.onnx", input_size=SIZE)
    cfg = ExtractConfig(backbone=str(path), data=str(photos), layer=["relu2.Relu_output_0"], pool="avg",
                        batch_size=4, workers=1)
    whole = extract(cfg.replace(out=str(tmp_path / "whole.h5")), verbose=False).path

    calls, real = [], engines.ENGINES["onnx"]

    def stops_after_two_batches(graph, options):
        forward = real(graph, options)

        def run(pixels):
            calls.append(1)
            if len(calls) > 3:  # the shape probe, then two batches
                raise KeyboardInterrupt
            return forward(pixels)

        return run

    monkeypatch.setitem(engines.ENGINES, "onnx", stops_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg.replace(out=str(tmp_path / "resumed.h5")), verbose=False)
    monkeypatch.setitem(engines.ENGINES, "onnx", real)
    resumed = extract(cfg.replace(out=str(tmp_path / "resumed.h5")), verbose=False)
    assert resumed.status == "resumed" and resumed.processed == 4
    for name, values in features(whole).items():
        np.testing.assert_array_equal(features(resumed.path)[name], values)

    for i in range(2):
        extract(cfg.replace(out=str(tmp_path / "merged.h5"), shard=f"{i}/2"), verbose=False)
    merged = merge(tmp_path / "merged.h5")
    for name, values in features(whole).items():
        np.testing.assert_array_equal(features(merged.path)[name], values)

    assert extract(cfg.replace(out=str(whole)), verbose=False).status == "up-to-date"
    shutil.copy(next((photos / "ants").glob("*.jpg")), photos / "bees" / "new.jpg")
    try:
        updated = extract(cfg.replace(out=str(whole)), verbose=False)
    finally:
        (photos / "bees" / "new.jpg").unlink()
    assert updated.status == "updated" and updated.reused == 12 and updated.images == 13


def test_classify_and_predict_find_the_onnx_backbone_by_its_hash(tmp_path, photos):
    """predict re-extracts new images through the same .onnx file, found by sha256 after the model folder moved."""
    from classifiers import saved
    from pipeline.classification import ClassifyConfig, classify
    from pipeline.prediction import PredictConfig, predict

    (tmp_path / "nets").mkdir()
    path = tiny_onnx(tmp_path / "nets" / "net.onnx", input_size=SIZE)
    cache = extract(ExtractConfig(backbone=str(path), data=str(photos), out=str(tmp_path / "c.h5"),
                                  layer=["relu2.Relu_output_0"], pool="avg"), verbose=False).path
    run = classify(ClassifyConfig(features=str(cache), heads="logreg", cv=2, out=str(tmp_path / "run")))
    assert (run / "report.html").exists()
    record = saved.load_record(run / "best")
    assert record["backbone_file_sha256"] and Path(record["backbone_abspath"]) == path.resolve()
    moved = tmp_path / "elsewhere" / "best"
    shutil.copytree(run / "best", moved)
    assert saved.locate_backbone(saved.load_record(moved), moved) == str(path.resolve())
    csv = predict(PredictConfig(model=str(moved), data=str(photos), out=str(tmp_path / "p.csv")))
    import pandas as pd

    table = pd.read_csv(csv)
    assert len(table) == 12 and set(table["predicted"]) <= {"ants", "bees"} and table["error"].isna().all()
    from pipeline.finetune import FinetuneConfig, finetune

    with pytest.raises(UsageError, match="was trained on features of the ONNX graph .* fine-tuning needs a Keras "
                                         "model"):
        finetune(FinetuneConfig(model=str(moved)))
    assert not (moved / "finetune").exists()
    path.write_bytes(path.read_bytes() + b"\x00")  # another file at that path: refused by its hash
    with pytest.raises(UsageError, match="Backbone mismatch"):
        predict(PredictConfig(model=str(moved), data=str(photos), out=str(tmp_path / "q.csv")))


# ---- the preprocessing as ONNX operations ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "none", "mean=127,std=128", "mean=1/2/3,std=4/5/6"])
def test_the_graphs_preprocessing_equals_numpy_preprocess(tmp_path, mode):
    """The cut copy of an identity graph returns its input: the declared preprocessing, done by ONNX operations."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from features import onnx_backbone

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["same"])], "id",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 8, 8, 3])],
                              [helper.make_tensor_value_info("same", TensorProto.FLOAT, ["n", 8, 8, 3])])
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    path.with_suffix(".json").write_text(json.dumps({"preprocess": mode, "input_size": 8}))
    spec = get_backbone(str(path))
    cut = onnx_backbone.cut_graph(spec, ["same"], 8, 4, "none", "float32")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    got = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        onnx_backbone.PIXELS: pixels})[0]
    np.testing.assert_allclose(got, numpy_preprocess(mode)(pixels), rtol=1e-6, atol=1e-6)


# ---- the same features as the Keras model it came from -----------------------------------------------------------

def export_keras_to_onnx(keras_file: Path, layer: str, size: int, out: Path) -> Path:
    """The .keras model cut at `layer`, exported by Keras' ONNX exporter (tf2onnx), float32 NHWC input."""
    import warnings

    import tensorflow as tf

    from features.model import build_base, cut

    model = cut(build_base(get_backbone(str(keras_file)), "default", size), [layer])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(out), format="onnx", verbose=False,
                     input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
    return out


def assert_onnx_file_gives_the_keras_features(keras_file: Path, layer: str, size: int, data: Path, folder: Path,
                                              sidecar: dict) -> float:
    onnx_file = export_keras_to_onnx(keras_file, layer, size, folder / "exported.onnx")
    (folder / "exported.json").write_text(json.dumps(sidecar))
    want = extract(ExtractConfig(backbone=str(keras_file), data=str(data), layer=[layer], engine="tf",
                                 out=str(folder / "keras.h5")), verbose=False).path
    got = extract(ExtractConfig(backbone=str(onnx_file), data=str(data), out=str(folder / "onnx.h5")),
                  verbose=False).path
    listed = run_cli("layers", "--backbone", str(onnx_file))
    assert listed.returncode == 0 and "<- default" in listed.stdout, listed.stderr
    (a,), (b,) = ([v for k, v in features(p).items() if k != "paths"] for p in (want, got))
    assert a.shape == b.shape and np.abs(a).max() > 0
    difference = float(np.abs(a - b).max())
    assert difference < 1e-4
    return difference


def test_a_keras_model_exported_with_tf2onnx_gives_the_same_features(tmp_path, photos):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(inp)
    x = keras.layers.DepthwiseConv2D(3, activation="relu6", name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    keras.Model(inp, keras.layers.Dense(3, name="top")(x)).save(tmp_path / "small.keras")
    sidecar = {"preprocess": "mean=127,std=128", "input_size": SIZE, "default_layer": "avg_pool"}
    (tmp_path / "small.json").write_text(json.dumps(sidecar))  # the .keras sidecar, copied: a Keras layer's name
    assert_onnx_file_gives_the_keras_features(tmp_path / "small.keras", "avg_pool", SIZE, photos, tmp_path, sidecar)


@pytest.mark.slow
def test_the_shipped_lite0_exported_to_onnx_gives_its_keras_features(tmp_path, photos):
    """Issue 27's check: Lite0 cut at avg_pool, exported with tf2onnx, with the documented sidecar (README, 'Your own
    ONNX model'), extracts the features of the .keras file within 1e-4."""
    difference = assert_onnx_file_gives_the_keras_features(LITE0, "avg_pool", 224, photos, tmp_path, {
        "preprocess": "mean=127,std=128", "input_size": 224, "default_layer": "avg_pool"})
    print(f"Lite0 .onnx vs .keras: max abs difference {difference:.2e}")


def test_a_keras_layer_name_is_its_output_only_where_one_scope_has_that_name():
    """tf2onnx names tensors `<model>/<layer>_<n>/<op>:0`; a Keras name is the last tensor of its one scope, followed
    through unscoped layout operations only (not into the next layer, not through arithmetic)."""
    from types import SimpleNamespace

    from features.onnx_backbone import _layer_of, tensor_names

    def node(op, inputs, output):
        return SimpleNamespace(op_type=op, input=inputs, output=[output])

    model = SimpleNamespace(graph=SimpleNamespace(node=[
        node("Conv", ["x"], "m/conv_1/Conv:0"), node("Relu", ["m/conv_1/Conv:0"], "m/conv_1/Relu:0"),
        node("Conv", ["m/conv_1/Relu:0"], "m/conv_2/Conv:0"),
        node("GlobalAveragePool", ["m/conv_2/Conv:0"], "m/avg_pool_1/Mean:0"),
        node("Squeeze", ["m/avg_pool_1/Mean:0"], "Squeeze:0"), node("Identity", ["Squeeze:0"], "Identity:0"),
        node("Mul", ["Identity:0"], "Mul:0")]))
    names = tensor_names(model)
    assert _layer_of("avg_pool", names, model) == "Identity:0"  # through Squeeze and Identity, not the Mul
    assert _layer_of("conv_1", names, model) == "m.conv_1.Relu:0"  # the scope's last tensor, not the next layer's
    assert _layer_of("conv", names, model) is None  # conv_1 and conv_2: two scopes
    assert _layer_of("Mean", names, model) is None  # an op's name is not a scope
    assert _layer_of("m/conv_2/Conv:0", names, model) == "m.conv_2.Conv:0"  # a tensor's own name
