"""`layers`, `backbones` and `weights`: look at backbones before extracting."""
from __future__ import annotations

import argparse
import fnmatch
import glob

import numpy as np

from features.backbones import HUB_PREFIX, BackboneSpec, get_backbone, list_backbones
from features.errors import UsageError
from features.model import build_base, layer_shapes


def add_layers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="models/efficientnet_lite0/efficientnet_lite0_imagenet.keras")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--filter", default="*", help="shell pattern on layer names, e.g. '*pool*'")
    p.add_argument("--preprocess", default=None)


def run_layers(args: argparse.Namespace) -> int:
    spec = get_backbone(args.backbone, args.preprocess)
    size = args.image_size or spec.input_size
    if spec.onnx:  # the graph's tensors, shapes from ONNX shape inference; no TensorFlow
        from features import onnx_backbone

        every, default, what = onnx_backbone.layer_shapes(spec, size), onnx_backbone.default_layer(spec), "tensors"
    else:
        model = build_base(spec, "none" if spec.file is None else "default", size)  # shapes do not depend on weights
        every, default, what = layer_shapes(model, size), spec.default_layer or model.layers[-1].name, "layers"
    rows = [r for r in every if fnmatch.fnmatch(r[0], args.filter)]
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{spec.name} at {size}x{size}: {len(rows)} {what} (name, type, output shape per image, values per image)")
    for name, kind, shape in rows:
        mark = "  <- default" if name == default else ""
        known = shape is not None and None not in shape
        text = "?" if shape is None else "(" + ", ".join("?" if d is None else str(d) for d in shape) + \
            ("," if len(shape) == 1 else "") + ")"
        values = f"{int(np.prod(shape)):>10,}" if known else f"{'?':>10}"
        print(f"  {name:<{width}}  {kind:<22} {text:<18} {values}{mark}")
    return 0


def add_backbones_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="*", help="shell pattern, e.g. 'efficientnet*'")


def _data_row(name: str, spec: BackboneSpec) -> str:
    data = spec.data
    mean, std = ("/".join(f"{v:g}" for v in (values if len(set(values)) > 1 else values[:1]))
                 for values in data.mean_std())
    return (f"{name:<20} {data.input_size:>4}  {data.crop_fraction:<6.4g} {data.interpolation:<8} {data.layout:<5} "
            f"{data.channels:<4} {mean:<24} {std:<22} {data.preprocess}")


def run_backbones(args: argparse.Namespace) -> int:
    """The data config of every registered backbone (one table: `features.preprocess.DataConfig`), then of the user
    models under models/ (their sidecars fill the same record)."""
    print(f"{'name':<20} {'size':>4}  {'crop':<6} {'interp':<8} {'input':<5} {'chan':<4} {'mean':<24} {'std':<22} "
          "preprocess")
    for name in list_backbones(args.filter):
        print(_data_row(name, get_backbone(name)))
    files = sorted(f for suffix in ("keras", "onnx") for f in glob.glob(f"models/**/*.{suffix}", recursive=True)
                   if fnmatch.fnmatch(f, args.filter))
    for path in files:
        try:
            print(_data_row(path, get_backbone(path)))
        except UsageError as err:
            print(f"{path:<20} not usable: {err}")
    print("size: native input side; crop: share of the shorter side the evaluation's centre crop keeps; mean/std: the "
          "preprocessing as (x - mean) / std per channel (chan order), pixels in [0, 255].")
    print("or a path to your own .keras or .onnx file (declare its preprocessing in a sidecar .json or with "
          "--preprocess; see README, 'Your own ONNX model')")
    print("or hub:<preset>, a KerasHub preset (hub:dinov2_small, hub:vit_base_patch16_224_imagenet, a kaggle:// or "
          "hf:// handle, or a save_to_preset folder): its image converter is its record; FILTER='hub:*' lists the "
          "built-in image presets (README, 'KerasHub presets')")
    if args.filter.startswith(HUB_PREFIX):
        from features import hub_backbone

        presets = hub_backbone.image_presets()
        for name in hub_backbone.list_presets(args.filter):
            meta = presets[name.removeprefix(HUB_PREFIX)].get("metadata", {})
            print(f"{name:<44} {meta.get('params', 0):>13,} params  {meta.get('description', '')[:80]}")
    return 0


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="registry name, e.g. vgg19, or hub:<KerasHub preset>")


def run_weights(args: argparse.Namespace) -> int:
    spec = get_backbone(args.backbone)
    build_base(spec, "imagenet", spec.input_size)
    if spec.weights_id is not None:  # a KerasHub preset: in kagglehub's cache, not Keras'
        from features import hub_backbone

        preset = spec.name.removeprefix(hub_backbone.PREFIX)
        folder = hub_backbone.kaggle_folder(preset)
        print(f"KerasHub preset {preset} is in {folder}; copy that folder (with the hidden .complete folder in it) to "
              "the same place under KAGGLEHUB_CACHE (default ~/.cache/kagglehub) on offline machines." if folder else
              f"KerasHub preset {preset} is read from where it is; copy it to offline machines.")
        return 0
    from features.model import keras_cache_dir

    print(f"ImageNet weights for {spec.name} are in {keras_cache_dir()}; copy that folder's new file to the same "
          "place on offline machines.")
    return 0
