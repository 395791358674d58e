"""Sections 1, 2 and 7: how close end-to-end extraction gets to the model alone, and how far ahead of the naive loop.

The model-only limit is the very compiled function `extract` runs per batch (`features.extract.make_forward`:
uint8 -> preprocess -> model -> cast), called on pre-decoded batches already in memory, after untimed warm-up
calls. It is timed in two halves, one before and one after the end-to-end run, so that a change in the load of the
shared machine during the run affects both sides alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import Section, Sizes, Sources, list_images, rate, ratio, run_child, stage_images


@dataclass(frozen=True)
class Case:
    name: str
    backbone: str  # registry name, or "lite0" for the pretrained Lite0 of this run's Sources
    layer: str | None
    size: int
    weights: str

    def resolve(self, sources: Sources, sizes: Sizes | None = None) -> dict:
        if self.backbone == "lite0":
            return {"backbone": str(sources.lite0), "layer": self.layer, "size": self.size, "weights": self.weights}
        size = (sizes.registry_size if sizes else None) or self.size
        return {"backbone": self.backbone, "layer": self.layer, "size": size, "weights": self.weights}

    def label(self, sizes: Sizes | None = None) -> str:
        size = self.size if self.backbone == "lite0" else ((sizes.registry_size if sizes else None) or self.size)
        return f"{self.name} @{size}"


CASES = [
    Case("lite0", "lite0", "avg_pool", 224, "imagenet"),
    Case("resnet50", "resnet50", None, 224, "none"),
    Case("vgg19_block2_pool", "vgg19", "block2_pool", 256, "none"),
]


def _build(params: dict, batch: int, jit: bool = False, precision: str = "float32"):
    from features.backbones import get_backbone
    from features.extract import make_forward
    from features.model import build_base, cut

    spec = get_backbone(params["backbone"])
    base = build_base(spec, params["weights"], params["size"], precision)
    layers = [params["layer"] or spec.default_layer or base.layers[-1].name]
    model = cut(base, layers)
    return spec, model, make_forward(model, spec.preprocess.fn, batch, params["size"], jit=jit).compiled


def decode_profile(paths: list[Path], size: int) -> tuple[np.ndarray, dict]:
    """Decode every file on ONE thread (img/s per core), timing file read + JPEG decode and resize separately."""
    import cv2

    from features.images import RESIZE_POLICIES, decode_rgb

    cv2.setNumThreads(1)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    t_decode = t_resize = 0.0
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        img = decode_rgb(path)
        t1 = time.perf_counter()
        out[i] = RESIZE_POLICIES["crop"](img, size)
        t_resize += time.perf_counter() - t1
        t_decode += t1 - t0
    n = len(paths)
    return out, {"decode_ms": 1e3 * t_decode / n, "resize_ms": 1e3 * t_resize / n,
                 "decode_img_s_per_core": rate(n, t_decode + t_resize)}


def time_forward(forward, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for b in batches:
        [o.numpy() for o in forward(b)]  # device -> host included, as extract does
    return time.perf_counter() - start


def time_to_tensor(batch: np.ndarray, repeats: int = 5) -> float:
    """Host -> device (here: host -> TF tensor) copy of one batch, seconds per image."""
    import tensorflow as tf

    start = time.perf_counter()
    for _ in range(repeats):
        tf.identity(tf.constant(batch)).numpy()
    return (time.perf_counter() - start) / (repeats * len(batch))


def measure_case(case: Case, sources: Sources, sizes: Sizes, n: int, batch: int, work: Path, *, jit: bool = False,
                 precision: str = "float32", peer: bool = True, jit_probe: bool = False) -> dict:
    """Model-only vs end-to-end (vs the Keras peer) for one model, all in this process, side by side."""
    from benchmarks.child import keras_peer
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract

    params = case.resolve(sources, sizes)
    size = params["size"]
    data = stage_images(sources.images, n, work / f"img_{case.name}")
    pixels, prof = decode_profile(list_images(data), size)
    spec, model, forward = _build(params, batch, jit, precision)
    batches = [pixels[i:i + batch] for i in range(0, n - n % batch, batch)]
    for _ in range(2):
        time_forward(forward, batches[:1])  # untimed warm-up: tracing, allocator, oneDNN primitive caches
    half = max(1, len(batches) // 2)
    t_a = time_forward(forward, batches[:half])
    cfg = ExtractConfig(backbone=params["backbone"], data=str(data), layer=[params["layer"]] if params["layer"] else [],
                        weights=params["weights"], image_size=size, batch_size=batch, jit=jit,
                        precision=precision, out=str(work / f"{case.name}.h5"), overwrite=True)
    res = extract(cfg, verbose=False)
    t_b = time_forward(forward, batches[half:]) if len(batches) > half else 0.0
    model_rate = rate(len(batches) * batch, t_a + t_b)
    t = res.timings
    e2e = rate(res.processed, t.wall_s)
    row = {"model": case.label(sizes), "batch": batch, "images": res.processed, "model_only_img_s": model_rate,
           "end_to_end_img_s": e2e, "ratio": ratio(e2e, model_rate), **prof,
           "to_tensor_ms": 1e3 * time_to_tensor(batches[0]),
           "model_ms": 1e3 / model_rate, "write_ms": 1e3 * t.write_s / max(res.processed, 1),
           "wall_s": t.wall_s, "wait_input_s": t.wait_input_s, "model_s": t.model_s, "write_s": t.write_s,
           "decode_cpu_s": t.decode_cpu_s}
    if peer:
        keras_peer(spec, model, str(stage_images(sources.images, batch, work / "warm")), size, batch,
                   str(work / "warm.npy"))  # untimed warm-up of predict on one batch
        start = time.perf_counter()
        keras_peer(spec, model, str(data), size, batch, str(work / f"{case.name}.npy"))
        row["keras_peer_img_s"] = rate(n, time.perf_counter() - start)
        row["ours_vs_peer"] = ratio(e2e, row["keras_peer_img_s"])
    if jit_probe and not jit:
        _, _, fwd_jit = _build(params, batch, jit=True)
        time_forward(fwd_jit, batches[:1])  # compile
        probe = batches[:1]
        row["model_only_xla_img_s"] = rate(len(probe) * batch, time_forward(fwd_jit, probe))
        row["xla_speedup"] = ratio(row["model_only_xla_img_s"], model_rate)
        if row["xla_speedup"] > 1.1:  # worth turning on: the end-to-end rate with --jit, after the fix
            res_jit = extract(cfg.replace(jit=True), verbose=False)
            row["end_to_end_xla_img_s"] = rate(res_jit.processed, res_jit.timings.wall_s)
    return row


def section_input_pipeline(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    sec = Section(1, "Input pipeline efficiency (end-to-end ÷ model-only, same batch size)",
                  "end-to-end img/s ÷ model-only img/s ≥ 0.9 for every model",
                  ["model", "batch", "images", "model_only_img_s", "end_to_end_img_s", "ratio", "keras_peer_img_s",
                   "ours_vs_peer", "decode_img_s_per_core"])
    profile_cols = ["model", "decode_ms", "resize_ms", "to_tensor_ms", "model_ms", "write_ms", "wall_s",
                    "wait_input_s", "model_s", "write_s", "decode_cpu_s"]
    xla_cols = ["model", "model_only_img_s", "model_only_xla_img_s", "xla_speedup", "end_to_end_img_s",
                "end_to_end_xla_img_s"]
    for case in [c for c in CASES if c.name in sizes.cases]:
        log(f"section 1: {case.label(sizes)} on {sizes.throughput_images[case.name]} images")
        sec.rows.append(measure_case(case, sources, sizes, sizes.throughput_images[case.name], sizes.batch_size, work,
                                     jit_probe=sizes.jit_probe))
    ratios = [r["ratio"] for r in sec.rows]
    sec.met = all(r >= 0.9 for r in ratios)
    sec.value = ", ".join(f"{r['model']}: {r['ratio']:.2f}" for r in sec.rows)
    sec.extra_tables.append(("Profile: where an image's time goes (ms per image; decode and resize on one core, "
                             "model from the model-only run, write and stage seconds from the end-to-end run)",
                             profile_cols, sec.rows))
    sec.extra_tables.append(("The biggest cost is the model: XLA (`--jit`) before/after, model-only on 1 batch and, "
                             "where XLA helps by >10%, end-to-end with `--jit`", xla_cols, sec.rows))
    return sec


def section_naive(sizes: Sizes, sources: Sources, work: Path, log, children: dict) -> Section:
    """Ours vs the naive per-image loop vs the Keras peer, each in a fresh process on the same images."""
    sec = Section(2, "Against the naive per-image loop (and the Keras peer)",
                  "ours ≥ 5× faster than the naive loop (same model, same images); memory bounded where it grows",
                  ["model", "method", "images", "img_s", "speedup_vs_naive", "peak_rss_mb", "growth_mb"])
    lite = CASES[0].resolve(sources, sizes)
    data = stage_images(sources.images, sizes.naive_images, work / "img_naive")
    base = {**lite, "data": str(data), "batch": sizes.batch_size}
    log(f"section 2: Lite0, naive / keras / ours on {sizes.naive_images} images (fresh processes)")
    recs = {m: run_child(m, {**base, "out": str(work / f"s2_{m}.{'h5' if m == 'extract' else 'npy'}")})
            for m in ("naive", "keras", "extract")}
    _rows(sec, CASES[0].label(sizes), recs)
    mem_rows = []
    vgg = {**CASES[2].resolve(sources), "size": sizes.memory_size, "batch": sizes.memory_batch}
    for n in (sizes.memory_images, 4 * sizes.memory_images):
        log(f"section 2: VGG19 block2_pool @{sizes.memory_size}, naive / keras / ours on {n} images")
        data = stage_images(sources.images, n, work / f"img_mem{n}")
        recs = {}
        for m in ("naive", "keras", "extract"):
            key = (m, n, "float32")
            if key not in children:
                children[key] = run_child(m, {**vgg, "data": str(data), "dtype": "float32",
                                              "out": str(work / f"s2_{m}_{n}.{'h5' if m == 'extract' else 'npy'}")})
            recs[m] = children[key]
        mem_rows += _rows(None, f"vgg19_block2_pool @{sizes.memory_size} N={n}", recs)
    sec.rows += mem_rows
    lite_speedup = sec.rows[2]["speedup_vs_naive"]
    growth = {(r["model"], r["method"]): r for r in mem_rows}
    n1, n4 = sizes.memory_images, 4 * sizes.memory_images
    label = f"vgg19_block2_pool @{sizes.memory_size} N="
    naive_ratio = ratio(growth[(label + str(n4), "naive loop")]["peak_rss_mb"],
                        growth[(label + str(n1), "naive loop")]["peak_rss_mb"])
    ours_ratio = ratio(growth[(label + str(n4), "ours (extract)")]["peak_rss_mb"],
                       growth[(label + str(n1), "ours (extract)")]["peak_rss_mb"])
    vgg_speedup = growth[(label + str(n4), "ours (extract)")]["speedup_vs_naive"]
    sec.met = lite_speedup >= 5 and vgg_speedup >= 5 and ours_ratio <= 1.1
    sec.value = (f"speed-up vs naive: Lite0 {lite_speedup:.2f}×, VGG19 block2_pool {vgg_speedup:.2f}×; peak RSS 4N/N: "
                 f"naive {naive_ratio:.2f}, ours {ours_ratio:.2f}")
    return sec


METHOD_NAMES = {"naive": "naive loop", "keras": "keras peer (image_dataset_from_directory + predict)",
                "extract": "ours (extract)"}


def _rows(sec: Section | None, model: str, recs: dict) -> list[dict]:
    naive_rate = rate(recs["naive"]["images"], recs["naive"]["seconds"])
    rows = []
    for m, rec in recs.items():
        r = rate(rec["images"], rec["seconds"])
        rows.append({"model": model, "method": METHOD_NAMES[m], "images": rec["images"], "img_s": r,
                     "speedup_vs_naive": ratio(r, naive_rate), "peak_rss_mb": rec["peak_rss_mb"],
                     "growth_mb": rec["growth_mb"]})
    if sec is not None:
        sec.rows += rows
    return rows


def section_gpu(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    import tensorflow as tf

    sec = Section(7, "GPU: table 1 with mixed precision and XLA on/off",
                  "report only; compare ResNet50 with the Keras applications table (≈ 7k img/s, A100, batch 32)",
                  ["model", "precision", "xla", "batch", "model_only_img_s", "end_to_end_img_s", "ratio",
                   "decode_img_s_per_core"])
    if not tf.config.list_physical_devices("GPU"):
        sec.notes.append("No GPU is visible to TensorFlow on this machine, so this section was not run. On a GPU node "
                         "run `make bench SECTIONS=7` (or `python -m benchmarks --sections 7`): it measures "
                         "table 1 for Lite0, ResNet50 and VGG19 block2_pool with precision float32/mixed × XLA off/on, "
                         "and prints how close end-to-end ResNet50 gets to the published ≈ 7k img/s.")
        return sec
    for case in CASES:
        for precision in ("float32", "mixed"):
            for jit in (False, True):
                log(f"section 7: {case.label(sizes)} precision={precision} xla={jit}")
                row = measure_case(case, sources, sizes, max(sizes.throughput_images[case.name], 8 * sizes.batch_size),
                                   sizes.batch_size, work, jit=jit, precision=precision, peer=False)
                sec.rows.append({**row, "precision": precision, "xla": jit})
    best = max((r for r in sec.rows if r["model"].startswith("resnet50")), key=lambda r: r["end_to_end_img_s"])
    sec.value = (f"best ResNet50 end-to-end {best['end_to_end_img_s']:.0f} img/s = "
                 f"{best['end_to_end_img_s'] / 7000:.2f} of the published ≈ 7k img/s (A100); "
                 f"model-only {best['model_only_img_s']:.0f} img/s")
    sec.notes.append("End-to-end on a GPU is bounded by decoding on the host CPU cores: compare end_to_end_img_s with "
                     "decode_img_s_per_core × cores.")
    return sec
