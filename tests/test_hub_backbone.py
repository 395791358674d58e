"""KerasHub presets as backbones (`hub:<preset>`): the data config from the preset's image converter, the token cut
points of vision transformers, both engines, and the one-line refusal of a preset that is not cached offline. The
presets here are tiny architectures with random weights saved by `save_to_preset` (no download): the same classes
and the same loading path as the built-in presets."""
from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.backbones import get_backbone
from features.errors import UsageError
from features.images import load_image
from features.model import build_base, cut, weights_identity
from features.preprocess import DataConfig
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import write_images

SIZE = 32
HIDDEN = 16
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's converter: ImageNet mean/std as scale/offset


def save_preset(folder: Path, backbone, converter) -> str:
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, str]:
    """Tiny DINOv2 (2 registers; position embeddings interpolated from 48 px, as the real ones are from 518) and ViT
    presets, each a folder as `save_to_preset` writes it."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("presets")
    blocks = dict(num_layers=2, num_heads=2)
    dino = keras_hub.models.DINOV2Backbone(patch_size=8, hidden_dim=HIDDEN, intermediate_dim=32,
                                           num_register_tokens=2, image_shape=(SIZE, SIZE, 3),
                                           position_embedding_shape=(48, 48, 3), **blocks)
    vit = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=8, hidden_dim=HIDDEN, mlp_dim=32,
                                       **blocks)
    return {
        "dinov2": save_preset(root / "dinov2", dino, keras_hub.layers.DINOV2ImageConverter(
            image_size=(SIZE, SIZE), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
            interpolation="bicubic")),
        "vit": save_preset(root / "vit", vit, keras_hub.layers.ViTImageConverter(
            image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0)),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "data"
    for k, name in enumerate(["a", "b"]):
        write_images(root / name, 3, seed=k)
    return root


# ---- the data config ---------------------------------------------------------------------------------------------

def test_the_data_config_is_the_presets_image_converter(presets):
    import keras_hub

    spec = get_backbone(f"hub:{presets['dinov2']}")
    assert spec.data == DataConfig(SIZE, "mean=123.675/116.28/103.53,std=58.395/57.12/57.375", 1.0, "bicubic",
                                   "NHWC")
    assert spec.default_layer == "cls_token" and spec.name == f"hub:{presets['dinov2']}"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    converter = keras_hub.layers.ImageConverter.from_preset(presets["dinov2"])
    want = pixels * np.asarray(converter.scale, np.float32) + np.asarray(converter.offset, np.float32)
    np.testing.assert_allclose(np.asarray(spec.preprocess.fn(pixels)), want, rtol=1e-5, atol=1e-5)
    vit = get_backbone(f"hub:{presets['vit']}").data
    assert (vit.preprocess, vit.mean_std(), vit.interpolation) == ("mean=127.5,std=127.5", ((127.5,) * 3,
                                                                   (127.5,) * 3), "bilinear")
    assert weights_identity(spec, "default").startswith("sha256:")  # a folder: its weights file's hash


def test_make_backbones_says_what_hub_means_and_lists_the_image_presets(capsys):
    from pipeline.inspect_cmd import add_backbones_arguments, run_backbones

    parser = argparse.ArgumentParser()
    add_backbones_arguments(parser)
    run_backbones(parser.parse_args([]))
    assert "hub:<preset>" in capsys.readouterr().out
    run_backbones(parser.parse_args(["--filter", "hub:dinov2*"]))
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("hub:")]
    assert "hub:dinov2_small" in listed and "hub:dinov2_with_registers_base" in listed


# ---- cut points --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,prefix", [("dinov2", 3), ("vit", 1)])
def test_class_token_and_patch_mean_at_the_last_block_and_at_each_block(presets, kind, prefix):
    """prefix: the class token and the registers, which the patch mean leaves out."""
    import keras

    model = build_base(get_backbone(f"hub:{presets[kind]}"), "default", SIZE)
    names = ["cls_token", "patch_mean", "block1_cls_token", "block1_patch_mean", "block2_patch_mean"]
    pixels = np.random.default_rng(1).normal(0, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    outs = [np.asarray(o) for o in cut(model, names)(pixels)]
    assert [o.shape for o in outs] == [(3, HIDDEN)] * 5
    final = np.asarray(keras.Model(model.input, model.get_layer("patch_tokens").input)(pixels))
    assert final.shape == (3, prefix + (SIZE // 8) ** 2, HIDDEN)
    np.testing.assert_allclose(outs[0], final[:, 0], rtol=1e-6)
    np.testing.assert_allclose(outs[1], final[:, prefix:].mean(axis=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outs[1], outs[4])  # the last block's tokens before the final norm differ


def test_the_image_towers_of_clip_and_siglip_and_a_cnn():
    """CLIP and SigLIP are two-tower models: their image tower is cut; SigLIP has no class token but its own pooled
    output. A CNN keeps its own layers, its last feature map last. Each exports to ONNX with the Keras features."""
    import keras_hub

    from features.hub_backbone import with_cut_points
    from features.model import layer_shapes

    m = keras_hub.models
    tower = dict(hidden_dim=HIDDEN, num_layers=2, num_heads=2, intermediate_dim=32)
    text = dict(vocabulary_size=50, embedding_dim=HIDDEN, max_sequence_length=8, **tower)
    clip = m.CLIPBackbone(m.CLIPVisionEncoder(patch_size=8, image_shape=(SIZE, SIZE, 3), **tower),
                          m.CLIPTextEncoder(**text), projection_dim=8)
    siglip = m.SigLIPBackbone(m.SigLIPVisionEncoder(patch_size=8, image_shape=(SIZE, SIZE, 3), **tower),
                              m.SigLIPTextEncoder(**text))
    resnet = m.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16],
                              stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block")
    found = {}
    for name, backbone in [("clip", clip), ("siglip", siglip), ("resnet", resnet)]:
        model = with_cut_points(backbone)
        found[name] = {row[0]: row[2] for row in layer_shapes(model, SIZE)}
        last = list(found[name])[-1]
        assert_onnx_export_equals_keras(cut(model, [*{"cls_token", "pooled", "patch_mean"} & set(found[name]), last]),
                                        lambda x: x / 127.5 - 1)
    assert {"cls_token", "patch_mean", "block2_cls_token"} <= set(found["clip"])
    assert {"pooled", "patch_mean", "block1_patch_mean"} <= set(found["siglip"]) and "cls_token" not in found["siglip"]
    assert found["siglip"]["pooled"] == found["clip"]["block1_patch_mean"] == (HIDDEN,)
    assert list(found["resnet"].items())[-1] == ("stack1_block0_out", (4, 4, 16))


def test_make_layers_lists_the_cut_points_with_the_class_token_as_default(presets, capsys):
    from pipeline.inspect_cmd import add_layers_arguments, run_layers

    parser = argparse.ArgumentParser()
    add_layers_arguments(parser)
    assert run_layers(parser.parse_args(["--backbone", f"hub:{presets['dinov2']}", "--filter", "*_*"])) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ("cls_token", "patch_mean", "block1_cls_token", "block2_patch_mean"):
        assert rows[name][:2] == ["Flatten" if "cls" in name else "GlobalAveragePooling1D", f"({HIDDEN},)"]
    assert rows["cls_token"][-2:] == ["<-", "default"]


# ---- extraction: both engines, and the ONNX export against the Keras forward pass ---------------------------------

def test_extract_through_both_engines_gives_the_keras_features(presets, photos, tmp_path):
    spec = get_backbone(f"hub:{presets['dinov2']}")
    layers = ["cls_token", "patch_mean", "block1_patch_mean"]
    got = {}
    for engine in ("tf", "onnx"):
        out = extract(ExtractConfig(backbone=spec.name, data=str(photos), out=str(tmp_path / f"{engine}.h5"),
                                    layer=layers, engine=engine, batch_size=2), verbose=False).path
        with h5py.File(out) as f:
            got[engine] = {k: v[()] for k, v in f["features"].items()} | {"paths": f["paths"][()]}
            assert f.attrs["engine"] == engine and f.attrs["weights"] == weights_identity(spec, "default")
    pixels = np.stack([load_image(photos / p.decode(), SIZE, "crop", crop=spec.crop_fraction)
                       for p in got["onnx"]["paths"]])
    model = cut(build_base(spec, "default", SIZE), layers)
    want = [np.asarray(o) for o in model(spec.preprocess.fn(pixels.astype(np.float32)))]
    for layer, keras_out in zip(layers, want):
        assert got["onnx"][layer].shape == (6, HIDDEN)
        np.testing.assert_allclose(got["onnx"][layer], keras_out, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["tf"][layer], keras_out, atol=1e-5, rtol=0)


def test_a_vit_exports_to_onnx_with_its_position_ids_as_constants(presets):
    """ViT keeps its position ids as a tensor attribute, which a trace captures as an input that tf2onnx would leave
    unfed in the graph; the export has one input and the Keras model's features within 1e-5."""
    spec = get_backbone(f"hub:{presets['vit']}")
    assert_onnx_export_equals_keras(cut(build_base(spec, "default", SIZE), ["cls_token", "block2_patch_mean"]),
                                    spec.preprocess.fn)


def assert_onnx_export_equals_keras(model, preprocess) -> None:
    """`model` exported to ONNX (with `preprocess`) has one input and gives the Keras forward pass within 1e-5."""
    import onnxruntime as ort

    from features.engines import Graph, export_onnx

    graph = Graph(lambda: model, preprocess, 2, SIZE)
    pixels = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    path = export_onnx(graph, None)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    finally:
        path.unlink()
    assert len(session.get_inputs()) == 1
    got = session.run(None, {session.get_inputs()[0].name: pixels})
    for a, b in zip(got, graph(pixels)):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.slow  # a classify, two training phases of a transformer and a predict process: about a minute
def test_a_hub_backbone_fine_tunes_and_its_network_predicts_in_a_fresh_process(presets, tmp_path):
    """Extract, classify, fine-tune (both phases) through the CLI, then `predict` in a process of its own that never
    imported KerasHub before loading the network: the saved model names KerasHub's layers, which load with it."""
    from pipeline.cli import main
    from tests.conftest import run_cli

    data = tmp_path / "data"
    for k, name in enumerate(["a", "b"]):
        write_images(data / name, 8, seed=20 + k)
    assert main(["extract", "--backbone", f"hub:{presets['dinov2']}", "--data", str(data), "--out",
                 str(tmp_path / "c.h5"), "--batch-size", "4"]) == 0
    assert main(["classify", "--features", str(tmp_path / "c.h5"), "--heads", "logreg", "--out",
                 str(tmp_path / "run"), "--no-report"]) == 0
    assert main(["finetune", "--model", str(tmp_path / "run" / "best"), "--head-epochs", "1", "--epochs", "1",
                 "--batch-size", "4"]) == 0
    done = run_cli("predict", "--model", str(tmp_path / "run" / "best" / "finetune"), "--data", str(data), "--out",
                   str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 16


# ---- refusals ----------------------------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network (every name lookup fails, as on the offline machine) and an empty Kaggle cache."""
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    return tmp_path / "kagglehub"


def test_a_preset_that_is_not_cached_is_refused_offline_in_one_line(offline):
    with pytest.raises(UsageError) as err:
        get_backbone("hub:dinov2_small")
    message = str(err.value)
    folder = offline / "models" / "keras" / "dinov2" / "keras" / "dinov2_small"
    assert "\n" not in message
    assert message.startswith("cannot download KerasHub preset 'dinov2_small' (kaggle://keras/dinov2/keras/"
                              "dinov2_small/")
    assert "run 'make weights BACKBONE=hub:dinov2_small', then copy the folder it names" in message
    assert f"to {folder} (the cache is $KAGGLEHUB_CACHE" in message and "never replaced by random" in message


def test_a_preset_staged_in_the_kaggle_cache_loads_offline(offline, presets, capsys):
    """What the refusal asks for is enough: the preset's files, and kagglehub's markers, under $KAGGLEHUB_CACHE;
    `make weights` names that folder."""
    from features import hub_backbone
    from pipeline.inspect_cmd import add_weights_arguments, run_weights

    folder = hub_backbone.kaggle_folder("dinov2_small")
    version = hub_backbone.image_presets()["dinov2_small"]["kaggle_handle"].rsplit("/", 1)[1]
    shutil.copytree(presets["dinov2"], folder / version)
    for name in Path(presets["dinov2"]).iterdir():
        marker = folder / ".complete" / version / f"{name.name}.complete"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    spec = get_backbone("hub:dinov2_small")
    assert spec.data.input_size == SIZE and weights_identity(spec, "default").startswith(
        f"kaggle://keras/dinov2/keras/dinov2_small/{version}@keras-hub-")
    assert build_base(spec, "default", SIZE).get_layer("cls_token").output.shape == (None, HIDDEN)
    parser = argparse.ArgumentParser()
    add_weights_arguments(parser)
    assert run_weights(parser.parse_args(["--backbone", "hub:dinov2_small"])) == 0
    assert capsys.readouterr().out.startswith(f"KerasHub preset dinov2_small is in {folder}; copy that folder")


def test_another_image_size_where_the_weights_allow_it(presets):
    """DINOv2 interpolates its position embeddings to any size; ViT's fit one size, and any other is refused."""
    dino = build_base(get_backbone(f"hub:{presets['dinov2']}"), "default", 48)
    assert dino.get_layer("patch_tokens").output.shape == (None, 36, HIDDEN)
    with pytest.raises(UsageError, match=r"^image size 48 is not valid for backbone 'hub:.*vit', whose input is fixed "
                                         r"at 32x32. Drop --image-size \(SIZE\).$"):
        build_base(get_backbone(f"hub:{presets['vit']}"), "default", 48)


@pytest.mark.parametrize("name,preprocess,message", [
    ("hub:dinov2_smal", None, r"unknown KerasHub preset 'dinov2_smal'. .* Did you mean: dinov2_small"),
    ("hub:dinov2_small", "tf", r"--preprocess is for .keras and .onnx files; backbone 'hub:dinov2_small' uses its "
                               r"preset's image converter"),
])
def test_names_and_options_that_do_not_fit_are_refused(name, preprocess, message):
    with pytest.raises(UsageError, match=message):
        get_backbone(name, preprocess)


def test_a_folder_that_is_not_a_preset_is_refused(tmp_path):
    with pytest.raises(UsageError, match="folder '.*' is not a KerasHub preset: it has no config.json"):
        get_backbone(f"hub:{tmp_path}")


def test_a_preset_names_its_cache_by_its_last_name_without_colons_or_versions(tmp_path):
    """Default cache names come from `backbone_label`: a built-in name, a versioned Kaggle handle and a preset folder
    give a file name of one path component, without ':' (not a valid file name character everywhere)."""
    from pipeline.config import ExtractConfig, default_out

    for backbone, label in [("hub:dinov2_small", "hub-dinov2_small"),
                            ("hub:kaggle://keras/dinov2/keras/dinov2_small/2", "hub-dinov2_small"),
                            (f"hub:{tmp_path / 'my_vit'}/", "hub-my_vit")]:
        out = default_out(ExtractConfig(backbone=backbone, data=str(tmp_path / "pets")), ["cls_token"], None)
        assert out.name == f"pets__{label}__cls_token.h5", backbone
