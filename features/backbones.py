"""Backbones by name: every keras.applications family registered in one table, plus users' own `.keras` and `.onnx`
files and KerasHub presets (`hub:<preset>`, features/hub_backbone.py: their image converter is their data config).

Like a timm `default_cfg`, each entry carries what it needs to be used correctly: the constructor, the family's own
`preprocess_input`, the native input size, how it was evaluated (crop fraction, interpolation): its data config
(`BackboneSpec.data`, a `features.preprocess.DataConfig`). A `.keras` or `.onnx` file declares the same things in a
sidecar JSON (`model.json` beside `model.keras`) or through `--preprocess`; an `.onnx` file runs on ONNX Runtime
without TensorFlow (features/onnx_backbone.py).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from features.errors import UsageError, did_you_mean
from features.images import CROP_FRACTION
from features.preprocess import INTERPOLATIONS, LAYOUTS, DataConfig, Preprocess, resolve_preprocess

HUB_PREFIX = "hub:"  # BACKBONE=hub:<preset>: a KerasHub preset (features/hub_backbone.py)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable  # (weights, input_shape) -> keras.Model without the classifier top
    preprocess: Preprocess
    input_size: int
    default_layer: str | None = None  # None: the model's output
    file: Path | None = None  # set for user .keras and .onnx models
    crop_fraction: float = CROP_FRACTION  # how the model was evaluated: the centre crop's share of the shorter side
    interpolation: str = "bilinear"  # ... and the resize filter
    layout: str = "NHWC"  # the model input's axis order; NCHW only for .onnx files
    weights_id: str | None = None  # what identifies built-in weights that are not keras.applications' (KerasHub's)

    @property
    def data(self) -> DataConfig:
        """The data config: one record for every kind of backbone (what `make backbones` prints)."""
        return DataConfig(self.input_size, self.preprocess.mode, self.crop_fraction, self.interpolation, self.layout)

    @property
    def onnx(self) -> bool:
        """A user's .onnx file: run by ONNX Runtime (features/onnx_backbone.py), never built as a Keras model."""
        return self.file is not None and self.file.suffix == ".onnx"


_REGISTRY: dict[str, BackboneSpec] = {}

# (name, keras.applications constructor, module holding its preprocess_input, native size, what that preprocess does)
_APPLICATIONS = [
    ("vgg16", "VGG16", "vgg16", 224, "caffe"),
    ("vgg19", "VGG19", "vgg19", 224, "caffe"),
    ("resnet50", "ResNet50", "resnet", 224, "caffe"),
    ("resnet101", "ResNet101", "resnet", 224, "caffe"),
    ("resnet152", "ResNet152", "resnet", 224, "caffe"),
    ("resnet50v2", "ResNet50V2", "resnet_v2", 224, "tf"),
    ("resnet101v2", "ResNet101V2", "resnet_v2", 224, "tf"),
    ("resnet152v2", "ResNet152V2", "resnet_v2", 224, "tf"),
    ("inceptionv3", "InceptionV3", "inception_v3", 299, "tf"),
    ("inceptionresnetv2", "InceptionResNetV2", "inception_resnet_v2", 299, "tf"),
    ("xception", "Xception", "xception", 299, "tf"),
    ("mobilenet", "MobileNet", "mobilenet", 224, "tf"),
    ("mobilenetv2", "MobileNetV2", "mobilenet_v2", 224, "tf"),
    ("mobilenetv3small", "MobileNetV3Small", "mobilenet_v3", 224, "none"),
    ("mobilenetv3large", "MobileNetV3Large", "mobilenet_v3", 224, "none"),
    ("densenet121", "DenseNet121", "densenet", 224, "torch"),
    ("densenet169", "DenseNet169", "densenet", 224, "torch"),
    ("densenet201", "DenseNet201", "densenet", 224, "torch"),
    ("nasnetmobile", "NASNetMobile", "nasnet", 224, "tf"),
    ("nasnetlarge", "NASNetLarge", "nasnet", 331, "tf"),
    *[(f"efficientnetb{i}", f"EfficientNetB{i}", "efficientnet", s, "none")
      for i, s in enumerate([224, 240, 260, 300, 380, 456, 528, 600])],
    *[(f"efficientnetv2{v.lower()}", f"EfficientNetV2{v}", "efficientnet_v2", s, "none")
      for v, s in [("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384), ("M", 480), ("L", 480)]],
    *[(f"convnext{v.lower()}", f"ConvNeXt{v}", "convnext", 224, "none")
      for v in ["Tiny", "Small", "Base", "Large", "XLarge"]],
]

# How a family's weights were evaluated, where its reference says so (preprocess module -> size -> (crop fraction,
# interpolation)); timm's pretrained_cfg of the same weights agrees. EfficientNet's TF reference crops
# size / (size + 32) of the shorter side and resizes bicubic (0.875 at 224, 0.949 at 600); ConvNeXt resizes bicubic.
# Every other family: the ImageNet convention, 0.875 and bilinear (CROP_FRACTION).
_EVALUATION: dict[str, Callable[[int], tuple[float, str]]] = {
    "efficientnet": lambda size: (round(size / (size + 32), 4), "bicubic"),
    "convnext": lambda size: (CROP_FRACTION, "bicubic"),
}


def _evaluation(module: str, size: int) -> tuple[float, str]:
    return _EVALUATION.get(module, lambda _: (CROP_FRACTION, "bilinear"))(size)


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _application(constructor: str, module: str) -> Callable:
    def build(weights, input_shape):
        import keras

        return getattr(keras.applications, constructor)(include_top=False, weights=weights, input_shape=input_shape)

    build.__qualname__ = f"keras.applications.{constructor}"
    return build


def _family_preprocess(module: str, mode: str) -> Preprocess:
    def fn(x):
        import keras

        return getattr(keras.applications, module).preprocess_input(x)

    what = "the model normalises internally" if mode == "none" else resolve_preprocess(mode).description
    return Preprocess(fn, f"keras.applications.{module}.preprocess_input ({what})", mode)


for _name, _ctor, _module, _size, _mode in _APPLICATIONS:
    _crop, _interpolation = _evaluation(_module, _size)
    register(BackboneSpec(_name, _application(_ctor, _module), _family_preprocess(_module, _mode), _size,
                          crop_fraction=_crop, interpolation=_interpolation))


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, computed once per process for each version of the file (a backbone of a few GB is named
    by its hash in the cache identity, the export key and the model record, several times a run)."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, *stamp: int) -> str:
    """`stamp` (inode, size, mtime ns) is only the key: a file rewritten or replaced since is hashed again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_keras(path: str | Path, what: str):
    """A `.keras` file loaded with safe_mode=True (no Lambda layer or other stored code runs); a file Keras cannot
    or will not load is refused in one line (Keras itself says "File not found" for a garbage file that exists)."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} file '{path}' does not exist.")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{what} file '{path}' is not a Keras model: a .keras file is a zip archive written by "
                         f"model.save(), and this one is not ({path.stat().st_size} bytes).")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises ValueError, OSError, zip and JSON errors alike for a bad file
        text = str(err)
        if "Lambda" in text or "safe_mode" in text:
            raise UsageError(f"{what} file '{path}' contains a Lambda layer (stored Python code), which is never "
                             f"loaded because it could run anything. Re-save the model with ordinary layers.") from None
        first = text.strip().splitlines()[0][:160] if text.strip() else "no details"
        raise UsageError(f"{what} file '{path}' is not a readable Keras model ({type(err).__name__}: {first}). "
                         f"Expected a .keras archive written by model.save().") from None


def sidecar_path(model_file: Path) -> Path:
    return model_file.with_suffix(".json")


def read_sidecar(model_file: Path) -> dict:
    """The sidecar's settings, each checked: a broken sidecar is named with the fix, never a traceback."""
    sidecar = sidecar_path(model_file)
    example = '{"preprocess": "mean=127,std=128", "input_size": 224}'
    try:
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"sidecar '{sidecar}' of backbone '{model_file}' is not valid JSON ({err}). Expected an "
                         f"object such as {example}.") from None
    if not isinstance(meta, dict):
        raise UsageError(f"sidecar '{sidecar}' holds a {type(meta).__name__}, expected an object such as {example}.")
    size = meta.get("input_size", 224)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise UsageError(f"sidecar '{sidecar}': input_size {size!r} is not valid. Expected the model's input side "
                         "length in pixels, a whole number >= 8 such as 224.")
    for key in ("preprocess", "default_layer"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise UsageError(f"sidecar '{sidecar}': {key} {meta[key]!r} is not valid. Expected a string"
                             + (" such as \"tf\" or \"mean=127,std=128\"." if key == "preprocess" else
                                ": a layer name."))
    crop = meta.get("crop_fraction")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
        raise UsageError(f"sidecar '{sidecar}': crop_fraction {crop!r} is not valid. Expected the share of the "
                         "shorter side that the model's centre crop keeps, a number in (0, 1] such as 0.875.")
    for key, valid in (("interpolation", INTERPOLATIONS), ("layout", LAYOUTS)):
        if meta.get(key) is not None and meta[key] not in valid:
            raise UsageError(f"sidecar '{sidecar}': {key} {meta[key]!r} is not valid. Expected one of: "
                             f"{', '.join(valid)}.")
    return {**meta, "input_size": size}


def declared_preprocess(path: Path, preprocess: str | None, meta: dict) -> str:
    """The preprocessing a user file declares (--preprocess over its sidecar); none declared is refused."""
    spec = preprocess or meta.get("preprocess")
    if not spec:
        raise UsageError(f"backbone '{path}' does not declare its preprocessing. Pass --preprocess "
                         f"(caffe|tf|torch|none|mean=M,std=S) or write it into {sidecar_path(path)} as "
                         '{"preprocess": "mean=127,std=128", "input_size": 224}. A silent /255 is never assumed.')
    return spec


def declared_evaluation(meta: dict) -> dict:
    """The data-config fields a sidecar may add to the BackboneSpec (each defaults as for a registry entry)."""
    return {key: meta[key] for key in ("crop_fraction", "interpolation") if meta.get(key) is not None}


def _user_model(path: Path, preprocess: str | None) -> BackboneSpec:
    meta = read_sidecar(path)
    spec = declared_preprocess(path, preprocess, meta)
    if meta.get("layout") not in (None, "NHWC"):
        raise UsageError(f"sidecar '{sidecar_path(path)}': layout {meta['layout']!r} is for .onnx backbones; a .keras "
                         "model takes NHWC (channels last). Remove \"layout\" or set it to \"NHWC\".")

    def build(weights, input_shape):
        return load_keras(path, "backbone")

    return BackboneSpec(str(path), build, resolve_preprocess(spec), meta["input_size"],
                        meta.get("default_layer"), file=path, **declared_evaluation(meta))


def get_backbone(name: str, preprocess: str | None = None) -> BackboneSpec:
    """A registry name (`vgg19`), the path of a `.keras` or `.onnx` file, or a KerasHub preset (`hub:dinov2_small`)."""
    if name.startswith(HUB_PREFIX):  # loaded by name, as features.onnx_backbone: it imports keras_hub
        return importlib.import_module("features.hub_backbone").hub_backbone(name.removeprefix(HUB_PREFIX),
                                                                             preprocess)
    if name.endswith((".keras", ".onnx")):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"backbone file '{name}' does not exist.")
        if name.endswith(".onnx"):
            # features.onnx_backbone builds on this module's spec and sidecar (it imports this one), so it is loaded
            # by name here, at call time: only for an .onnx file (it imports onnx), and without an import cycle
            return importlib.import_module("features.onnx_backbone").onnx_backbone(path, preprocess)
        return _user_model(path, preprocess)
    if name not in _REGISTRY:
        raise UsageError(f"unknown backbone '{name}'. Expected a .keras file or one of the registered names "
                         f"(see 'make backbones').{did_you_mean(name.lower(), _REGISTRY)}")
    if preprocess:
        raise UsageError(f"--preprocess is for .keras files; backbone '{name}' always uses its own preprocess_input.")
    return _REGISTRY[name]
