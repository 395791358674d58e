"""Sections 3 and 4: memory of extraction at N and 4N images, and what the HDF5 cache costs on disk and to read.

Section 3 runs each extraction in a fresh process (peak RSS from getrusage, growth from a 10 ms RSS sampler).
Section 4 stores REAL activations (pretrained Lite0 on real images, four layers from early to pooled) because how
well LZF compresses depends on their values (ReLU zeros); the feature rows are tiled to `storage_rows` rows.
"""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import Section, Sizes, Sources, list_images, rate, ratio, run_child, stage_images
from benchmarks.throughput import CASES

STORAGE_LAYERS = ["block2b_add", "block4c_add", "top_activation", "avg_pool"]  # Lite0: early -> pooled


def section_memory(sizes: Sizes, sources: Sources, work: Path, log, children: dict) -> Section:
    n1, n4 = sizes.memory_images, 4 * sizes.memory_images
    sec = Section(3, f"Memory: peak RSS of extraction at N={n1} and 4N={n4} images "
                     f"(VGG19 block2_pool @{sizes.memory_size}, batch {sizes.memory_batch})",
                  "peak RSS at 4N ÷ peak RSS at N ≤ 1.1 (flat) for float16 and float32",
                  ["dtype", "images", "peak_rss_mb", "growth_mb", "file_mb", "img_s", "rss_ratio_4n_n"])
    vgg = {**CASES[2].resolve(sources), "size": sizes.memory_size, "batch": sizes.memory_batch}
    for dtype in sizes.memory_dtypes:
        recs = {}
        for n in (n1, n4):
            key = ("extract", n, dtype)
            if key not in children:
                log(f"section 3: extract {dtype} on {n} images (fresh process)")
                data = stage_images(sources.images, n, work / f"img_mem{n}")
                children[key] = run_child("extract", {**vgg, "data": str(data), "dtype": dtype,
                                                      "out": str(work / f"s3_{dtype}_{n}.h5")})
            recs[n] = children[key]
        r = ratio(recs[n4]["peak_rss_mb"], recs[n1]["peak_rss_mb"])
        for n, rec in recs.items():
            sec.rows.append({"dtype": dtype, "images": n, "peak_rss_mb": rec["peak_rss_mb"],
                             "growth_mb": rec["growth_mb"], "file_mb": rec["file_mb"],
                             "img_s": rate(rec["images"], rec["seconds"]), "rss_ratio_4n_n": r if n == n4 else None})
    ratios = [row["rss_ratio_4n_n"] for row in sec.rows if row["rss_ratio_4n_n"] is not None]
    sec.met = all(r <= 1.1 for r in ratios)
    sec.value = ", ".join(f"{row['dtype']}: {row['rss_ratio_4n_n']:.3f}" for row in sec.rows
                          if row["rss_ratio_4n_n"] is not None)
    return sec


def _real_features(sources: Sources, n: int, work: Path) -> dict[str, np.ndarray]:
    """Lite0 activations of n real images at STORAGE_LAYERS, float32, via the tf engine's compiled forward."""
    from benchmarks.throughput import decode_profile
    from features.backbones import get_backbone
    from features.engines import EngineOptions, Graph, tf_forward
    from features.model import build_base, cut

    spec = get_backbone(str(sources.lite0))
    model = cut(build_base(spec, "imagenet", 224), STORAGE_LAYERS)
    batch = min(n, 32)
    forward = tf_forward(Graph(lambda: model, spec.preprocess.fn, batch, 224), EngineOptions())
    pixels, _ = decode_profile(list_images(stage_images(sources.images, n, work / "img_storage")), 224)
    outs: dict[str, list] = {name: [] for name in STORAGE_LAYERS}
    for i in range(0, n - n % batch, batch):
        for name, o in zip(STORAGE_LAYERS, forward(pixels[i:i + batch])):
            outs[name].append(o)
    return {name: np.concatenate(v) for name, v in outs.items()}


def _write(path: Path, name: str, data: np.ndarray, chunk_rows: int | None, compression: str, batch: int = 32) -> float:
    """Write `data` batch by batch as CacheWriter does (early allocation when uncompressed, fletcher32 checksums on
    chunks); seconds taken."""
    from features.store import _dcpl_early

    chunk_rows = min(chunk_rows, len(data)) if chunk_rows else None
    start = time.perf_counter()
    with h5py.File(path, "w", rdcc_nbytes=64 << 20) as f:
        kw = {"compression": "lzf"} if compression == "lzf" else ({"dcpl": _dcpl_early()} if chunk_rows else {})
        ds = f.create_dataset(name, shape=data.shape, dtype=data.dtype,
                              chunks=(chunk_rows, *data.shape[1:]) if chunk_rows else None,
                              fletcher32=bool(chunk_rows), **kw)
        for i in range(0, len(data), batch):
            ds[i:i + batch] = data[i:i + batch]
            f.flush()
    return time.perf_counter() - start


def _read(path: Path, name: str, rng: np.random.Generator, batch: int = 256) -> tuple[float, float]:
    """Seconds to read the whole dataset (a stage-two load) and to read it as shuffled batches of rows (SGD)."""
    with h5py.File(path, "r", rdcc_nbytes=64 << 20) as f:
        ds = f[name]
        start = time.perf_counter()
        ds[...]
        t_full = time.perf_counter() - start
        order = rng.permutation(len(ds))
        start = time.perf_counter()
        for i in range(0, len(order), batch):
            ds[np.sort(order[i:i + batch])]
        t_random = time.perf_counter() - start
    return t_full, t_random


def section_storage(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    from features.store import rows_per_chunk

    sec = Section(4, f"Storage: bytes per image per layer, write and read MB/s ({sizes.storage_rows} rows of real "
                     f"Lite0 activations)", "report; the chunk shape is justified by the numbers",
                  ["layer", "row_shape", "storage", "bytes_per_image", "vs_float32", "write_mb_s", "read_mb_s",
                   "shuffled_read_mb_s"])
    log(f"section 4: Lite0 activations of {sizes.storage_images} real images at {len(STORAGE_LAYERS)} layers")
    feats = _real_features(sources, sizes.storage_images, work)
    rng = np.random.default_rng(0)
    reps = -(-sizes.storage_rows // len(next(iter(feats.values()))))
    for layer, values in feats.items():
        data32 = np.concatenate([values] * reps)[:sizes.storage_rows]
        base_bytes = None
        for label, dtype, comp in [("float32", "float32", "none"), ("float16", "float16", "none"),
                                   ("float32+lzf", "float32", "lzf"), ("float16+lzf", "float16", "lzf")]:
            data = data32.astype(dtype)
            path = work / f"s4_{layer}_{label}.h5"
            t_write = _write(path, "x", data, rows_per_chunk(data.shape[1:], dtype), comp)
            with h5py.File(path) as f:
                stored = f["x"].id.get_storage_size()
            t_full, t_rand = _read(path, "x", rng)
            per_image = stored / len(data)
            base_bytes = base_bytes or per_image
            mb = data.nbytes / 2**20  # MB/s of the feature values as stage two sees them (uncompressed)
            sec.rows.append({"layer": layer, "row_shape": "×".join(map(str, data.shape[1:])), "storage": label,
                             "bytes_per_image": int(per_image), "vs_float32": per_image / base_bytes,
                             "write_mb_s": mb / t_write, "read_mb_s": mb / t_full, "shuffled_read_mb_s": mb / t_rand})
    # chunk shape: the largest layer, float16 (the recommended storage for spatial maps)
    layer = max(feats, key=lambda k: feats[k][0].size)
    data = np.concatenate([feats[layer]] * reps)[:sizes.storage_rows].astype("float16")
    default = rows_per_chunk(data.shape[1:], "float16")
    chunk_rows = []
    for rows, why in [(None, "contiguous (no chunks)"), (1, "1 row"), (default, "default: ≤ 1 MiB of whole rows"),
                      (min(len(data), 16 * default), "16× default")]:
        path = work / f"s4_chunk_{rows}.h5"
        t_write = _write(path, "x", data, rows, "none")
        t_full, t_rand = _read(path, "x", rng)
        t_write_lzf = _write(work / "s4_chunk_lzf.h5", "x", data, rows, "lzf") if rows else float("nan")
        t_full_lzf, t_rand_lzf = _read(work / "s4_chunk_lzf.h5", "x", rng) if rows else (float("nan"),) * 2
        mb = data.nbytes / 2**20
        chunk_kib = (rows or len(data)) * data[0].nbytes / 1024
        chunk_rows.append({"chunk": why, "rows_per_chunk": rows or len(data), "chunk_kib": chunk_kib,
                           "write_mb_s": mb / t_write, "read_mb_s": mb / t_full, "shuffled_read_mb_s": mb / t_rand,
                           "lzf_write_mb_s": mb / t_write_lzf, "lzf_shuffled_read_mb_s": mb / t_rand_lzf})
    sec.extra_tables.append((f"Chunk shape for `{layer}` ({'×'.join(map(str, data.shape[1:]))}, float16, "
                             f"{data[0].nbytes / 1024:.0f} KiB per row; shuffled reads take batches of 256 random "
                             "rows, as the streaming SGD head does)",
                             ["chunk", "rows_per_chunk", "chunk_kib", "write_mb_s", "read_mb_s", "shuffled_read_mb_s",
                              "lzf_write_mb_s", "lzf_shuffled_read_mb_s"], chunk_rows))
    sec.met = None
    f16 = [r["vs_float32"] for r in sec.rows if r["storage"] == "float16"]
    lzf = [r["vs_float32"] for r in sec.rows if r["storage"] == "float16+lzf"]
    sec.value = (f"float16 = {np.mean(f16):.2f}× float32; float16+LZF = {min(lzf):.2f}–{max(lzf):.2f}× float32 "
                 f"depending on the layer")
    return sec
