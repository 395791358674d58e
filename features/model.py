"""Build the frozen base with the asked-for weights, and cut it at named layers.

ImageNet weights come from the Keras cache. Offline, the download fails fast (a socket timeout guards against a hang)
and the error names the file to pre-stage; it never falls back to random weights.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from features.backbones import BackboneSpec, sha256_file
from features.errors import UsageError, did_you_mean

DOWNLOAD_TIMEOUT_S = 60
POOLS = ("none", "avg", "max")
# Device nodes without which TensorFlow on Linux sees no GPU: CUDA, CUDA under WSL2, ROCm.
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def weights_identity(spec: BackboneSpec, weights: str) -> str:
    """What makes two caches comparable: `imagenet@keras-X`, `none`, or the sha256 of the weights file."""
    if spec.file is not None and weights in ("default", "imagenet"):
        return f"sha256:{sha256_file(spec.file)}"
    if weights in ("default", "imagenet"):
        return spec.weights_id or f"imagenet@keras-{installed_version('keras')}"
    if weights == "none":
        return "none"
    return f"sha256:{sha256_file(weights)}"


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextmanager
def _global_policy(name: str):
    """Keras reads the dtype policy when layers are built; scope it so later models (heads, tests) are unaffected."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _offline_error(spec: BackboneSpec, err: Exception) -> UsageError:
    url = re.search(r"https?://\S+?\.h5", str(err))
    fname = url.group(0).rsplit("/", 1)[-1] if url else "<the weights file>"
    where = url.group(0) if url else "the Keras applications weights URL"
    return UsageError(
        f"cannot download ImageNet weights for '{spec.name}' ({str(err).rsplit(': ', 1)[-1][:120]}). On a connected "
        f"machine run 'make weights BACKBONE={spec.name}' (or fetch {where}) and copy {fname} to "
        f"{keras_cache_dir() / fname}; or pass WEIGHTS=path/to/file."
    )


def build_base(spec: BackboneSpec, weights: str, size: int, precision: str = "float32"):
    """The frozen backbone as a keras.Model (include_top=False for registry models)."""
    if precision not in ("float32", "mixed"):
        raise UsageError(f"precision '{precision}' is not valid. Expected 'float32' or 'mixed'.")
    policy = "mixed_float16" if precision == "mixed" else "float32"
    if weights not in ("default", "imagenet", "none") and not Path(weights).is_file():
        raise UsageError(f"weights '{weights}' is not valid. Expected 'imagenet', 'none' or an existing weights file.")
    if spec.file is not None:
        model = spec.build(None, None)
        if weights == "none":
            raise UsageError(f"weights 'none' is not supported for a .keras backbone ({spec.name}); "
                             "its weights come from the file, or from WEIGHTS=path/to/file.weights.h5.")
        if weights not in ("default", "imagenet"):
            model.load_weights(weights)
        if precision == "mixed":
            model = _with_policy(model, policy)
        return _frozen(model)
    keras_weights = {"default": "imagenet", "none": None}.get(weights, weights)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), _global_policy(policy):
            model = spec.build(keras_weights, (size, size, 3))
    except UsageError:  # said in one line by the backbone itself (a KerasHub preset that cannot be downloaded)
        raise
    except Exception as err:  # Keras raises a bare Exception for a failed download
        if "URL fetch failure" in str(err) or isinstance(err, (OSError, socket.timeout)):
            raise _offline_error(spec, err) from None
        if isinstance(err, ValueError):
            raise UsageError(f"backbone '{spec.name}' cannot be built at image size {size}: {err}") from None
        raise
    return _frozen(model)


def _with_policy(model, policy: str):
    """Rebuild a loaded model under another dtype policy (a loaded file keeps the policy it was saved with)."""
    import keras

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    clone_ = keras.models.clone_model(model, clone_function=clone)
    clone_.set_weights(model.get_weights())
    return clone_


def _frozen(model):
    model.trainable = False
    return model


def check_layers(model, layers: list[str]) -> None:
    names = [layer.name for layer in model.layers]
    for name in layers:
        if name not in names:
            raise UsageError(f"layer '{name}' is not in backbone '{model.name}' ({len(names)} layers; "
                             f"see 'make layers').{did_you_mean(name, names)}")


def cut(model, layers: list[str]):
    """One model with one output per named layer, so several layers come from ONE forward pass."""
    import keras

    check_layers(model, layers)
    return keras.Model(model.input, [model.get_layer(n).output for n in layers], name=f"{model.name}_cut")


def pool_features(x, pool: str):
    """Global spatial pooling of a (N, H, W, C) or (N, T, C) map; vectors pass through."""
    import tensorflow as tf

    if pool == "none" or x.shape.rank == 2:
        return x
    axes = list(range(1, x.shape.rank - 1))
    return tf.reduce_mean(x, axis=axes) if pool == "avg" else tf.reduce_max(x, axis=axes)


def layer_shapes(model, size: int) -> list[tuple[str, str, tuple]]:
    """(name, class, per-image output shape) for every layer, from one forward pass of a blank image."""
    import keras
    import numpy as np

    usable = [layer for layer in model.layers if not isinstance(layer.output, (list, tuple))]
    probe = keras.Model(model.input, [layer.output for layer in usable])
    outs = probe(np.zeros((1, size, size, 3), "float32"), training=False)
    return [(layer.name, type(layer).__name__, tuple(o.shape[1:])) for layer, o in zip(usable, outs)]


def installed_version(module: str) -> str:
    """The version of the installed distribution that provides `module`, read without importing it: a run on a kept
    ONNX export never imports TensorFlow (docs/engines.md)."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:  # provided under another name: tensorflow-cpu, onnxruntime-gpu
        names = importlib.metadata.packages_distributions().get(module) or []
        return importlib.metadata.version(names[0]) if names else "unknown"


def runtime_versions() -> dict[str, str]:
    """The library versions a cache records, so a reader can tell which software computed its numbers."""
    return {name + "_version": installed_version(name) for name in ("keras", "tensorflow", "h5py")}


def gpu_count() -> int:
    """GPUs TensorFlow sees. On Linux without a GPU device node it sees none, and is not imported to say so."""
    if sys.platform == "linux" and not any(glob.glob(node) for node in GPU_DEVICE_NODES):
        return 0
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))
