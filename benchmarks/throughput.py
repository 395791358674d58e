"""Sections 1, 2 and 7: how close end-to-end extraction gets to the model alone, and how far ahead of the others.

The model-only limits are the very forward passes `extract` runs per batch (`features.engines`: uint8 -> preprocess
-> model -> pool -> cast), TensorFlow's compiled function and ONNX Runtime's session on the exported graph, called on
pre-decoded batches already in memory after untimed warm-up calls. Section 1 times them in two halves, one before and
one after the end-to-end run, so that a change in the load of the shared machine affects both sides alike. Section 2
runs whole processes side by side (ours with each engine and by default, the Keras peer, the naive loop) and takes the
steady rate from N and 2N images, so start-up (imports, model load, export) is excluded; its bound is the CPU-time
limit, the cores ÷ the CPU time one image needs in decode, resize and model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import (SHIPPED_IMAGES, Section, Sizes, Sources, list_images, rate, ratio, run_child,
                               stage_images)
from benchmarks.forward import decode_profile, exported_graph, model_forward, time_forward, time_to_tensor


@dataclass(frozen=True)
class Case:
    name: str
    backbone: str  # registry name, "lite0" for the pretrained Lite0 of this run's Sources, or VIT_B16
    layer: str | None
    size: int
    weights: str

    def resolve(self, sources: Sources, sizes: Sizes | None = None, work: Path | None = None) -> dict:
        """The model parameters; with `work`, random weights are staged as a file there, so that every process of
        the run uses the same ones and keeps one ONNX export (random weights are exported afresh by each)."""
        if self.backbone == "lite0":
            return {"backbone": str(sources.lite0), "layer": self.layer, "size": self.size, "weights": self.weights}
        size = (sizes.registry_size if sizes else None) or self.size
        if self.backbone == VIT_B16:  # the weights of its preset folder (random), or the real preset's
            backbone = f"hub:{vit_b16_preset(size, work)}" if work is not None else "hub:vit_base_patch16_224_imagenet"
            return {"backbone": backbone, "layer": self.layer, "size": size, "weights": "imagenet"}
        weights = self.weights
        if weights == "none" and work is not None:
            weights = str(random_weights(self.backbone, size, work))
        return {"backbone": self.backbone, "layer": self.layer, "size": size, "weights": weights}

    def label(self, sizes: Sizes | None = None) -> str:
        size = self.size if self.backbone == "lite0" else ((sizes.registry_size if sizes else None) or self.size)
        return f"{self.name} @{size}"


def random_weights(backbone: str, size: int, work: Path) -> Path:
    """work/<backbone>_<size>.weights.h5: seeded random weights, written once per run."""
    path = work / f"{backbone}_{size}.weights.h5"
    if not path.exists():
        import keras

        from features.backbones import get_backbone
        from features.model import build_base

        keras.utils.set_random_seed(0)
        build_base(get_backbone(backbone), "none", size).save_weights(path)
    return path


VIT_B16 = "vit_b16"


def vit_b16_preset(size: int, work: Path) -> Path:
    """work/vit_b16_<size>/: a KerasHub preset folder of ViT-B/16 (the architecture of vit_base_patch16_224_imagenet:
    12 blocks, 768 wide, 86M parameters) with seeded random weights, written once per run; cut at its class token."""
    path = work / f"{VIT_B16}_{size}"
    if not path.exists():
        import keras
        import keras_hub

        keras.utils.set_random_seed(0)
        keras_hub.models.ViTBackbone(image_shape=(size, size, 3), patch_size=16, num_layers=12, num_heads=12,
                                     hidden_dim=768, mlp_dim=3072).save_to_preset(str(path))
        keras_hub.layers.ViTImageConverter(image_size=(size, size), scale=1 / 127.5, offset=-1.0).save_to_preset(
            str(path))
    return path


CASES = [
    Case("lite0", "lite0", "avg_pool", 224, "imagenet"),
    Case("resnet50", "resnet50", None, 224, "none"),
    Case("vgg19_block2_pool", "vgg19", "block2_pool", 256, "none"),
    Case("vit_b16", VIT_B16, "cls_token", 224, "none"),
]


def measure_case(case: Case, sources: Sources, sizes: Sizes, n: int, batch: int, work: Path, *, jit: bool = False,
                 precision: str = "float32", peer: bool = True, jit_probe: bool = False) -> dict:
    """Model-only (TensorFlow, and the engine extract chose) vs end-to-end (vs the Keras peer) for one model, all
    in this process, side by side."""
    from benchmarks.child import keras_peer
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    params = case.resolve(sources, sizes, work)
    size = params["size"]
    data = stage_images(sources.images, n, work / f"img_{case.name}")
    warm = stage_images(sources.images, batch, work / "warm")
    pixels, prof = decode_profile(list_images(data), size)
    cfg = ExtractConfig(backbone=params["backbone"], data=str(data), layer=[params["layer"]] if params["layer"] else [],
                        weights=params["weights"], image_size=size, batch_size=batch, jit=jit,
                        precision=precision, out=str(work / f"{case.name}.h5"), overwrite=True)
    first = extract(cfg.replace(data=str(warm), out=str(work / f"{case.name}_warm.h5")), verbose=False)  # exports
    engine = first.engine
    spec, model, tf_fwd = model_forward(params, batch, "tf", jit, precision)
    fwds = {"tf": tf_fwd}
    if engine != "tf":
        fwds[engine] = model_forward(params, batch, engine, export=exported_graph(first.path))[2]
    batches = [pixels[i:i + batch] for i in range(0, n - n % batch, batch)]
    half = max(1, len(batches) // 2)
    seconds = dict.fromkeys(fwds, 0.0)
    for name, fwd in fwds.items():
        for _ in range(2):
            time_forward(fwd, batches[:1])  # untimed warm-up: tracing, allocator, oneDNN primitive caches
        seconds[name] += time_forward(fwd, batches[:half])
    res = extract(cfg, verbose=False)
    for name, fwd in fwds.items():
        seconds[name] += time_forward(fwd, batches[half:]) if len(batches) > half else 0.0
    rates = {name: rate(len(batches) * batch, sec) for name, sec in seconds.items()}
    model_rate = rates[res.engine]
    t = res.timings
    e2e = rate(res.processed, t.wall_s)
    row = {"model": case.label(sizes), "engine": res.engine, "batch": batch, "images": res.processed,
           "tf_model_only_img_s": rates["tf"], "model_only_img_s": model_rate, "end_to_end_img_s": e2e,
           "ratio": ratio(e2e, model_rate), "vs_tf_model_only": ratio(e2e, rates["tf"]), **prof,
           "to_tensor_ms": 1e3 * time_to_tensor(batches[0]),
           "model_ms": 1e3 / model_rate, "write_ms": 1e3 * t.write_s / max(res.processed, 1),
           "wall_s": t.wall_s, "wait_input_s": t.wait_input_s, "model_s": t.model_s, "write_s": t.write_s,
           "decode_cpu_s": t.decode_cpu_s}
    if peer:
        keras_peer(spec, model, str(warm), size, batch, str(work / "warm.npy"))  # untimed warm-up of predict
        start = time.perf_counter()
        keras_peer(spec, model, str(data), size, batch, str(work / f"{case.name}.npy"))
        row["keras_peer_img_s"] = rate(n, time.perf_counter() - start)
        row["ours_vs_peer"] = ratio(e2e, row["keras_peer_img_s"])
    if jit_probe and not jit:
        _, _, fwd_jit = model_forward(params, batch, "tf", jit=True)
        time_forward(fwd_jit, batches[:1])  # compile
        probe = batches[:1]
        row["model_only_xla_img_s"] = rate(len(probe) * batch, time_forward(fwd_jit, probe))
        row["xla_speedup"] = ratio(row["model_only_xla_img_s"], rates["tf"])
    return row


def section_input_pipeline(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    sec = Section(1, "Input pipeline efficiency (end-to-end ÷ model-only, same batch size, same process)",
                  "end-to-end img/s ÷ model-only img/s of the same engine ≥ 0.9 for every model; report ÷ "
                  "TensorFlow's compiled model-only rate",
                  ["model", "engine", "batch", "images", "tf_model_only_img_s", "model_only_img_s", "end_to_end_img_s",
                   "ratio", "vs_tf_model_only", "keras_peer_img_s", "ours_vs_peer", "decode_img_s_per_core"])
    profile_cols = ["model", "decode_ms", "resize_ms", "to_tensor_ms", "model_ms", "write_ms", "wall_s",
                    "wait_input_s", "model_s", "write_s", "decode_cpu_s"]
    xla_cols = ["model", "tf_model_only_img_s", "model_only_xla_img_s", "xla_speedup", "model_only_img_s"]
    for case in [c for c in CASES if c.name in sizes.cases]:
        log(f"section 1: {case.label(sizes)} on {sizes.throughput_images[case.name]} images")
        sec.rows.append(measure_case(case, sources, sizes, sizes.throughput_images[case.name], sizes.batch_size, work,
                                     jit_probe=sizes.jit_probe))
    ratios = [r["ratio"] for r in sec.rows]
    sec.met = all(r >= 0.9 for r in ratios)
    sec.value = ", ".join(f"{r['model']} ({r['engine']}): {r['ratio']:.2f} "
                          f"(÷ TF model-only {r['vs_tf_model_only']:.2f})" for r in sec.rows)
    sec.extra_tables.append(("Profile: where an image's time goes (ms per image; decode and resize on one core, "
                             "model from the model-only run of the engine used, write and stage seconds from the "
                             "end-to-end run)", profile_cols, sec.rows))
    from benchmarks.resize import resize_table

    sec.extra_tables.append(resize_table(sizes.full_size_images and sources.real, log))  # `python -m benchmarks.resize`
    if sizes.jit_probe:
        sec.extra_tables.append(("TensorFlow with XLA (`--jit`), model-only on 1 batch, beside TensorFlow without it "
                                 "and the engine `auto` chose", xla_cols, sec.rows))
    return sec


PHOTO_SIZE = (4032, 3024)  # a 12-MP phone photo


def stage_photos(source: Path, n: int, dest: Path) -> Path:
    """n real JPEGs upscaled to 4032x3024 and saved at quality 92: what a folder of phone photos costs to decode."""
    import cv2

    if dest.exists() and len(list_images(dest)) == n:
        return dest
    folder = stage_images(source, n, dest)  # copies, rewritten below
    for path in list_images(folder):
        img = cv2.resize(cv2.imread(str(path)), PHOTO_SIZE, interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return folder


@dataclass(frozen=True)
class SteadyCase:
    """A section 2 row group: a model on a kind of image, with its target: ours ÷ the Keras peer."""

    name: str
    case: Case
    images: str  # a key of IMAGE_KINDS
    target_vs_peer: float | None  # None: reported, no target
    pace: float = 1.0  # expected rates ÷ the model-only rate's (decode-bound photos: slower), to size N only


IMAGE_KINDS = {  # what a group's images are -> the label's suffix
    "shipped": " on the shipped JPEGs (default make extract)",  # data/hymenoptera-small, short side 256
    "photos": "",  # the run's photos: full-size (about 500x375) when ../shared has them, else the shipped ones
    "12mp": " on 12-MP photos",
}
# issue 26: ours ≥ 2.0× the peer for Lite0 on web-size JPEGs (both kinds), ≥ 1.5× for VGG19 -> block2_pool @256
STEADY = [SteadyCase("lite0", CASES[0], "shipped", 2.0), SteadyCase("lite0_photos", CASES[0], "photos", 2.0),
          SteadyCase("vgg19_block2_pool", CASES[2], "photos", 1.5),
          SteadyCase("lite0_12mp", CASES[0], "12mp", None, pace=0.4)]
METHOD_NAMES = {"naive": "naive loop", "keras": "keras peer (image_dataset_from_directory + predict)",
                "extract_tf": "ours, --engine tf", "extract_onnx": "ours, --engine onnx",
                "extract": "ours (default engine)"}
EXPLICIT = {"extract_tf": "tf", "extract_onnx": "onnx"}  # the methods that run extract with an explicit engine
PACE = {"naive": 0.1, "keras": 0.4, "extract_tf": 0.5, "extract_onnx": 1.0,
        "extract": 1.0}  # rough img/s ÷ the model-only rate of the engine auto chose: sizes N only
UNIQUE_PHOTOS = 24  # distinct upscaled photos, hard-linked as often as a run needs


def steady_n(method: str, sc: SteadyCase, model_rate: float, sizes: Sizes) -> int:
    """N such that the 2N run does about `sizes.steady_seconds` more work than the N run, whatever the method's
    speed: long enough against start-up noise, short enough for the slow methods."""
    lo, hi = sizes.steady_range
    expected = sizes.steady_seconds * model_rate * PACE[method] * sc.pace
    return int(min(hi, max(lo, expected if expected == expected else lo)))


def cpu_limit(record: dict) -> tuple[float, float]:
    """(CPU ms one image needs in decode + resize + model, the most img/s the cores allow at that cost) of a
    `cpu_time` child's record."""
    ms = record["decode_ms"] + record["resize_ms"] + record["model_cpu_ms"]
    return ms, rate(1e3 * record["cores"], ms)


def steady_group(sc: SteadyCase, sizes: Sizes, sources: Sources, work: Path, log) -> tuple[list[dict], dict]:
    """Every method as a whole process on N and on 2N images: steady img/s = N / (T(2N) - T(N)); and the CPU-time
    limit from the CPU time one image needs, measured in a process of its own. Each process runs
    `sizes.steady_rounds` times, all of a group's processes once per round, and its fastest time counts (the lowest
    CPU time for the limit): a busy spell of the shared machine then slows one round of every method, not one method.
    Returns the rows and the group's row of the CPU-time table."""
    lo = sizes.steady_range[0]
    params = {**sc.case.resolve(sources, sizes, work), "batch": sizes.batch_size}
    folder = SHIPPED_IMAGES if sc.images == "shipped" else sources.images
    source = (stage_photos(folder, UNIQUE_PHOTOS, work / "s2_12mp") if sc.images == "12mp"
              else stage_images(folder, min(len(list_images(folder)), 400), work / f"s2_src_{sc.images}"))
    label = f"{sc.case.label(sizes)}{IMAGE_KINDS[sc.images]}"
    warm = stage_images(source, lo, work / f"s2_{sc.name}_warm", link=True)
    warm_cache = work / "s2_warm.h5"
    # keeps the export, and auto's measured choice beside it, as a first long run would (the later runs reuse both)
    run_child("extract", {**params, "data": str(warm), "out": str(warm_cache), "time_engines": True})
    cpu = [run_child("cpu_time", {**params, "data": str(warm), "cache": str(warm_cache)})]
    ns = {m: steady_n(m, sc, cpu[0]["model_img_s"], sizes) for m in METHOD_NAMES}
    folders = {k: stage_images(source, k, work / f"s2_{sc.name}_{k}", link=True)
               for k in sorted({k for n in ns.values() for k in (n, 2 * n)})}
    recs = {m: [] for m in METHOD_NAMES}
    for round_ in range(sizes.steady_rounds):
        if round_:
            cpu.append(run_child("cpu_time", {**params, "data": str(warm), "cache": str(warm_cache)}))
        for method, n in ns.items():
            log(f"section 2: {label}, {METHOD_NAMES[method]} on {n} and {2 * n} images (whole processes, round "
                f"{round_ + 1} of {sizes.steady_rounds})")
            job = "extract" if method in EXPLICIT or method == "extract" else method
            engine = {"engine": EXPLICIT[method]} if method in EXPLICIT else {}
            out = work / f"s2_{method}.{'h5' if job == 'extract' else 'npy'}"
            for k in (n, 2 * n):
                recs[method].append(run_child(job, {**params, **engine, "data": str(folders[k]), "out": str(out)}))
    best_cpu = min(cpu, key=lambda r: cpu_limit(r)[0])
    cpu_ms, limit = cpu_limit(best_cpu)
    fastest = {m: [min(r[k::2], key=lambda rec: rec["process_s"]) for k in (0, 1)] for m, r in recs.items()}
    steady = {m: rate(ns[m], two["process_s"] - one["process_s"]) for m, (one, two) in fastest.items()}
    faster = max(EXPLICIT, key=lambda m: np.nan_to_num(steady[m], nan=-1.0))  # nan: T(2N) ≤ T(N), pure noise
    rows = [{"model": label, "method": "CPU-time limit (cores ÷ CPU time per image, table below)",
             "engine": best_cpu["engine"], "img_s": limit, "vs_cpu_limit": 1.0}]
    for m, (one, two) in fastest.items():
        rows.append({"model": label, "method": METHOD_NAMES[m], "engine": two.get("engine", ""),
                     "images": f"{ns[m]} / {2 * ns[m]}", "img_s": steady[m],
                     "vs_faster_engine": ratio(steady[m], steady[faster]),
                     "vs_keras_peer": ratio(steady[m], steady["keras"]),
                     "speedup_vs_naive": ratio(steady[m], steady["naive"]), "vs_cpu_limit": ratio(steady[m], limit),
                     "process_s": f"{one['process_s']:.1f} / {two['process_s']:.1f}",
                     "all_process_s": " ".join(f"{r['process_s']:.1f}" for r in recs[m]),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in recs[m][1::2])})
    limit_row = {"model": label, "engine": best_cpu["engine"], "cores": best_cpu["cores"],
                 "decode_ms": best_cpu["decode_ms"], "resize_ms": best_cpu["resize_ms"],
                 "model_cpu_ms": best_cpu["model_cpu_ms"], "cpu_ms_per_image": cpu_ms, "limit_img_s": limit,
                 "ours_img_s": steady["extract"], "ours_vs_limit": ratio(steady["extract"], limit),
                 "faster_engine": EXPLICIT[faster]}
    return rows, limit_row


def section_steady(sizes: Sizes, sources: Sources, work: Path, log, children: dict) -> Section:
    """Ours vs the faster explicit engine, the Keras peer, the naive loop and the CPU-time limit: whole processes,
    steady rates."""
    groups = [sc for sc in STEADY if sc.name in sizes.steady_cases]
    targets = ", ".join(f"{sc.target_vs_peer:g} for {sc.name}" for sc in groups if sc.target_vs_peer)
    sec = Section(2, "Whole processes side by side: ours vs the faster explicit engine, the Keras peer, the naive "
                     "per-image loop and the CPU-time limit",
                  f"ours (default engine): steady rate ÷ the Keras peer's ≥ {targets or 'none (no such case run)'}; "
                  "report ÷ the faster explicit engine, ÷ the naive loop, ÷ the CPU-time limit; peak RSS flat as N "
                  "grows 4×",
                  ["model", "method", "engine", "images", "img_s", "vs_faster_engine", "vs_keras_peer",
                   "speedup_vs_naive", "vs_cpu_limit", "process_s", "all_process_s", "peak_rss_mb"])
    met, values, limits = True, [], []
    for sc in groups:
        rows, limit_row = steady_group(sc, sizes, sources, work, log)
        sec.rows += rows
        limits.append(limit_row)
        ours = next(r for r in rows if r["method"] == METHOD_NAMES["extract"])
        met &= sc.target_vs_peer is None or ours["vs_keras_peer"] >= sc.target_vs_peer
        target = f" (≥ {sc.target_vs_peer:g})" if sc.target_vs_peer else ""
        values.append(f"{sc.name}: {ours['vs_keras_peer']:.2f}× peer{target}, {ours['vs_faster_engine']:.2f}× the "
                      f"faster engine ({limit_row['faster_engine']}), {ours['speedup_vs_naive']:.2f}× naive, "
                      f"{ours['vs_cpu_limit']:.2f} of the CPU-time limit")
    mem_rows = []
    vgg = {**CASES[2].resolve(sources), "size": sizes.memory_size, "batch": sizes.memory_batch}
    for n in (sizes.memory_images, 4 * sizes.memory_images):
        log(f"section 2: VGG19 block2_pool @{sizes.memory_size}, peak RSS of naive / keras / ours on {n} images")
        data = stage_images(sources.images, n, work / f"img_mem{n}")
        for m in ("naive", "keras", "extract"):
            key = (m, n, "float32")
            if key not in children:
                children[key] = run_child(m, {**vgg, "data": str(data), "dtype": "float32",
                                              "out": str(work / f"s2_{m}_{n}.{'h5' if m == 'extract' else 'npy'}")})
            mem_rows.append({"model": f"vgg19_block2_pool @{sizes.memory_size}", "method": METHOD_NAMES[m],
                             "images": n, "peak_rss_mb": children[key]["peak_rss_mb"],
                             "growth_mb": children[key]["growth_mb"]})
    by = {(r["method"], r["images"]): r["peak_rss_mb"] for r in mem_rows}
    n1, n4 = sizes.memory_images, 4 * sizes.memory_images
    rss = {m: ratio(by[(METHOD_NAMES[m], n4)], by[(METHOD_NAMES[m], n1)]) for m in ("naive", "keras", "extract")}
    sec.extra_tables.append((f"Peak RSS at N={n1} and 4N={n4} images (one process each)",
                             ["model", "method", "images", "peak_rss_mb", "growth_mb"], mem_rows))
    sec.extra_tables.append(("CPU-time limit: the CPU milliseconds one image needs (decode and resize on one thread, "
                             "the model of the engine auto chose as process CPU time), and the most images/s the "
                             "cores allow at that cost, beside ours",
                             list(limits[0]) if limits else [], limits))
    sec.met = met and rss["extract"] <= 1.1
    sec.value = "; ".join(values) + f"; peak RSS 4N/N: naive {rss['naive']:.2f}, ours {rss['extract']:.2f}"
    sec.notes.append("Steady rate = N / (T(2N) − T(N)), T the wall time of a whole process (imports, model load, "
                     "decoding, model, writing), so start-up is excluded and everything else counted. N differs by "
                     f"method: each 2N run does about {sizes.steady_seconds:g} s more work than its N run. Every "
                     f"process ran {sizes.steady_rounds} times, in rounds that run each of a group's processes once "
                     "(`all_process_s`: N, 2N, N, 2N, ...); T is the fastest of them (`process_s`), so a busy spell "
                     "of the shared machine slows one round of every method instead of one method. The images are "
                     "real JPEGs (hard links of the same files where N exceeds the set). The ONNX export and auto's "
                     "timing of both engines are made once before, by a warm-up run (both are kept beside the "
                     "caches, as after any first run).")
    sec.notes.append("The CPU-time limit is cores ÷ the CPU time one image needs: file read + JPEG decode and resize "
                     "+ crop timed on one thread, plus the model's forward pass (the engine auto chose, on batches "
                     "decoded beforehand) as the process's CPU time per image, ONNX Runtime's spin-waiting threads "
                     "included. No pipeline built from these parts runs faster on this machine; what `vs_cpu_limit` "
                     "misses is time the cores idle or spend on anything else (threads waiting, HDF5 writes, "
                     "Python).")
    return sec


def section_gpu(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    import tensorflow as tf

    sec = Section(7, "GPU: table 1 with mixed precision and XLA on/off",
                  "report only; every row ÷ TensorFlow's float32 model-only rate of the same model, measured in "
                  "this run",
                  ["model", "engine", "precision", "xla", "batch", "model_only_img_s", "end_to_end_img_s", "ratio",
                   "vs_tf_float32_model_only", "decode_img_s_per_core"])
    if not tf.config.list_physical_devices("GPU"):
        sec.notes.append("No GPU is visible to TensorFlow on this machine, so this section was not run. On a GPU node "
                         "run `make bench SECTIONS=7` (or `make bench-gpu` for the 5-minute version): it measures "
                         "table 1 for Lite0, ResNet50 and VGG19 block2_pool with precision float32/mixed × XLA "
                         "off/on, "
                         "each against the float32 model-only rate measured in the same run.")
        return sec
    for case in CASES:
        reference = None
        for precision in ("float32", "mixed"):
            for jit in (False, True):
                log(f"section 7: {case.label(sizes)} precision={precision} xla={jit}")
                row = measure_case(case, sources, sizes, max(sizes.throughput_images[case.name], 8 * sizes.batch_size),
                                   sizes.batch_size, work, jit=jit, precision=precision, peer=False)
                reference = reference or row["tf_model_only_img_s"]  # float32, no XLA: the first configuration
                sec.rows.append({**row, "precision": precision, "xla": jit,
                                 "vs_tf_float32_model_only": ratio(row["end_to_end_img_s"], reference)})
    best = max((r for r in sec.rows if r["model"].startswith("resnet50")), key=lambda r: r["end_to_end_img_s"])
    sec.value = (f"best ResNet50 end-to-end {best['end_to_end_img_s']:.0f} img/s = "
                 f"{best['vs_tf_float32_model_only']:.2f}× TensorFlow's float32 model-only rate in this run "
                 f"({best['precision']}, XLA {'on' if best['xla'] else 'off'})")
    sec.notes.append("End-to-end on a GPU is bounded by decoding on the host CPU cores: compare end_to_end_img_s with "
                     "decode_img_s_per_core × cores.")
    return sec
