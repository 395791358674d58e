"""`layers`, `backbones` and `weights`: look at backbones before extracting."""
from __future__ import annotations

import argparse
import fnmatch

import numpy as np

from features.backbones import get_backbone, list_backbones
from features.model import build_base, layer_shapes


def add_layers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="models/efficientnet_lite0/efficientnet_lite0_imagenet.keras")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--filter", default="*", help="shell pattern on layer names, e.g. '*pool*'")
    p.add_argument("--preprocess", default=None)


def run_layers(args: argparse.Namespace) -> int:
    spec = get_backbone(args.backbone, args.preprocess)
    size = args.image_size or spec.input_size
    model = build_base(spec, "none" if spec.file is None else "default", size)  # shapes do not depend on weights
    rows = [r for r in layer_shapes(model, size) if fnmatch.fnmatch(r[0], args.filter)]
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{spec.name} at {size}x{size}: {len(rows)} layers (name, type, output shape per image, values per image)")
    for name, kind, shape in rows:
        mark = "  <- default" if name == (spec.default_layer or model.layers[-1].name) else ""
        print(f"  {name:<{width}}  {kind:<22} {str(shape):<18} {int(np.prod(shape)):>10,}{mark}")
    return 0


def add_backbones_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="*", help="shell pattern, e.g. 'efficientnet*'")


def run_backbones(args: argparse.Namespace) -> int:
    for name in list_backbones(args.filter):
        spec = get_backbone(name)
        print(f"{name:<20} {spec.input_size:>4}px  {spec.preprocess.description}")
    print("or a path to your own .keras file (declare its preprocessing in a sidecar .json or with --preprocess)")
    return 0


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="registry name, e.g. vgg19")


def run_weights(args: argparse.Namespace) -> int:
    spec = get_backbone(args.backbone)
    build_base(spec, "imagenet", spec.input_size)
    from features.model import keras_cache_dir

    print(f"ImageNet weights for {spec.name} are in {keras_cache_dir()}; copy that folder's new file to the same "
          "place on offline machines.")
    return 0
