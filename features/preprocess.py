"""Preprocessing by name, for user models that declare theirs: Keras' three ImageNet modes, none, or mean/std.

Registry backbones do not come through here: they use their own family's `preprocess_input` (see backbones.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from features.errors import UsageError

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


def _keras_mode(mode: str) -> Callable:
    def fn(x):
        from keras.applications import imagenet_utils

        return imagenet_utils.preprocess_input(x, mode=mode)

    return fn


def _mean_std(spec: str) -> Preprocess:
    """'mean=127,std=128' or per channel 'mean=123.7/116.3/103.5,std=58.4/57.1/57.4' -> (x - mean) / std."""
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

    def fn(x):
        return (x - mean) / std

    return Preprocess(fn, f"RGB, (x - {'/'.join(map(str, mean))}) / {'/'.join(map(str, std))}")


def resolve_preprocess(spec: str) -> Preprocess:
    if spec in MODE_DESCRIPTIONS:
        fn = (lambda x: x) if spec == "none" else _keras_mode(spec)
        return Preprocess(fn, f"{spec}: {MODE_DESCRIPTIONS[spec]}")
    if spec.startswith("mean="):
        return _mean_std(spec)
    raise UsageError(f"preprocess '{spec}' is not valid. Expected one of {', '.join(MODE_DESCRIPTIONS)} "
                     "or 'mean=M,std=S'.")
