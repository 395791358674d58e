"""Model-only machinery shared by the throughput sections, their child processes and `make bench-gpu`: an engine's
forward pass built as extract builds it, decoding on one thread, and timing calls on batches in memory."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.common import rate


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

    from features.images import CROP_FRACTION, NEEDED_SHORT, RESIZE_POLICIES, decode_bgr

    cv2.setNumThreads(1)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    t_decode = t_resize = 0.0
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        img = decode_bgr(path, NEEDED_SHORT["crop"](size, CROP_FRACTION))  # as load_image: DCT-scaled where it can
        t1 = time.perf_counter()
        out[i] = cv2.cvtColor(RESIZE_POLICIES["crop"](img, size, CROP_FRACTION), cv2.COLOR_BGR2RGB)  # then to RGB
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
