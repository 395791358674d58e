"""Engines: what runs the forward pass of stage one. A registry (name -> builder); every builder returns a `Forward`.

All engines compute the same `Graph` (uint8 pixels -> preprocess -> cut model -> global pool -> storage dtype) on
batches of one fixed shape, so the batch-slot design of `features.extract` keeps every exactness guarantee within an
engine. `tf` runs it as a compiled TensorFlow function (the only engine for mixed precision and XLA, and the choice
on a GPU); `onnx` exports it once to ONNX and runs it with ONNX Runtime, 1.5-3.8x faster on CPU (docs/engines.md).
The export is kept under the hash of what determines it, beside the caches, so only the first run pays for it.
ONNX Runtime computes a batch in sub-batches whose largest activation fits ACTIVATION_BUDGET (`onnx_batch`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import UsageError
from features.model import installed_version, pool_features
from features.schema import GRAPH, CacheAttrs

# uint8 pixels (batch, size, size, 3) -> one array per cut layer, (batch, *row_shape), in the storage dtype
Forward = Callable[[np.ndarray], list[np.ndarray]]

# Bytes of one layer's output for the images ONNX Runtime computes at once. Past it, a larger batch only slows the CPU
# down: extract of VGG19 -> block2_pool @256 (16 MiB per image) ran faster with batches of 8 than of 32 in each of 6
# interleaved rounds (by up to 33%), and with sub-batches of 8 in a batch of 32 about 5% faster than in one call
# (docs/engines.md); Lite0 (4.6 MiB) showed no difference.
ACTIVATION_BUDGET = 128 << 20


@dataclass(frozen=True)
class Graph:
    """The computation every engine runs: one fixed-shape batch of uint8 pixels in, one array per cut layer out."""

    build: Callable[[], object]  # returns the cut keras.Model, the same one each call; called only where TensorFlow
    #                              runs, so a kept ONNX export runs without building it (or importing TensorFlow)
    preprocess: Callable  # RGB float [0, 255] -> model input, in TensorFlow ops
    batch_size: int
    size: int
    pool: str = "none"
    dtype: str = "float32"

    @property
    def model(self):
        import tensorflow as tf

        with tf.init_scope():  # built eagerly even when first used inside a trace, where weights would not be loaded
            return self.build()

    def __call__(self, pixels):
        import tensorflow as tf

        outs = self.model(self.preprocess(tf.cast(pixels, tf.float32)), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [tf.cast(pool_features(o, self.pool), self.dtype) for o in outs]

    def input_spec(self):
        import tensorflow as tf

        return tf.TensorSpec((self.batch_size, self.size, self.size, 3), tf.uint8)


@dataclass(frozen=True)
class EngineOptions:
    jit: bool = False  # tf: compile with XLA
    export: Path | None = None  # onnx: where the exported graph is kept (and a failure to export is noted)
    keep_export: bool = True  # False (random weights: each process has its own): export to a temporary file
    threads: int = 0  # onnx: intra-op threads; 0: the cores this process may use


def tf_forward(graph: Graph, options: EngineOptions) -> Forward:
    """One compiled TensorFlow call per batch (XLA with options.jit)."""
    import tensorflow as tf

    compiled = tf.function(graph, jit_compile=options.jit, autograph=False, input_signature=[graph.input_spec()])

    def forward(pixels: np.ndarray) -> list[np.ndarray]:
        return [o.numpy() for o in compiled(pixels)]

    return forward


def peak_activation_bytes(graph: Graph) -> int:
    """The largest float32 tensor the graph makes for one image, from a trace at batch 1 (every shape is known there,
    even for a model saved with free input sides); weights are not activations."""
    import tensorflow as tf

    one = dataclasses.replace(graph, batch_size=1)
    traced = tf.function(one, autograph=False).get_concrete_function(one.input_spec()).graph
    return 4 * max(out.shape.num_elements() for op in traced.get_operations()
                   if op.type not in ("ReadVariableOp", "VarHandleOp", "Const") for out in op.outputs
                   if out.shape.is_fully_defined())


def onnx_batch(graph: Graph) -> int:
    """The images ONNX Runtime computes at once: the largest divisor of the batch whose largest activation fits
    ACTIVATION_BUDGET. Each slot of a batch still lands in the same place of the same sub-batch every run."""
    peak = peak_activation_bytes(graph)
    fits = [d for d in range(1, graph.batch_size + 1) if graph.batch_size % d == 0 and d * peak <= ACTIVATION_BUDGET]
    return max(fits, default=1)


def onnx_forward(graph: Graph, options: EngineOptions) -> Forward:
    """ONNX Runtime on the exported graph (exported now unless kept from an earlier run): fixed sub-batch shape, fixed
    threads, so a batch slot's result is the same in every process on the same machine."""
    import onnxruntime as ort

    keep = options.keep_export and options.export is not None
    path = (options.export if keep and options.export.exists() else
            export_onnx(dataclasses.replace(graph, batch_size=onnx_batch(graph)), options.export if keep else None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]  # onnxruntime-gpu
    try:
        session = ort.InferenceSession(str(path), so, providers=providers + ["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime raises its own Fail/InvalidGraph types
        raise UsageError(f"{path} cannot be loaded by ONNX Runtime ({str(err).splitlines()[0][:200]}); "
                         "delete it to export the model again.") from None
    finally:
        if not keep:
            path.unlink(missing_ok=True)
    name, sub = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]  # a kept export: its own sub-batch
    if not isinstance(sub, int) or graph.batch_size % sub:
        raise UsageError(f"{path} computes batches of {sub}, which do not divide the batch size {graph.batch_size}; "
                         "delete it to export the model again.")

    def forward(pixels: np.ndarray) -> list[np.ndarray]:
        parts = [session.run(None, {name: pixels[i : i + sub]}) for i in range(0, len(pixels), sub)]
        return parts[0] if len(parts) == 1 else [np.concatenate(outs) for outs in zip(*parts)]

    return forward


ENGINES: dict[str, Callable[[Graph, EngineOptions], Forward]] = {"tf": tf_forward, "onnx": onnx_forward}
ENGINE_CHOICES = ("auto", *ENGINES)
TF_ONLY = {"precision": "mixed", "jit": True}  # options that only the tf engine implements


class ExportError(RuntimeError):
    """The graph could not be converted to ONNX (an operation the converter does not support)."""


def export_onnx(graph: Graph, path: Path | None) -> Path:
    """Write `graph` as ONNX to `path` (atomically: a temporary file renamed into place), or to a temporary file when
    `path` is None. Raises ExportError with the converter's first line when the graph does not convert."""
    import keras

    class Wrapped(keras.Model):
        """Keras' exporter takes a Model; this one is the whole graph, preprocessing and pooling included."""

        def __init__(self):
            super().__init__(name="extract_graph")
            self.cut = graph.model
            self.built = True

        def call(self, pixels):
            return graph(pixels)

    folder = path.parent if path else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # Keras' numpy-2 patch of tf2onnx touches np.object
            warnings.simplefilter("ignore", FutureWarning)
            Wrapped().export(tmp, format="onnx", input_signature=[graph.input_spec()], verbose=False)
    except Exception as err:  # tf2onnx raises plain exceptions for unsupported operations
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
    if path is None:
        return Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the shared cache folder's exports private
    os.replace(tmp, path)
    return path


def export_versions() -> dict[str, str]:
    """The converter and runtime versions an exported graph and an onnx cache record."""
    return {f"{name}_version": installed_version(name) for name in ("onnxruntime", "tf2onnx", "onnx")}


def export_path(folder: Path, attrs: CacheAttrs) -> Path:
    """<folder>/<hash>.onnx, the hash over what determines the graph (the schema's `graph` attributes, the converter
    versions and the activation budget that sets its sub-batch)."""
    identity = attrs.select(GRAPH)
    identity.update({k: v for k, v in export_versions().items() if k != "onnxruntime_version"})
    identity["activation_budget"] = ACTIVATION_BUDGET  # decides the exported sub-batch
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return folder / f"{digest}.onnx"


def unsupported_marker(path: Path) -> Path:
    """Beside an export that failed: the reason, so `auto` chooses tf at once next time (and the cache agrees)."""
    return path.with_suffix(".unsupported")


def resolve_engine(name: str, precision: str, jit: bool, gpus: int, export: Path | None) -> str:
    """auto: TensorFlow on a GPU or for its own options (mixed precision, XLA), else ONNX Runtime unless this graph
    is known not to export. Explicit names are checked against the options only one engine implements."""
    if name not in ENGINE_CHOICES:
        raise UsageError(f"engine '{name}' is not valid. Expected one of: {', '.join(ENGINE_CHOICES)}.")
    tf_only = [f"--{k} {v}" if v is not True else f"--{k}" for k, v in TF_ONLY.items()
               if {"precision": precision, "jit": jit}[k] == v]
    if name == "auto":
        known_bad = export is not None and unsupported_marker(export).exists()
        return "tf" if gpus or tf_only or known_bad else "onnx"
    if name != "tf" and tf_only:
        raise UsageError(f"engine '{name}' does not implement {' and '.join(tf_only)}. Use --engine tf, or drop "
                         f"{' and '.join(tf_only)}.")
    return name


def build_forward(requested: str, engine: str, graph: Graph, options: EngineOptions,
                  note: Callable[[str], None] = print) -> tuple[Forward, str]:
    """The forward pass of `engine` (`requested` resolved by `resolve_engine`) and the engine that runs it: when the
    graph does not export to ONNX, an explicit --engine onnx is a one-line error and auto falls back to tf."""
    try:
        return ENGINES[engine](graph, options), engine
    except ExportError as err:
        if options.export is not None:
            options.export.parent.mkdir(parents=True, exist_ok=True)
            unsupported_marker(options.export).write_text(f"{err}\n")
        if requested != "auto":
            raise UsageError(f"engine '{engine}': this model does not export to ONNX ({err}). "
                             "Use --engine tf.") from None
        note(f"note: this model does not export to ONNX ({err}); running it with TensorFlow (--engine tf).")
        return ENGINES["tf"](graph, options), "tf"
