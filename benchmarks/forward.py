"""Model-only machinery shared by the throughput sections, their child processes and `make bench-gpu`: an engine's
forward pass built as extract builds it, decoding on one thread, and timing calls on batches in memory."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.common import rate, timed


def cut_model(params: dict, precision: str = "float32"):
    """(spec, the backbone cut at params' layer), as extract builds it."""
    from features.backbones import get_backbone
    from features.model import build_base, cut

    spec = get_backbone(params["backbone"])
    base = build_base(spec, params["weights"], params["size"], precision)
    return spec, cut(base, [params["layer"] or spec.default_layer or base.layers[-1].name])


def model_forward(params: dict, batch: int, engine: str = "tf", jit: bool = False, precision: str = "float32",
           export: Path | None = None):
    """(spec, cut model, forward) of one engine; `export`: an ONNX file written by an earlier extract, reused."""
    from features.engines import ENGINES, EngineOptions, Graph

    spec, model = cut_model(params, precision)
    graph = Graph(lambda: model, spec.preprocess.fn, batch, params["size"])
    return spec, model, ENGINES[engine](graph, EngineOptions(jit, export, keep_export=export is not None))


def exported_graph(cache: Path) -> Path:
    """The ONNX file an extract into `cache` used (engines/<hash>.onnx beside it), from the cache's own attributes."""
    from features.engines import export_path
    from features.store import read_attrs

    return export_path(cache.parent / "engines", read_attrs(cache))


def decode_profile(paths: list[Path], size: int) -> tuple[np.ndarray, dict]:
    """Decode every file on ONE thread (img/s per core), timing file read + JPEG decode and resize separately."""
    import cv2

    from features.images import NEEDED_SHORT, RESIZE_POLICIES, decode_bgr

    cv2.setNumThreads(1)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    t_decode = t_resize = 0.0
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        img = decode_bgr(path, NEEDED_SHORT["crop"](size))  # as load_image decodes: DCT-scaled where a JPEG allows
        t1 = time.perf_counter()
        out[i] = cv2.cvtColor(RESIZE_POLICIES["crop"](img, size), cv2.COLOR_BGR2RGB)  # resize, then flip to RGB
        t_resize += time.perf_counter() - t1
        t_decode += t1 - t0
    n = len(paths)
    return out, {"decode_ms": 1e3 * t_decode / n, "resize_ms": 1e3 * t_resize / n,
                 "decode_img_s_per_core": rate(n, t_decode + t_resize)}


def time_forward(forward, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for b in batches:
        forward(b)  # numpy arrays out: device -> host included, as extract does
    return time.perf_counter() - start


def time_to_tensor(batch: np.ndarray, repeats: int = 5) -> float:
    """Host -> device (here: host -> TF tensor) copy of one batch, seconds per image."""
    import tensorflow as tf

    start = time.perf_counter()
    for _ in range(repeats):
        tf.identity(tf.constant(batch)).numpy()
    return (time.perf_counter() - start) / (repeats * len(batch))


def model_flops(model, size: int) -> float:
    """Floating-point operations of one size x size image's forward pass, counted as 2 per multiply-add of every
    layer with a kernel (convolutions, depthwise convolutions, dense): kernel size times the output's spatial
    positions, read from one forward pass (a `.keras` backbone may take any input size)."""
    import keras

    layers = [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]
    outputs = keras.Model(model.inputs, [layer.output for layer in layers])(np.zeros((1, size, size, 3), np.float32))
    return float(sum(2 * np.prod(layer.kernel.shape) * np.prod(out.shape[1:-1])
                     for layer, out in zip(layers, outputs)))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate on every core (NumPy's BLAS), best of `repeats`: about the most
    arithmetic a convolution engine can get out of the CPU."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    best = min(timed(np.matmul, a, b)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9
