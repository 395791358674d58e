"""Stage one: every image once through the frozen, truncated backbone, streamed into an HDF5 cache.

Decoding runs in a thread pool ahead of the model, HDF5 writes in a thread behind it; the model runs as one compiled
function on fixed-shape batches in which every image's slot is its index in the whole set modulo the batch size, so each
image is computed identically whether the run is interrupted and resumed, sharded, or not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.backbones import BackboneSpec, get_backbone, sha256_file
from features.catalog import Catalog, discover
from features.augment import get_policy, view_loader
from features.errors import UsageError
from features.images import RESIZE_POLICIES, decode_rgb, decode_stream
from features.model import POOLS, build_base, cut, pool_features, weights_identity
from features.store import (COMPRESSIONS, STORAGE_DTYPES, CacheWriter, Progress, identity_diff, read_attrs)
from pipeline.config import ExtractConfig, default_out, shard_out

SHARD_ENV = [("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("JOB_COMPLETION_INDEX", "JOB_COMPLETION_COUNT")]


@dataclass
class Timings:
    decode_cpu_s: float = 0.0  # summed over decoder threads
    wait_input_s: float = 0.0  # time the model loop waited for decoded images
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class ExtractResult:
    path: Path
    status: str  # written | resumed | up-to-date
    images: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    processed: int = 0  # images pushed through the model in this run


def parse_shard(value: str | None, env: dict | None = None) -> tuple[int, int] | None:
    """'I/N' from the flag, else from a job array's environment, else None (the whole set)."""
    env = os.environ if env is None else env
    if value is None:
        for idx, count in SHARD_ENV:
            if env.get(idx) is not None and env.get(count):
                value = f"{env[idx]}/{env[count]}"
                break
        else:
            return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise UsageError(f"shard '{value}' is not valid. Expected 'I/N' with 0 <= I < N, e.g. 0/4.") from None
    if not 0 <= index < count:
        raise UsageError(f"shard '{value}' is not valid. Expected 'I/N' with 0 <= I < N, e.g. 0/4.")
    return index, count


def validate(cfg: ExtractConfig) -> None:
    """Check every closed-set option before any model is built or image read."""
    for name, value, valid in [("pool", cfg.pool, POOLS), ("dtype", cfg.dtype, STORAGE_DTYPES),
                               ("resize", cfg.resize, tuple(RESIZE_POLICIES)),
                               ("compression", cfg.compression, COMPRESSIONS),
                               ("precision", cfg.precision, ("float32", "mixed"))]:
        if value not in valid:
            raise UsageError(f"{name} '{value}' is not valid. Expected one of: {', '.join(valid)}.")
    if cfg.batch_size < 1:
        raise UsageError(f"batch-size {cfg.batch_size} is not valid. Expected a positive integer.")
    if cfg.augment < 0:
        raise UsageError(f"augment {cfg.augment} is not valid. Expected the number of augmented views per training "
                         "image (0 = none).")
    if cfg.augment:
        get_policy(cfg.augment_policy)
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UsageError(f"image-size {cfg.image_size} is not valid. Expected a side length in pixels (>= 8).")


def plan_attrs(cfg: ExtractConfig, spec: BackboneSpec, catalog: Catalog, size: int, layers: list[str],
               shard: tuple[int, int] | None, fingerprint: str) -> dict:
    """`fingerprint` is the whole input set's, also in a shard, so that `merge` can tell shards of one extraction."""
    import h5py
    import keras
    import tensorflow as tf

    from pipeline import __version__

    return {
        "backbone": cfg.backbone,
        "backbone_file_sha256": sha256_file(spec.file) if spec.file else "",
        "weights": weights_identity(spec, cfg.weights),
        "weights_source": cfg.weights,
        "image_size": size,
        "resize": cfg.resize,
        "interpolation": "area when shrinking, linear when enlarging (OpenCV)",
        "preprocessing": spec.preprocess.description,
        "color": "RGB",
        "pool": cfg.pool,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "layers": layers,
        "augment": cfg.augment,
        "augment_policy": cfg.augment_policy if cfg.augment else "",
        "augment_seed": cfg.seed if cfg.augment else 0,
        "data_root": str(catalog.root.resolve()),
        "layout": catalog.layout,
        "labels_csv": cfg.labels or "",
        "source_fingerprint": fingerprint,
        "shard": f"{shard[0]}/{shard[1]}" if shard else "",
        "num_candidates": len(catalog),
        "config_json": json.dumps(dataclasses.asdict(cfg)),
        "tool_version": __version__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "h5py_version": h5py.__version__,
    }


def make_forward(model, spec: BackboneSpec, cfg: ExtractConfig, size: int):
    """The compiled per-batch function: uint8 pixels -> preprocess -> model -> pool -> storage dtype."""
    import tensorflow as tf

    @tf.function(jit_compile=cfg.jit, autograph=False,
                 input_signature=[tf.TensorSpec((cfg.batch_size, size, size, 3), tf.uint8)])
    def forward(pixels):
        outs = model(spec.preprocess.fn(tf.cast(pixels, tf.float32)), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [tf.cast(pool_features(o, cfg.pool), cfg.dtype) for o in outs]

    return forward


def extract(cfg: ExtractConfig, verbose: bool = True) -> ExtractResult:
    """Write (or resume, or confirm) the cache that `cfg` describes and return where it is."""
    validate(cfg)
    shard = parse_shard(cfg.shard)
    full = discover(cfg.data, cfg.labels, cfg.path_column, cfg.label_column).with_views(cfg.augment)
    catalog = full.shard(*shard) if shard else full
    spec = get_backbone(cfg.backbone, cfg.preprocess)
    size = cfg.image_size or spec.input_size
    base = None  # built only when needed: a complete, matching cache is confirmed without loading any model
    layers = cfg.layer or ([spec.default_layer] if spec.default_layer else [])
    if not layers:
        base = build_base(spec, cfg.weights, size, cfg.precision)
        layers = [base.layers[-1].name]
    out = shard_out(Path(cfg.out), shard) if cfg.out else default_out(cfg, layers, shard)
    attrs = plan_attrs(cfg, spec, catalog, size, layers, shard, full.fingerprint())

    progress = _existing(out, attrs, cfg.overwrite)
    if progress == "complete":
        if verbose:
            print(f"up to date: {out} is complete for this configuration and these {len(catalog)} files; nothing to do "
                  "(--overwrite rebuilds it).")
        return ExtractResult(out, "up-to-date")
    if cfg.precision == "mixed" and verbose and not _has_gpu():
        print("warning: --precision mixed without a GPU computes float16 in software (several times slower on CPU).")
    model = cut(base or build_base(spec, cfg.weights, size, cfg.precision), layers)
    forward = make_forward(model, spec, cfg, size)
    shapes = {n: tuple(o.shape[1:]) for n, o in zip(layers, forward(np.zeros((cfg.batch_size, size, size, 3), "uint8")))}
    if progress is None:
        writer, status = CacheWriter.create(out, attrs, shapes, catalog.paths, catalog.label_names), "written"
        progress = Progress(skipped=[list(item) for item in catalog.ignored])
    else:
        writer, status = CacheWriter.reopen(out), "resumed"
    try:
        result = _run(cfg, catalog, forward, writer, progress, size, verbose)
    finally:
        writer.close()
    if result.images == 0:
        out.unlink(missing_ok=True)
        raise UsageError(f"none of the {len(catalog)} files under '{cfg.data}' could be used: "
                         + "; ".join(f"{p}: {r}" for p, r in result.skipped[:5]))
    result.status, result.layer_shapes, result.path = status, shapes, out
    return result


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _existing(out: Path, attrs: dict, overwrite: bool) -> Progress | str | None:
    """'complete' (reuse), a Progress to resume from, or None (start a new file)."""
    if not out.exists() or overwrite:
        return None
    found = read_attrs(out)
    if found is None:
        print(f"warning: {out} cannot be opened (interrupted while it was being created); starting it again.")
        return None
    diff = identity_diff(found, attrs)
    if diff:
        raise UsageError(f"{out} exists with a different configuration ({'; '.join(diff[:4])}). "
                         "Pass --overwrite to replace it, or choose another --out.")
    if found.get("complete"):
        return "complete"
    progress = Progress.load(out)
    if progress is None or found.get("batch_size") != attrs["batch_size"]:
        print(f"warning: {out} is incomplete and cannot be resumed (no progress record, or another batch size); "
              "starting it again.")
        return None
    return progress


def _run(cfg: ExtractConfig, catalog: Catalog, forward, writer: CacheWriter, progress: Progress, size: int,
         verbose: bool) -> ExtractResult:
    """Decode (thread pool) -> model (this thread) -> write (one writer thread), each stage overlapping the next."""
    t = Timings()
    start = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    views = {v: view_loader(size, cfg.resize, cfg.augment_policy, cfg.seed, v) for v in set(catalog.views)}

    def load(i: int) -> np.ndarray:
        return views[catalog.views[i]](catalog.paths[i], decode_rgb(catalog.root / catalog.paths[i]))

    todo = ((i, i) for i in range(progress.files_done, len(catalog)))
    stream = decode_stream(todo, load, workers, lookahead=3 * cfg.batch_size)
    batch_rows: list[int] = []
    batch = np.zeros((cfg.batch_size, size, size, 3), "uint8")
    pending_skips: list[list[str]] = []
    processed = 0
    bar = tqdm(total=len(catalog), initial=progress.files_done, unit="img", desc="extract", disable=not verbose,
               dynamic_ncols=True)

    def slot(i: int) -> int:
        """Candidate i's place in its batch follows its index in the whole set, so a shard puts every image where a
        one-process run does: outputs depend on the place (on CPU the last one differs by ~1e-6), merges stay exact."""
        return (catalog.offset + i) % cfg.batch_size

    def commit(row: int, feats: list[np.ndarray], rows: list[int], done: Progress) -> None:
        t0 = time.perf_counter()
        if rows:
            writer.write(row, feats, [catalog.paths[i] for i in rows], [catalog.labels[i] for i in rows],
                         [catalog.splits[i] for i in rows], [catalog.views[i] for i in rows])
        done.save(writer.path)  # only after the rows it counts are flushed to disk
        t.write_s += time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_pool, bar:
        in_flight: Future | None = None

        def flush(files_done: int) -> None:
            nonlocal processed, in_flight
            n = len(batch_rows)
            feats = []
            if n:
                t0 = time.perf_counter()
                feats = [o.numpy()[[slot(i) for i in batch_rows]] for o in forward(batch)]
                batch[:] = 0  # unused slots are zeros whether or not the run was resumed
                t.model_s += time.perf_counter() - t0
            if in_flight is not None:
                in_flight.result()  # one batch in flight: memory stays bounded, errors surface here
            row = progress.rows_written
            progress.rows_written += n
            progress.files_done = files_done
            progress.skipped.extend(pending_skips)
            snapshot = Progress(progress.rows_written, files_done, list(progress.skipped))
            in_flight = write_pool.submit(commit, row, feats, list(batch_rows), snapshot)
            processed += n
            batch_rows.clear()
            pending_skips.clear()

        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            t.wait_input_s += time.perf_counter() - t0
            if item is None:
                break
            t.decode_cpu_s += item.seconds
            if item.pixels is None:
                if catalog.views[item.index] == 0:  # a file's augmented views fail with it: record it once
                    pending_skips.append([catalog.paths[item.index], item.reason])
            else:
                batch[slot(item.index)] = item.pixels
                batch_rows.append(item.index)
            if slot(item.index) == cfg.batch_size - 1:
                flush(item.index + 1)
            bar.update(1)
            bar.set_postfix(skipped=len(progress.skipped) + len(pending_skips), refresh=False)
        flush(len(catalog))
        in_flight.result()
    writer.finalize(progress)
    t.wall_s = time.perf_counter() - start
    return ExtractResult(writer.path, "", progress.rows_written, progress.skipped, timings=t, processed=processed)
