"""`python -m pipeline extract`: flags mirror ExtractConfig's fields; prints a one-screen summary."""
from __future__ import annotations

import argparse
import dataclasses
import signal

from pipeline.config import ExtractConfig
from pipeline.devices import extract_on_devices
from pipeline.extraction import ExtractResult, shard_range
from pipeline.summary import print_extract_summary


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Extraction flags; `slurm` reuses them, so a job script runs exactly what the user typed."""
    d = ExtractConfig()
    p.add_argument("--backbone", default=d.backbone, help="registry name (see 'backbones') or a .keras file")
    p.add_argument("--data", default=d.data, help="folder of images (class or split sub-folders, or flat + --labels), or WebDataset tar shards: a folder of .tar files, a glob or a brace pattern")
    p.add_argument("--layer", type=_csv_list, default=d.layer, help="layer name(s), comma-separated; one forward pass")
    p.add_argument("--weights", default=d.weights, help="imagenet | none | path to a weights file")
    p.add_argument("--pool", default=d.pool, help="none | avg | max (global spatial pooling before storing)")
    p.add_argument("--dtype", default=d.dtype, help="float16 | float32 storage")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input side; default: the backbone's native size")
    p.add_argument("--resize", default=d.resize, help="crop (shorter side, centre crop; default) | stretch (as Keras)")
    p.add_argument("--preprocess", default=d.preprocess, help="for .keras files: caffe | tf | torch | none | mean=M,std=S")
    p.add_argument("--out", default=d.out, help="output .h5; default a readable name under cache/")
    p.add_argument("--labels", default=d.labels, help="CSV mapping image path or id to label")
    p.add_argument("--path-column", default=d.path_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--compression", default=d.compression, help="none | lzf")
    p.add_argument("--shard", default=d.shard,
                   help="I/N: process block I of N (default: from SLURM_ARRAY_TASK_ID/COUNT); A-B/N: blocks A..B of N, "
                        "one after the other")
    p.add_argument("--manifest", default=d.manifest,
                   help="read the candidates from this listing of DATA (written by `slurm` at submit time) instead of "
                        "listing DATA: a shard reads and stats only its own files")
    p.add_argument("--precision", default=d.precision,
                   help="float32 | mixed (float16 compute, for GPUs) | int8 (ONNX Runtime static quantization, "
                        "calibrated on DATA: reduced-precision features; see docs/engines.md)")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images,
                   help="int8: clean training images of DATA, evenly spaced over the sorted list, the quantized graph "
                        "is calibrated on (part of the cache's identity)")
    p.add_argument("--calibration", default=d.calibration,
                   help="int8: reuse the graph calibrated as this `calibration` attribute (sha256:<hex>:K=<k>) of an "
                        "earlier cache, kept in engines/ (what predict does); default: calibrate on DATA")
    p.add_argument("--jit", action="store_true", help="compile the forward pass with XLA (tf engine)")
    p.add_argument("--engine", default=d.engine,
                   help="auto (on a CPU the faster engine, timed once per graph and machine; TensorFlow on a GPU) | "
                        "tf | onnx; see docs/engines.md")
    p.add_argument("--devices", default=d.devices,
                   help="all | GPU indices, e.g. 0,1: one worker process per GPU over shards, then a merge")
    p.add_argument("--workers", type=int, default=d.workers, help="decoder threads (0: one per core)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="skip images of more pixels (width x height, read from the header before decoding): a small "
                        "file can decode to gigabytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache of another configuration")
    p.add_argument("--augment", type=int, default=d.augment,
                   help="augmented views per training image, stored besides the clean view (evaluation splits: none)")
    p.add_argument("--augment-policy", default=d.augment_policy, help="standard | light | flip (see docs/augment.md)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the augmented views")


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractConfig)})


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a scheduler's pre-emption stops the run as cleanly as Ctrl-C


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cfg = config_from_args(args)
    for shard in shard_range(cfg.shard):  # a job array task may run several shards (pipeline/slurm.py)
        result: ExtractResult = extract_on_devices(cfg.replace(shard=shard))
        if result.status != "up-to-date":
            print_extract_summary(result)
    return 0
