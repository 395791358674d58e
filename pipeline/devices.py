"""`--devices all|0,1,...`: on a node with several GPUs, one extraction worker process per GPU, each over its own
shard, then a merge into the cache a one-process run would have written.

Why worker processes and not a `tf.distribute.MirroredStrategy` (reasoning, NOT measured: no multi-GPU machine was
available when this was written; see docs/batch.md): extraction is inference only, so GPUs never need to exchange
anything. A strategy still splits every global batch across replicas and joins them in one step, so every GPU waits
for the slowest one and for one host-side input pipeline (decode + resize), which is usually the bottleneck.
Independent processes each get their own decoder threads and their own GIL, never synchronise, reuse the sharding,
resume and merge that SLURM arrays already rely on, and keep the batches identical to a one-process run (a strategy
would change per-replica batch shapes), so the merged features are the same bit for bit on a given GPU model.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from features.errors import UsageError
from features.model import gpu_count
from pipeline.config import ExtractConfig, shard_out
from features.extract import Timings
from pipeline.extraction import ExtractResult, extract, parse_shard, validate
from pipeline.merge import merge, merged_out


def visible_gpus() -> list[str]:
    """CUDA ids of the GPUs TensorFlow sees, in its order (a scheduler may already have narrowed CUDA_VISIBLE_DEVICES)."""
    count = gpu_count()
    narrowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in narrowed.split(",") if d.strip()] if narrowed else [str(i) for i in range(count)]
    return ids[:count]


def select_gpus(devices: str, gpus: list[str]) -> list[str]:
    """The CUDA ids named by `devices` ('all' or indices into `gpus`, TensorFlow's order)."""
    if devices == "all":
        return gpus
    try:
        picked = [int(v) for v in devices.split(",")]
    except ValueError:
        picked = []
    valid = f"0..{len(gpus) - 1}" if gpus else "none: TensorFlow sees no GPU (CPU-only build or no driver)"
    if not picked or len(set(picked)) != len(picked) or not all(0 <= i < len(gpus) for i in picked):
        raise UsageError(f"devices '{devices}' is not valid. Expected 'all' or distinct comma-separated GPU indices "
                         f"(visible: {valid}).")
    return [gpus[i] for i in picked]


def extract_on_devices(cfg: ExtractConfig, verbose: bool = True, gpus: list[str] | None = None) -> ExtractResult:
    """`extract(cfg)` with one worker per selected GPU. `gpus` overrides detection (tests drive several CPU workers).
    Options are checked here first, so a bad one is one line from the parent, not one per worker log."""
    validate(cfg)
    chosen = select_gpus(cfg.devices, visible_gpus() if gpus is None else gpus)
    if len(chosen) > 1 and parse_shard(cfg.shard) is None:
        return _workers(cfg, chosen, verbose)
    if not chosen:
        print("devices: no GPU visible; extracting with one worker on the CPU.")
    else:
        note = "" if len(chosen) == 1 else " (a shard runs as one worker; use more shards for more GPUs)"
        print(f"devices: one worker on GPU {chosen[0]}{note}.")
        _pin(chosen[0], gpus)
    return extract(cfg, verbose)


def _pin(gpu: str, given: list[str] | None) -> None:
    """Make `gpu` TensorFlow's only GPU in this process (nothing to do when the list was given, i.e. in tests)."""
    if given is not None:
        return
    import tensorflow as tf

    physical = tf.config.list_physical_devices("GPU")
    tf.config.set_visible_devices([physical[visible_gpus().index(gpu)]], "GPU")


def _workers(cfg: ExtractConfig, gpus: list[str], verbose: bool) -> ExtractResult:
    """Shard i of len(gpus) on GPU gpus[i], each in its own process logging beside its shard; then merge."""
    start = time.perf_counter()
    out, count = merged_out(cfg), len(gpus)
    print(f"devices: {count} workers, one per GPU ({', '.join(gpus)}), each over one shard; then a merge into {out}.")
    procs = []
    try:
        for i, gpu in enumerate(gpus):
            shard = shard_out(out, (i, count))
            log = shard.with_name(shard.name + ".log")
            shard.parent.mkdir(parents=True, exist_ok=True)
            flags = cfg.replace(shard=f"{i}/{count}", out=str(out), devices="all").flags()
            with log.open("ab") as sink:
                procs.append((i, gpu, log, subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "extract", *flags], stdout=sink, stderr=subprocess.STDOUT,
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})))
            if verbose:
                print(f"  worker {i}: GPU {gpu}, shard {i}/{count} -> {shard.name} (log: {log})")
        exits = [(i, gpu, log, proc.wait()) for i, gpu, log, proc in procs]
    finally:
        for *_, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    failed = [e for e in exits if e[3] != 0]
    if failed:
        raise UsageError("; ".join(f"worker {i} (GPU {gpu}) exited {rc}, last lines of {log}: "
                                   f"{' | '.join(log.read_text(errors='replace').strip().splitlines()[-3:])}"
                                   for i, gpu, log, rc in failed)
                         + ". Rerun the same command: finished shards are kept and the others resume.")
    merged = merge(out, overwrite=cfg.overwrite)
    timings = Timings(wall_s=time.perf_counter() - start)
    return ExtractResult(merged.path, merged.status, merged.images, merged.skipped, merged.layer_shapes, timings,
                         processed=merged.images)
