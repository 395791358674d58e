"""features/backbones.py: every row of the backbone table checked against keras.applications itself (the module of
its constructor, what its preprocess_input does to a pixel, the default size the constructor asks
`obtain_input_shape` for), the row builders called directly (the registry is built at import, where a mutant of them
is never active), and the exact sentences of every refusal. Written against the mutants `make mutate
MODULES=features/backbones.py` left alive (docs/testing.md); nothing here builds a network."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest

from features import backbones
from features.backbones import BackboneSpec, get_backbone, list_backbones, read_sidecar, sha256_file
from features.errors import UsageError
from features.preprocess import MODE_DESCRIPTIONS, resolve_preprocess

ROWS = backbones._APPLICATIONS  # (name, constructor, preprocess module, native size, preprocess mode)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
EXPECTED = {  # what each mode does to RGB pixels in [0, 255], from the Keras documentation
    "caffe": lambda x: x[..., ::-1] - [103.939, 116.779, 123.68],
    "tf": lambda x: x / 127.5 - 1,
    "torch": lambda x: (x / 255 - MEAN) / STD,
    "none": lambda x: x,
}
IMAGE = np.array([[[255, 128, 0], [0, 64, 255], [10, 200, 30]],
                  [[90, 90, 90], [250, 5, 120], [33, 66, 99]]], "float32")[None]


def test_the_table_lists_every_family_once_and_the_registry_is_the_table():
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names)) == 40
    assert list_backbones() == sorted(names) and list_backbones("*") == sorted(names)
    assert list_backbones("resnet*v2") == ["resnet101v2", "resnet152v2", "resnet50v2"]
    assert list_backbones("nothing*") == []
    for name, ctor, module, size, mode in ROWS:
        spec = get_backbone(name)
        assert (spec.name, spec.input_size, spec.default_layer, spec.file) == (name, size, None, None)
        assert spec.build.__qualname__ == f"keras.applications.{ctor}"
        assert spec.preprocess.description == backbones._family_preprocess(module, mode).description


@pytest.mark.parametrize("name,ctor,module,size,mode", ROWS, ids=[row[0] for row in ROWS])
def test_each_row_matches_its_keras_application(name, ctor, module, size, mode, monkeypatch):
    """The preprocess module is the constructor's own module, its preprocess_input does what the row's mode says,
    and the size is the default the constructor itself asks for (probed, nothing is built)."""
    import keras
    from keras.src.applications import imagenet_utils

    constructor = getattr(keras.applications, ctor)
    assert constructor.__module__.rsplit(".", 1)[-1] == module
    family = getattr(keras.applications, module).preprocess_input
    np.testing.assert_allclose(np.asarray(family(IMAGE.copy())), EXPECTED[mode](IMAGE), rtol=1e-5, atol=1e-4)

    class Probe(Exception):
        pass

    def probe(input_shape, default_size, *args, **kwargs):
        raise Probe(default_size)

    if module == "mobilenet_v3":  # sizes itself without obtain_input_shape; Keras documents 224
        assert size == 224
        return
    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", probe)
    with pytest.raises(Probe) as asked:
        constructor(include_top=True, weights=None)
    assert asked.value.args[0] == size


@pytest.mark.parametrize("module,mode", sorted({(row[2], row[4]) for row in ROWS}))
def test_a_family_preprocess_calls_its_modules_preprocess_input_and_says_what_it_does(module, mode):
    import keras

    made = backbones._family_preprocess(module, mode)
    what = "the model normalises internally" if mode == "none" else f"{mode}: {MODE_DESCRIPTIONS[mode]}"
    assert made.description == f"keras.applications.{module}.preprocess_input ({what})" and made.mode == mode
    family = np.asarray(getattr(keras.applications, module).preprocess_input(IMAGE.copy()))
    np.testing.assert_array_equal(np.asarray(made.fn(IMAGE.copy())), family)


def test_an_application_builder_asks_keras_for_the_headless_network(monkeypatch):
    import keras

    calls = []
    monkeypatch.setattr(keras.applications, "VGG19", lambda **kwargs: calls.append(kwargs) or "net")
    build = backbones._application("VGG19", "vgg19")
    assert build.__qualname__ == "keras.applications.VGG19"
    assert build("imagenet", (64, 64, 3)) == "net"
    assert calls == [{"include_top": False, "weights": "imagenet", "input_shape": (64, 64, 3)}]
    assert get_backbone("vgg19").build(None, (32, 32, 3)) == "net" and calls[-1]["weights"] is None


def test_register_adds_an_entry_found_by_name_and_pattern(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    spec = BackboneSpec("zz-test", lambda w, s: None, resolve_preprocess("tf"), 64)
    assert backbones.register(spec) is spec
    assert get_backbone("zz-test") is spec and list_backbones("zz*") == ["zz-test"]


def test_sha256_of_a_file_larger_than_one_read_block(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (1 << 20) * 2 + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    """Asked again, the hash comes from memory; a file whose inode, size or modification time alone differs (each
    changed here with the other two kept) is hashed anew."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))

    def rewrite(data: bytes, replace: bool = False) -> None:
        """New contents: in place (same inode) or by replacing the file (new inode), with the old mtime kept."""
        mtime = path.stat().st_mtime_ns
        if replace:
            (tmp_path / "new").write_bytes(data)
            os.replace(tmp_path / "new", path)
        else:
            path.write_bytes(data)
        os.utime(path, ns=(mtime, mtime))

    first = sha256_file(path)
    assert sha256_file(path) == sha256_file(str(path)) == first and len(opened) == 1
    rewrite(b"three")  # the size alone
    assert sha256_file(path) == hashlib.sha256(b"three").hexdigest() and len(opened) == 2
    rewrite(b"other", replace=True)  # the inode alone
    assert sha256_file(path) == hashlib.sha256(b"other").hexdigest() and len(opened) == 3
    path.write_bytes(b"fifth")  # the mtime alone
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 1000))
    assert sha256_file(path) == hashlib.sha256(b"fifth").hexdigest() and len(opened) == 4


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    return path


def test_load_keras_refuses_each_bad_file_in_one_sentence(tmp_path, monkeypatch):
    import keras

    missing = tmp_path / "gone.keras"
    with pytest.raises(UsageError) as err:
        backbones.load_keras(missing, "backbone")
    assert str(err.value) == f"backbone file '{missing}' does not exist."
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"12345")
    with pytest.raises(UsageError) as err:
        backbones.load_keras(junk, "model")
    assert str(err.value) == (f"model file '{junk}' is not a Keras model: a .keras file is a zip archive written by "
                              "model.save(), and this one is not (5 bytes).")
    archive = _zip(tmp_path / "a.keras")
    for raised, expected in [
        (ValueError("Requested the deserialization of a Lambda layer"), "lambda"),
        (ValueError("refused: safe_mode=True"), "lambda"),
        (OSError("x" * 200 + "\nsecond line"), f"(OSError: {'x' * 160})"),
        (KeyError(""), "(KeyError: '')"),
        (ValueError("   "), "(ValueError: no details)"),
    ]:
        def fail(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(keras.saving, "load_model", fail)
        with pytest.raises(UsageError) as err:
            backbones.load_keras(archive, "backbone")
        if expected == "lambda":
            assert str(err.value) == (f"backbone file '{archive}' contains a Lambda layer (stored Python code), which "
                                      "is never loaded because it could run anything. Re-save the model with "
                                      "ordinary layers.")
        else:
            assert str(err.value) == (f"backbone file '{archive}' is not a readable Keras model {expected}. Expected a "
                                      ".keras archive written by model.save().")
    calls = []
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **kwargs: calls.append((args, kwargs)) or "model")
    assert backbones.load_keras(str(archive), "backbone") == "model"
    assert calls == [((archive,), {"compile": False, "safe_mode": True})]


def test_read_sidecar_defaults_and_refusals(tmp_path):
    model = tmp_path / "m.keras"
    assert backbones.sidecar_path(model) == tmp_path / "m.json"
    assert read_sidecar(model) == {"input_size": 224}  # no sidecar: the default size
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps({"preprocess": "tf", "default_layer": "avg_pool", "note": 1}))
    assert read_sidecar(model) == {"preprocess": "tf", "default_layer": "avg_pool", "note": 1, "input_size": 224}
    sidecar.write_text(json.dumps({"input_size": 8, "preprocess": None}))
    assert read_sidecar(model) == {"input_size": 8, "preprocess": None}
    example = '{"preprocess": "mean=127,std=128", "input_size": 224}'
    sidecar.write_text("{nope")
    with pytest.raises(UsageError) as err:
        read_sidecar(model)
    assert str(err.value).startswith(f"sidecar '{sidecar}' of backbone '{model}' is not valid JSON (Expecting ")
    assert str(err.value).endswith(f"). Expected an object such as {example}.")
    sidecar.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="is not valid JSON"):
        read_sidecar(model)
    sidecar.write_text("[224]")
    with pytest.raises(UsageError) as err:
        read_sidecar(model)
    assert str(err.value) == f"sidecar '{sidecar}' holds a list, expected an object such as {example}."
    for size in [7, True, 224.0, "224", None]:
        sidecar.write_text(json.dumps({"input_size": size}))
        with pytest.raises(UsageError) as err:
            read_sidecar(model)
        assert str(err.value) == (f"sidecar '{sidecar}': input_size {size!r} is not valid. Expected the model's input "
                                  "side length in pixels, a whole number >= 8 such as 224.")
    sidecar.write_text(json.dumps({"preprocess": 1}))
    with pytest.raises(UsageError) as err:
        read_sidecar(model)
    assert str(err.value) == (f"sidecar '{sidecar}': preprocess 1 is not valid. Expected a string such as \"tf\" or "
                              "\"mean=127,std=128\".")
    sidecar.write_text(json.dumps({"preprocess": "tf", "default_layer": ["a"]}))
    with pytest.raises(UsageError) as err:
        read_sidecar(model)
    assert str(err.value) == f"sidecar '{sidecar}': default_layer ['a'] is not valid. Expected a string: a layer name."


def test_a_user_model_takes_the_flag_over_its_sidecar_and_loads_with_safe_mode(tmp_path, monkeypatch):
    model = _zip(tmp_path / "m.keras")
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": "caffe", "input_size": 96, "default_layer": "top"}))
    spec = get_backbone(str(model))
    assert (spec.name, spec.input_size, spec.default_layer, spec.file) == (str(model), 96, "top", model)
    assert spec.preprocess.description == resolve_preprocess("caffe").description
    assert get_backbone(str(model), "torch").preprocess.description == resolve_preprocess("torch").description
    loaded = []
    monkeypatch.setattr(backbones, "load_keras", lambda path, what: loaded.append((path, what)) or "net")
    assert spec.build("ignored", (1, 1, 3)) == "net" and loaded == [(model, "backbone")]
    (tmp_path / "m.json").unlink()
    with pytest.raises(UsageError) as err:
        get_backbone(str(model))
    assert str(err.value) == (
        f"backbone '{model}' does not declare its preprocessing. Pass --preprocess (caffe|tf|torch|none|mean=M,std=S) "
        f"or write it into {tmp_path / 'm.json'} as {{\"preprocess\": \"mean=127,std=128\", \"input_size\": 224}}. "
        "A silent /255 is never assumed.")


def test_get_backbone_refusals_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(UsageError) as err:
        get_backbone(str(tmp_path / "x.keras"))
    assert str(err.value) == f"backbone file '{tmp_path / 'x.keras'}' does not exist."
    with pytest.raises(UsageError) as err:
        get_backbone("VGG19x")
    assert str(err.value) == ("unknown backbone 'VGG19x'. Expected a .keras file or one of the registered names "
                              "(see 'make backbones'). Did you mean: vgg19, vgg16?")
    with pytest.raises(UsageError) as err:
        get_backbone("vgg19", "tf")
    assert str(err.value) == "--preprocess is for .keras files; backbone 'vgg19' always uses its own preprocess_input."
    assert get_backbone("vgg19", None) is get_backbone("vgg19", "") is get_backbone("vgg19")


def test_a_backbone_file_is_hashed_in_reads_of_at_most_one_mebibyte(tmp_path, monkeypatch):
    """Backbones run to gigabytes: the hash never holds the whole file in memory."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"\1" * ((1 << 20) * 3 + 5))
    sizes = []

    class Recording:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            sizes.append(size)
            return self.f.read(size)

    monkeypatch.setattr(backbones, "open", lambda *args: Recording(open(*args)), raising=False)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sizes == [1 << 20] * 5  # three full blocks, the 5-byte tail, the empty read that ends the loop


@pytest.mark.parametrize("module,size,expected", [
    ("efficientnet", 224, (0.875, "bicubic")), ("efficientnet", 600, (0.9494, "bicubic")),
    ("efficientnet", 260, (0.8904, "bicubic")), ("convnext", 384, (0.875, "bicubic")),
    ("vgg19", 224, (0.875, "bilinear")), ("resnet", 999, (0.875, "bilinear")),
])
def test_how_a_family_was_evaluated(module, size, expected):
    """Called directly: the registry asks at import, where a mutant of it is never active."""
    assert backbones._evaluation(module, size) == expected


def test_every_registry_entry_records_its_familys_evaluation():
    for name, _, module, size, mode in ROWS:
        data = get_backbone(name).data
        assert (data.input_size, data.preprocess, data.layout) == (size, mode, "NHWC")
        assert (data.crop_fraction, data.interpolation) == backbones._evaluation(module, size)


def test_a_sidecars_evaluation_fields_are_checked_and_only_declared_ones_are_kept(tmp_path):
    model = tmp_path / "m.keras"
    sidecar = tmp_path / "m.json"
    for crop in [1, 1.0, 0.5, 1e-6]:
        sidecar.write_text(json.dumps({"crop_fraction": crop}))
        assert read_sidecar(model)["crop_fraction"] == crop
    for crop in [0, -0.1, 1.01, "0.9", False]:
        sidecar.write_text(json.dumps({"crop_fraction": crop}))
        with pytest.raises(UsageError) as err:
            read_sidecar(model)
        assert str(err.value) == (f"sidecar '{sidecar}': crop_fraction {crop!r} is not valid. Expected the share of "
                                  "the shorter side that the model's centre crop keeps, a number in (0, 1] such as "
                                  "0.875.")
    for key, bad, valid in [("interpolation", "cubic", "bilinear, bicubic, area, nearest, lanczos"),
                            ("layout", "nchw", "NHWC, NCHW")]:
        sidecar.write_text(json.dumps({key: bad}))
        with pytest.raises(UsageError) as err:
            read_sidecar(model)
        assert str(err.value) == f"sidecar '{sidecar}': {key} {bad!r} is not valid. Expected one of: {valid}."
    sidecar.write_text(json.dumps({"interpolation": None, "layout": "NCHW", "crop_fraction": None}))
    assert read_sidecar(model) == {"interpolation": None, "layout": "NCHW", "crop_fraction": None, "input_size": 224}
    assert backbones.declared_evaluation({"crop_fraction": 0.9, "interpolation": None, "layout": "NCHW"}) == {
        "crop_fraction": 0.9}
    assert backbones.declared_evaluation({"interpolation": "area", "input_size": 5}) == {"interpolation": "area"}


def test_a_keras_file_takes_channels_last_only(tmp_path):
    model = _zip(tmp_path / "m.keras")
    sidecar = tmp_path / "m.json"
    sidecar.write_text(json.dumps({"preprocess": "tf", "layout": "NHWC", "interpolation": "area"}))
    spec = get_backbone(str(model))
    assert (spec.layout, spec.interpolation, spec.crop_fraction, spec.onnx) == ("NHWC", "area", 0.875, False)
    sidecar.write_text(json.dumps({"preprocess": "tf", "layout": "NCHW"}))
    with pytest.raises(UsageError) as err:
        get_backbone(str(model))
    assert str(err.value) == (f"sidecar '{sidecar}': layout 'NCHW' is for .onnx backbones; a .keras model takes NHWC "
                              "(channels last). Remove \"layout\" or set it to \"NHWC\".")
    assert backbones.declared_preprocess(model, "torch", {"preprocess": "tf"}) == "torch"
    assert backbones.declared_preprocess(model, None, {"preprocess": "tf"}) == "tf"
    assert backbones.declared_preprocess(model, "", {"preprocess": "caffe"}) == "caffe"


def test_only_a_file_ending_in_onnx_is_an_onnx_backbone(tmp_path):
    tf = resolve_preprocess("tf")
    assert BackboneSpec("a", None, tf, 224, file=tmp_path / "m.onnx").onnx
    assert not BackboneSpec("a", None, tf, 224, file=tmp_path / "m.keras").onnx
    assert not BackboneSpec("a", None, tf, 224).onnx and not get_backbone("vgg19").onnx
    with pytest.raises(UsageError) as err:
        get_backbone(str(tmp_path / "gone.onnx"))
    assert str(err.value) == f"backbone file '{tmp_path / 'gone.onnx'}' does not exist."


def test_an_onnx_file_is_handed_to_the_onnx_backbone_with_its_preprocess_flag(tmp_path, monkeypatch):
    import features.onnx_backbone

    model = tmp_path / "m.onnx"
    model.write_bytes(b"graph")
    calls = []
    monkeypatch.setattr(features.onnx_backbone, "onnx_backbone", lambda *args: calls.append(args) or "spec")
    assert get_backbone(str(model), "tf") == "spec" and get_backbone(str(model)) == "spec"
    assert calls == [(model, "tf"), (model, None)]


def test_a_hub_name_goes_to_the_kerashub_loader_with_the_preset_and_the_preprocess_flag(monkeypatch):
    """`hub:<preset>` is handed, without its prefix, to features.hub_backbone (loaded by name); other names never
    are (a file called `hub.keras` is a file)."""
    import importlib

    calls = []
    hub = importlib.import_module("features.hub_backbone")
    monkeypatch.setattr(hub, "hub_backbone", lambda preset, preprocess: calls.append((preset, preprocess)) or "spec")
    assert get_backbone("hub:dinov2_small", "tf") == "spec" and get_backbone("hub:kaggle://a/b/1") == "spec"
    assert calls == [("dinov2_small", "tf"), ("kaggle://a/b/1", None)]
    with pytest.raises(UsageError, match="unknown backbone 'HUB:x'"):
        get_backbone("HUB:x")
