"""KerasHub presets as backbones (`BACKBONE=hub:<preset>`): DINOv2, ViT, CLIP and SigLIP image encoders, ResNet,
EfficientNet and the other image models KerasHub ships, built by `keras_hub.models.Backbone.from_preset`.

A preset carries its own data config: its image converter's size, interpolation and `x * scale + offset`, which is
`(x - mean) / std` with mean = -offset / scale and std = 1 / scale (`data_config`), so the record `make backbones`
prints is filled from the preset as the registry's is from keras.applications. `<preset>` is a built-in name
(`dinov2_small`), a `kaggle://` or `hf://` handle, or a folder written by `save_to_preset`.

What a transformer is cut at are its tokens, which hold one row per patch: the class token and the mean of the patch
tokens (registers and the class token left out), after the final norm (`cls_token`, `patch_mean`) and at the output of
each block i, before that norm (`block<i>_cls_token`, `block<i>_patch_mean`, i from 1); SigLIP, which has no class
token, adds its attention-pooling head's output (`pooled`). They are ordinary Keras layers (Cropping1D, then Flatten,
GlobalAveragePooling1D or Identity) added to the preset's own graph, so `--layer`, `make layers`, both engines and a
saved network treat them as any other layer. A CNN preset is cut at its own named layers.

Weights come from the Kaggle cache of kagglehub (`$KAGGLEHUB_CACHE`, default ~/.cache/kagglehub). Offline, a preset
that is not there is refused in one line naming the folder to pre-stage (`offline_error`); never replaced by random
weights.
"""
from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from features.backbones import HUB_PREFIX as PREFIX, BackboneSpec, sha256_file
from features.errors import UsageError, did_you_mean
from features.model import DOWNLOAD_TIMEOUT_S, _socket_timeout, installed_version
from features.preprocess import INTERPOLATIONS, resolve_preprocess

CLS, PATCH_MEAN, POOLED = "cls_token", "patch_mean", "pooled"
# the default cut point of the transformers `tokens` knows, by backbone class; other presets: their last layer
DEFAULT_LAYER = {"CLIPBackbone": CLS, "DINOV2Backbone": CLS, "DINOV3Backbone": CLS, "ViTBackbone": CLS,
                 "SigLIPBackbone": POOLED}


@functools.cache
def image_presets() -> dict[str, dict]:
    """The built-in presets that have an image converter (image models), name -> KerasHub's record (KerasHub walks
    its class tree for them: seconds, so once per process)."""
    import keras_hub

    return {name: record for name, record in keras_hub.layers.ImageConverter.presets.items()
            if name in keras_hub.models.Backbone.presets}


def list_presets(pattern: str = "*") -> list[str]:
    """`hub:<name>` of the built-in image presets that match `pattern` (`make backbones FILTER='hub:*'`)."""
    return sorted(PREFIX + n for n in image_presets() if fnmatch.fnmatch(PREFIX + n, pattern))


def kaggle_cache() -> Path:
    """Where kagglehub keeps downloads: $KAGGLEHUB_CACHE, default ~/.cache/kagglehub."""
    from kagglehub.config import get_cache_folder

    return Path(get_cache_folder())


def kaggle_folder(preset: str) -> Path | None:
    """Where kagglehub keeps a built-in preset (what `make weights` points to for copying); None for other presets."""
    handle = _handle(preset)
    if not handle.startswith("kaggle://"):
        return None
    return kaggle_cache().joinpath("models", *handle.removeprefix("kaggle://").split("/")[:4])


def _handle(preset: str) -> str:
    """A built-in preset's Kaggle handle (kaggle://owner/model/keras/variant/version), else the preset as given."""
    return image_presets().get(preset, {}).get("kaggle_handle", preset)


def offline_error(preset: str, err: Exception) -> UsageError:
    """The one-line refusal of a preset that cannot be downloaded: which folder to pre-stage where."""
    host = re.search(r"host='([^']+)'", str(err))  # requests names the host it could not reach
    reason = type(err).__name__ + (f" to {host.group(1)}" if host else "")
    folder = kaggle_folder(preset)
    if folder is not None:
        fix = (f"On a connected machine run 'make weights BACKBONE={PREFIX}{preset}', then copy the folder it "
               f"names (with the hidden .complete folder in it) to {folder} (the cache is $KAGGLEHUB_CACHE, default "
               "~/.cache/kagglehub)")
    else:
        fix = f"On a connected machine save it with keras_hub's save_to_preset(folder) and pass BACKBONE={PREFIX}folder"
    return UsageError(f"cannot download KerasHub preset '{preset}' ({_handle(preset)}; {reason}). {fix}; weights "
                      "are never replaced by random ones.")


@contextmanager
def fetching(preset: str) -> Iterator[None]:
    """Turn what KerasHub and kagglehub raise while finding a preset's files into one-line errors."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            yield
    except FileNotFoundError as err:  # a file the preset lacks: image_converter.json for a text model
        raise UsageError(f"KerasHub preset '{preset}' is not an image model, or lacks a file "
                         f"({str(err).splitlines()[0][:160]}). Expected an image preset (see 'make backbones "
                         f"FILTER=\"{PREFIX}*\"').") from None
    except OSError as err:  # requests' ConnectionError and socket timeouts are OSErrors
        raise offline_error(preset, err) from None


def _check_name(preset: str) -> None:
    """A built-in image preset, a handle (scheme://...) or a preset folder; else refused with the closest names."""
    if "://" in preset or preset in image_presets():
        return
    if Path(preset).is_dir():
        if not (Path(preset) / "config.json").is_file():
            raise UsageError(f"folder '{preset}' is not a KerasHub preset: it has no config.json. Expected a folder "
                             "written by keras_hub's save_to_preset().")
        return
    raise UsageError(f"unknown KerasHub preset '{preset}'. Expected a built-in image preset (see 'make backbones "
                     f"FILTER=\"{PREFIX}*\"'), a kaggle:// or hf:// handle, or a preset folder."
                     f"{did_you_mean(preset, image_presets())}")


def _number(values, default: float) -> list[float]:
    """A converter's scale or offset (None, one number, or one per channel) as three numbers."""
    values = default if values is None else values
    return [float(v) for v in values] if isinstance(values, (list, tuple)) else [float(values)] * 3


def data_config(converter) -> tuple[int, str, str]:
    """(input size, preprocess mode, interpolation) of a KerasHub image converter: `x * scale + offset` written as
    the mode `mean=M,std=S` (`features.preprocess`), per channel where the channels differ."""
    size = converter.image_size
    if not size or size[0] is None or size[0] != size[1]:
        raise UsageError(f"KerasHub image converter {type(converter).__name__} resizes to {size}; expected a square "
                         "size such as (224, 224).")
    scale, offset = _number(converter.scale, 1.0), _number(converter.offset, 0.0)
    if scale == [1.0] * 3 and offset == [0.0] * 3:
        mode = "none"
    else:
        mean, std = ([f"{v + 0.0:.6g}" for v in values] for values in ([-o / s for o, s in zip(offset, scale)],
                                                                   [1 / s for s in scale]))
        mode = f"mean={'/'.join(mean if len(set(mean)) > 1 else mean[:1])},std=" \
               f"{'/'.join(std if len(set(std)) > 1 else std[:1])}"
    interpolation = "lanczos" if converter.interpolation.startswith("lanczos") else converter.interpolation
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"KerasHub image converter {type(converter).__name__} resizes with "
                         f"'{converter.interpolation}'; expected one of: {', '.join(INTERPOLATIONS)}.")
    return int(size[0]), mode, interpolation


@dataclass(frozen=True)
class Tokens:
    """Where a transformer's token sequences are in its graph: (batch, tokens, channels) tensors."""

    images: object  # the image input
    final: object  # the last block's tokens after the final norm
    blocks: list  # each block's output tokens, in order
    prefix: int  # tokens before the patch tokens: the class token and registers
    cls: bool  # whether token 0 is a class token
    pooled: object = None  # the model's own pooling of the tokens, where it has one (SigLIP's attention head)


def tokens(backbone) -> Tokens | None:
    """The token sequences of the transformers whose cut points are named here; None for other models (CNNs)."""
    import keras_hub

    m = keras_hub.models
    if isinstance(backbone, (m.CLIPBackbone, m.SigLIPBackbone)):  # the image tower of a two-tower model
        encoder, clip = backbone.vision_encoder, isinstance(backbone, m.CLIPBackbone)
        blocks = [block.output for block in encoder.encoder_layers]
        if clip:
            return Tokens(encoder.inputs[0], encoder.outputs[0], blocks, 1, True)
        return Tokens(encoder.inputs[0], encoder.post_layer_norm.output, blocks, 0, False, encoder.outputs[0])
    if isinstance(backbone, (m.DINOV2Backbone, m.DINOV3Backbone)):
        stages = [backbone.pyramid_outputs[f"stage{i + 1}"] for i in range(backbone.num_layers)]
        return Tokens(backbone.inputs[0], backbone.outputs[0], stages, 1 + backbone.num_register_tokens, True)
    if isinstance(backbone, m.ViTBackbone):  # ViTEncoder runs its blocks inside one layer: they are called again
        encoder = backbone.get_layer("vit_encoder")
        x, blocks = encoder.dropout(backbone.get_layer("vit_patching_and_embedding").output), []
        for block in encoder.encoder_layers:
            x = block(x)
            blocks.append(x)
        cls = bool(backbone.use_class_token)
        return Tokens(backbone.inputs[0], encoder.layer_norm(x), blocks, int(cls), cls)
    return None


def _cut_points(x, name: str, found: Tokens) -> list:
    """The class token (where there is one) and the patch-token mean of the token sequence `x`."""
    import keras

    count = x.shape[1]
    outs = []
    if found.cls:
        first = keras.layers.Cropping1D((0, count - 1), name=f"{name}{CLS}_crop")(x)
        outs.append(keras.layers.Flatten(name=f"{name}{CLS}")(first))
    patches = keras.layers.Cropping1D((found.prefix, 0), name=f"{name}patch_tokens")(x)
    outs.append(keras.layers.GlobalAveragePooling1D(name=f"{name}{PATCH_MEAN}")(patches))
    return outs


def _constants_as_arrays(backbone) -> None:
    """Tensors that layers keep as attributes (ViT's position ids, DINOv3's RoPE frequencies), turned into numpy
    arrays: a traced function captures such a tensor as an input, which tf2onnx leaves in the exported graph as a
    second input that nothing feeds; an array is traced as a constant."""
    import numpy as np
    import tensorflow as tf

    for layer in backbone._flatten_layers(include_self=False):
        for key, value in list(vars(layer).items()):
            if isinstance(value, tf.Tensor) and not isinstance(value, tf.Variable) and value.dtype != tf.resource:
                setattr(layer, key, np.asarray(value))


def with_cut_points(backbone):
    """The backbone as a keras.Model of one image tensor, with the named token cut points of a transformer."""
    import keras

    _constants_as_arrays(backbone)
    found = tokens(backbone)
    if found is None:
        if len(backbone.inputs) > 1:
            raise UsageError(f"KerasHub model {type(backbone).__name__} takes {len(backbone.inputs)} inputs; expected "
                             "an image model (its image tower is cut only for CLIP and SigLIP).")
        return keras.Model(backbone.inputs[0], backbone.outputs[0], name=backbone.name)
    outs = [out for i, block in enumerate(found.blocks) for out in _cut_points(block, f"block{i + 1}_", found)]
    outs += _cut_points(found.final, "", found)
    if found.pooled is not None:
        outs.append(keras.layers.Identity(name=POOLED)(found.pooled))
    return keras.Model(found.images, outs, name=backbone.name)


def hub_backbone(preset: str, preprocess: str | None) -> BackboneSpec:
    """`hub:<preset>` as a BackboneSpec: the data config from the preset's image converter (downloaded now, so an
    offline machine is told what to pre-stage before any image is read); the model is built when first needed."""
    import keras_hub

    name = PREFIX + preset
    if preprocess:
        raise UsageError(f"--preprocess is for .keras and .onnx files; backbone '{name}' uses its preset's image "
                         "converter.")
    _check_name(preset)
    with fetching(preset):
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    size, mode, interpolation = data_config(converter)
    default = DEFAULT_LAYER.get(getattr(type(converter).backbone_cls, "__name__", ""))

    def build(weights, input_shape):
        import keras

        side = input_shape[0]
        try:
            with fetching(preset):
                backbone = keras_hub.models.Backbone.from_preset(  # a saved shape may differ from the converter's
                    preset, load_weights=weights == "imagenet", dtype=keras.mixed_precision.global_policy().name,
                    image_shape=input_shape)  # which CLIP and SigLIP ignore: checked below
        except ValueError as err:  # at another size, weights that do not fit it (ViT's position embeddings)
            if side == size or isinstance(err, UsageError):
                raise
            raise _fixed_size(name, side, size) from None
        if weights not in ("imagenet", None):  # WEIGHTS=path/to/file.weights.h5
            backbone.load_weights(weights)
        model = with_cut_points(backbone)
        if model.input.shape[1] not in (None, side):
            raise _fixed_size(name, side, model.input.shape[1])
        return model

    return BackboneSpec(name, build, resolve_preprocess(mode), size, default, crop_fraction=1.0,
                        interpolation=interpolation, weights_id=_weights_id(preset))


def _fixed_size(name: str, side: int, fixed: int) -> UsageError:
    return UsageError(f"image size {side} is not valid for backbone '{name}', whose input is fixed at {fixed}x{fixed}. "
                      "Drop --image-size (SIZE).")


def _weights_id(preset: str) -> str:
    """What identifies the preset's weights: its versioned Kaggle handle, or a folder's weights file by its hash."""
    weights = Path(preset) / "model.weights.h5"
    if not _handle(preset).startswith("kaggle://") and weights.is_file():
        return f"sha256:{sha256_file(weights)}"
    return f"{_handle(preset)}@keras-hub-{installed_version('keras_hub')}"
