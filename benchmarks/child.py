"""One measured job in a fresh process: `python -m benchmarks.child JOB '{json params}'` prints one JSON line.

Jobs: `extract` (our stage one), `naive` (the seed articles' per-image loop), `keras` (image_dataset_from_directory +
predict), `cpu_time` (the CPU time one image needs in decode, resize and the model: section 2's limit). Each reports
what it timed and `peak_rss_mb` (the whole process's high-water mark, VmHWM); `extract`, `naive` and `keras` also
`growth_mb` (the most the resident set rose above its level before the timed call, sampled every 10 ms; for `extract`
that call also builds the model, for the others the model is built before).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from classifiers.memory import PeakMemory  # noqa: E402  (after the log level, before TensorFlow loads)


def job_extract(params: dict) -> dict:
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    if params.get("time_engines"):  # auto times both engines even on a short run and keeps the choice for later runs
        import features.engines

        features.engines.MEASURE_MIN_BATCHES = 1
    out = Path(params["out"])
    cfg = ExtractConfig(backbone=params["backbone"], data=params["data"], layer=[params["layer"]] if params["layer"]
                        else [], weights=params["weights"], image_size=params["size"], batch_size=params["batch"],
                        dtype=params.get("dtype", "float32"), pool=params.get("pool", "none"), out=str(out),
                        engine=params.get("engine", "auto"), overwrite=True)
    with PeakMemory(interval_s=0.01) as mem:
        res = extract(cfg, verbose=False)
    t = res.timings
    return {"images": res.processed, "engine": res.engine, "seconds": t.wall_s, "growth_mb": mem.peak_growth / 2**20,
            "file_mb": out.stat().st_size / 2**20, "decode_cpu_s": t.decode_cpu_s, "wait_input_s": t.wait_input_s,
            "model_s": t.model_s, "write_s": t.write_s}


def job_cpu_time(params: dict) -> dict:
    """CPU milliseconds one image needs: file read + JPEG decode and resize + crop on one thread (`decode_profile`,
    every image of the folder), and the forward pass of the engine that wrote the cache `params["cache"]` (its kept
    export), as this process's CPU time over `batches` calls (default 4) on one batch decoded beforehand, after two
    untimed warm-up calls; `model_img_s` is that forward's wall rate."""
    import numpy as np

    from benchmarks.common import list_images, rate
    from benchmarks.forward import decode_profile, exported_graph, model_forward, time_forward
    from features.store import read_attrs

    batch, cache = params["batch"], Path(params["cache"])
    pixels, profile = decode_profile(list_images(Path(params["data"])), params["size"])
    pixels = pixels[np.arange(batch) % len(pixels)]
    engine = read_attrs(cache).engine
    forward = model_forward(params, batch, engine, export=exported_graph(cache) if engine == "onnx" else None)[2]
    for _ in range(2):
        time_forward(forward, [pixels])
    batches = [pixels] * params.get("batches", 4)
    cpu = time.process_time()
    seconds = time_forward(forward, batches)
    images = len(batches) * batch
    return {"engine": engine, "decode_ms": profile["decode_ms"], "resize_ms": profile["resize_ms"],
            "model_cpu_ms": 1e3 * (time.process_time() - cpu) / images, "model_img_s": rate(images, seconds),
            "cores": len(os.sched_getaffinity(0))}


def job_naive(params: dict) -> dict:
    """The seed articles' loop, as written there: imread -> resize -> predict one image -> append -> save."""
    import cv2
    import numpy as np

    from benchmarks.common import list_images
    from benchmarks.forward import cut_model

    spec, model = cut_model(params)
    size, paths = params["size"], list_images(Path(params["data"]))
    warm = cv2.resize(cv2.imread(str(paths[0])), (size, size))
    model.predict(spec.preprocess.fn(warm[None].astype("float32")), verbose=0)  # untimed warm-up (tracing)
    start = time.perf_counter()
    with PeakMemory(interval_s=0.01) as mem:
        features = []
        for path in paths:
            img = cv2.resize(cv2.imread(str(path)), (size, size))
            x = spec.preprocess.fn(img[None].astype("float32"))
            features.append(model.predict(x, verbose=0))
        np.save(params["out"], np.concatenate(features))
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "growth_mb": mem.peak_growth / 2**20,
            "file_mb": Path(params["out"]).stat().st_size / 2**20}


def keras_peer(spec, model, data: str, size: int, batch: int, out: str) -> int:
    """What a Keras user writes: image_dataset_from_directory -> preprocess in map -> predict -> save."""
    import keras
    import numpy as np
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(data, labels=None, image_size=(size, size), batch_size=batch,
                                                  shuffle=False, verbose=False)
    ds = ds.map(lambda x: spec.preprocess.fn(x), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    features = model.predict(ds, verbose=0)
    np.save(out, features)
    return len(features)


def job_keras(params: dict) -> dict:
    from benchmarks.forward import cut_model

    spec, model = cut_model(params)
    with tempfile.TemporaryDirectory() as tmp:  # untimed warm-up on a one-batch copy of the folder
        from benchmarks.common import stage_images

        stage_images(Path(params["data"]), params["batch"], Path(tmp) / "warm")
        keras_peer(spec, model, str(Path(tmp) / "warm"), params["size"], params["batch"], str(Path(tmp) / "w.npy"))
    start = time.perf_counter()
    with PeakMemory(interval_s=0.01) as mem:
        n = keras_peer(spec, model, params["data"], params["size"], params["batch"], params["out"])
    return {"images": n, "seconds": time.perf_counter() - start, "growth_mb": mem.peak_growth / 2**20,
            "file_mb": Path(params["out"]).stat().st_size / 2**20}


def peak_rss_mb() -> float:
    """This process's high-water resident set (VmHWM). Not getrusage's ru_maxrss: on Linux a child inherits the
    parent's maximum across fork + exec, so every child of a big parent would report the parent's figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


JOBS = {"extract": job_extract, "naive": job_naive, "keras": job_keras, "cpu_time": job_cpu_time}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in JOBS:
        print(f"usage: python -m benchmarks.child {{{'|'.join(JOBS)}}} '<json params>'. Received: {argv}",
              file=sys.stderr)
        return 2
    record = JOBS[argv[0]](json.loads(argv[1]))
    record["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
