"""`python -m benchmarks.gpu` (`make bench-gpu`): the GPU ratios in under 5 minutes, printed (nothing is written).

Per model: TensorFlow's compiled model-only rate in float32 (the reference), with mixed precision + XLA (what `auto`
runs on a GPU), ONNX Runtime's CUDA provider when `onnxruntime-gpu` is installed, and how many images per second the
decoders feed from all host cores (decode + resize + crop of real JPEGs), each as a ratio to the reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import find_sources, git_state, list_images, rate, ratio, stage_images
from benchmarks.forward import model_forward, time_forward
from benchmarks.throughput import CASES
from features.images import load_image


def decoder_feed_rate(paths: list[Path], size: int, workers: int) -> float:
    """Images per second that `workers` decoder threads deliver, as extract's decode pool does."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: load_image(p, size, "crop"), paths[:workers]))  # warm-up: thread start, page cache
        start = time.perf_counter()
        list(pool.map(lambda p: load_image(p, size, "crop"), paths))
    return rate(len(paths), time.perf_counter() - start)


def model_rate(forward, pixels: np.ndarray, batch: int, seconds: float) -> float:
    """Model-only img/s: warm-up calls, then as many batches as fit in about `seconds`."""
    batches = [pixels[i:i + batch] for i in range(0, len(pixels) - len(pixels) % batch, batch)]
    for _ in range(3):
        time_forward(forward, batches[:1])
    calls, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += time_forward(forward, batches)
        calls += len(batches)
    return rate(calls * batch, elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256, help="real JPEGs decoded for the feed rate")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per model-only figure")
    args = parser.parse_args(argv)
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        print("error: no GPU is visible to TensorFlow; run `make bench-gpu` on a GPU node (README: GPU).",
              file=sys.stderr)
        return 2
    import onnxruntime as ort

    sources, cores = find_sources(), len(os.sched_getaffinity(0))
    ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    print(f"commit {git_state()}; GPU {tf.config.list_physical_devices('GPU')[0].name}; {cores} host cores; "
          f"onnxruntime {ort.__version__} ({'CUDA provider' if ort_gpu else 'CPU only: pip install onnxruntime-gpu'})")
    batch = args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        paths = list_images(stage_images(sources.images, args.images, work / "img"))
        header = f"{'model':<24} {'what':<40} {'img/s':>9} {'÷ TF f32':>9}"
        print(header + "\n" + "-" * len(header))
        for case in (CASES[0], CASES[1]):
            params = case.resolve(sources, None, work)
            feed = decoder_feed_rate(paths, params["size"], cores)
            pixels = np.stack([load_image(p, params["size"], "crop") for p in paths[:batch]] * 2)
            configs = [("TF float32 (reference)", dict(engine="tf")),
                       ("TF mixed + XLA (auto on GPU)", dict(engine="tf", jit=True, precision="mixed"))]
            configs += [("ONNX Runtime CUDA", dict(engine="onnx"))] if ort_gpu else []
            rows = [(what, model_rate(model_forward(params, batch, **kw)[2], pixels, batch, args.seconds))
                    for what, kw in configs]
            rows.append((f"decoder feed, {cores} threads", feed))
            for what, value in rows:
                print(f"{case.label():<24} {what:<40} {value:>9.0f} {ratio(value, rows[0][1]):>9.2f}")
    print("A decoder feed below the model's rate means the GPU waits for the host: more cores, or smaller JPEGs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
