"""Preprocessing by name, for user models that declare theirs: Keras' three ImageNet modes, none, or mean/std; and
each backbone's data config (`DataConfig`, timm's `pretrained_cfg`): how an image becomes its input, as data.

Registry backbones use their own family's `preprocess_input` (see backbones.py) inside TensorFlow; every mode is also
written out as steps (`steps`: BGR flip, divide, subtract, in Keras' order and in float32), which `numpy_preprocess`
applies in numpy and `features.onnx_backbone` writes as ONNX operations, so a user's ONNX model is preprocessed
without TensorFlow. tests/test_data_configs.py checks the steps against every family's `preprocess_input`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from features.errors import UsageError
from features.images import CROP_FRACTION

MODE_DESCRIPTIONS = {
    "caffe": "RGB->BGR, ImageNet mean subtracted per channel, no scaling",
    "tf": "scaled to [-1, 1]",
    "torch": "scaled to [0, 1], ImageNet mean/std normalised per channel",
    "none": "raw RGB pixels in [0, 255] (the model normalises internally)",
}


@dataclass(frozen=True)
class Preprocess:
    """A named, recordable transform from RGB float pixels in [0, 255] to model input."""

    fn: Callable
    description: str
    mode: str = ""  # what resolve_preprocess / steps read: caffe | tf | torch | none | mean=M,std=S


# One step of a mode, in Keras' order: ("bgr", ()) flips RGB to BGR; ("div", v) and ("sub", v) divide by and subtract
# v, one value or one per channel, in float32 (as Keras does to a float32 array in place).
Step = tuple[str, tuple[float, ...]]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # keras imagenet_utils, torch mode
MODE_STEPS: dict[str, tuple[Step, ...]] = {
    "caffe": (("bgr", ()), ("sub", (103.939, 116.779, 123.68))),  # the mean is BGR, subtracted after the flip
    "tf": (("div", (127.5,)), ("sub", (1.0,))),
    "torch": (("div", (255.0,)), ("sub", IMAGENET_MEAN), ("div", IMAGENET_STD)),
    "none": (),
}


def _keras_mode(mode: str) -> Callable:
    def fn(x):
        from keras.applications import imagenet_utils

        return imagenet_utils.preprocess_input(x, mode=mode)

    return fn


def _parse_mean_std(spec: str) -> tuple[list[float], list[float]]:
    """'mean=127,std=128' or per channel 'mean=123.7/116.3/103.5,std=58.4/57.1/57.4' -> (mean, std)."""
    try:
        fields = dict(part.split("=", 1) for part in spec.split(","))
        mean = [float(v) for v in fields.pop("mean").split("/")]
        std = [float(v) for v in fields.pop("std").split("/")]
    except (KeyError, ValueError):
        raise UsageError(f"preprocess '{spec}' is not valid. Expected one of {', '.join(MODE_DESCRIPTIONS)} "
                         "or 'mean=M,std=S' (per channel: 'mean=M1/M2/M3,std=S1/S2/S3').") from None
    if fields or any(s == 0 for s in std) or not {len(mean), len(std)} <= {1, 3}:
        raise UsageError(f"preprocess '{spec}': unknown keys {sorted(fields)}, a zero std, or not 1 or 3 values "
                         "(one per RGB channel) in mean or std.")
    return mean, std


def _mean_std(spec: str) -> Preprocess:
    """(x - mean) / std, in RGB order."""
    mean, std = _parse_mean_std(spec)

    def fn(x):
        return (x - mean) / std

    return Preprocess(fn, f"RGB, (x - {'/'.join(map(str, mean))}) / {'/'.join(map(str, std))}", spec)


def resolve_preprocess(spec: str) -> Preprocess:
    if spec in MODE_DESCRIPTIONS:
        fn = (lambda x: x) if spec == "none" else _keras_mode(spec)
        return Preprocess(fn, f"{spec}: {MODE_DESCRIPTIONS[spec]}", spec)
    if spec.startswith("mean="):
        return _mean_std(spec)
    raise UsageError(f"preprocess '{spec}' is not valid. Expected one of {', '.join(MODE_DESCRIPTIONS)} "
                     "or 'mean=M,std=S'.")


def steps(spec: str) -> tuple[Step, ...]:
    """The steps of a preprocess mode (`MODE_STEPS`), or of 'mean=M,std=S': subtract M, divide by S."""
    if spec in MODE_STEPS:
        return MODE_STEPS[spec]
    if spec.startswith("mean="):
        mean, std = _parse_mean_std(spec)
        return (("sub", tuple(mean)), ("div", tuple(std)))
    resolve_preprocess(spec)  # raises the one-line refusal of an unknown mode
    raise AssertionError(spec)


def numpy_preprocess(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """The mode as a numpy function: RGB pixels in [0, 255] (batch, ..., 3) -> float32 model input, equal to Keras'
    `imagenet_utils.preprocess_input` on a float32 array (same operations, same order), without TensorFlow.

        >>> numpy_preprocess("tf")(np.array([[0.0, 127.5, 255.0]])).tolist()
        [[-1.0, 0.0, 1.0]]
    """
    done = [(op, np.asarray(values, np.float32)) for op, values in steps(spec)]

    def fn(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        for op, values in done:
            x = x[..., ::-1] if op == "bgr" else x - values if op == "sub" else x / values
        return x

    return fn


INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest", "lanczos")
LAYOUTS = ("NHWC", "NCHW")


@dataclass(frozen=True)
class DataConfig:
    """How an image becomes a backbone's input, like timm's `pretrained_cfg`: one record per backbone, filled alike by
    the registry (backbones.py), a `.keras` sidecar and an `.onnx` sidecar; `make backbones` prints one row each.

    `crop_fraction` and `interpolation` say how the model was evaluated (the centre crop keeps `crop_fraction` of the
    shorter side, resized with that filter); `layout` is the model input's axis order (NCHW: a PyTorch export).

        >>> DataConfig(224, "tf").mean_std()
        ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
    """

    input_size: int
    preprocess: str  # caffe | tf | torch | none | mean=M,std=S (`steps`)
    crop_fraction: float = CROP_FRACTION
    interpolation: str = "bilinear"
    layout: str = "NHWC"

    @property
    def channels(self) -> str:
        """The channel order the model takes: `BGR` for caffe, else `RGB`."""
        return "BGR" if any(op == "bgr" for op, _ in steps(self.preprocess)) else "RGB"

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The preprocessing as one (x - mean) / std per channel (in `channels` order, pixels in [0, 255]): every
        mode is such an affine map; rounded to 4 decimals for reading."""
        scale, shift = np.ones(3), np.zeros(3)  # input = scale * pixel + shift
        for op, values in steps(self.preprocess):
            v = np.asarray(values, float)
            if op == "div":
                scale, shift = scale / v, shift / v
            elif op == "sub":
                shift = shift - v
        return tuple(round(float(m), 4) + 0.0 for m in -shift / scale), tuple(round(float(s), 4) for s in 1 / scale)
