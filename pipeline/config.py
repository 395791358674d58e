"""Typed, flat configuration of the extraction stage.

One dataclass of defaults; the CLI, the Makefile and batch jobs only override fields. The resolved config is
written into every cache it produces, so the cache says how it was made.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from classifiers import saved
from features.errors import UsageError
from features.images import MAX_PIXELS
from features.schema import backbone_label
from features.tars import is_pattern, pattern_root
from features.store import cache_dir


@dataclass
class ExtractConfig:
    """Everything `extract` needs. Field names are the CLI flags (`--batch-size` ↔ `batch_size`)."""

    backbone: str = "models/efficientnet_lite0/efficientnet_lite0_imagenet.keras"
    data: str = "data/hymenoptera-small"
    layer: list[str] = field(default_factory=list)  # empty: the backbone's default layer
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    pool: str = "none"  # none | avg | max
    dtype: str = "float32"  # float16 | float32 (storage)
    batch_size: int = 32
    image_size: int | None = None  # None: the backbone's native size
    resize: str = "crop"  # crop | stretch
    preprocess: str | None = None  # override for user models: caffe | tf | torch | none | mean=..,std=..
    out: str | None = None  # None: a readable name under cache/ ($FEATURE_CACHE_DIR)
    labels: str | None = None  # CSV mapping image id/path -> label
    path_column: str | None = None
    label_column: str | None = None
    compression: str = "none"  # none | lzf
    shard: str | None = None  # "I/N"; None: SLURM_ARRAY_TASK_* or the whole set
    manifest: str | None = None  # a listing of DATA written by `slurm` (features/catalog.py); None: list DATA here
    precision: str = "float32"  # float32 | mixed (tf engine only) | int8 (onnx engine only, features/quantize.py)
    calibration_images: int = 64  # int8: images of DATA the quantized graph is calibrated on
    calibration: str = ""  # int8: a recorded calibration ("sha256:<hex>:K=<k>") to reuse; "": calibrate on DATA
    engine: str = "auto"  # auto | tf | onnx (features/engines.py; auto: onnx on CPU, tf on a GPU)
    jit: bool = False
    devices: str = "all"  # all | comma-separated GPU indices: one extraction worker per GPU
    workers: int = 0  # decoder threads; 0: one per core
    overwrite: bool = False
    augment: int = 0  # augmented views per training image, besides the clean view
    augment_policy: str = "standard"  # features/augment.py
    seed: int = 0  # of the augmented views
    max_pixels: int = MAX_PIXELS  # images larger than this (read from the header) are skipped, never decoded

    def replace(self, **changes) -> "ExtractConfig":
        return dataclasses.replace(self, **changes)

    def flags(self) -> list[str]:
        """The CLI flags that rebuild this config (those differing from the defaults): what batch jobs run."""
        default, flags = ExtractConfig(), []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag)
            else:
                flags += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        return flags


def recorded_config(record: dict, model_dir: str | Path) -> ExtractConfig:
    """How a saved model's features were extracted (its model.json), with the `.keras` backbone found by hash
    wherever the model folder now lives: what predict and finetune extract new images with."""
    try:
        xcfg = ExtractConfig(**json.loads(record.get("config_json") or "{}"))
    except (TypeError, ValueError) as err:
        raise UsageError(f"The model's recorded extraction settings do not fit this version's ExtractConfig "
                         f"({err}); re-run `make extract` and `make classify` with this version.") from None
    return xcfg.replace(backbone=saved.locate_backbone(record, model_dir) or xcfg.backbone)


def default_out(cfg: ExtractConfig, layers: list[str], shard: tuple[int, int] | None) -> Path:
    """cache/<data>__<backbone>__<layers>[__pool][__size][__aug][__precision][__dtype][__w-weights][.shardI-of-N].h5:
    readable, derived from the config; the parts of default settings are left out, so older names stay valid."""
    pattern = is_pattern(cfg.data) and not Path(cfg.data).exists()  # tar shards named by a glob or brace pattern
    data = (pattern_root(cfg.data) if pattern else Path(cfg.data)).resolve().name or "data"
    backbone = backbone_label(cfg.backbone)
    parts = [data, backbone, "+".join(layers)]
    if cfg.pool != "none":
        parts.append(cfg.pool)
    if cfg.image_size:
        parts.append(str(cfg.image_size))
    if cfg.augment:
        parts.append(f"aug{cfg.augment}-{cfg.augment_policy}" + (f"-s{cfg.seed}" if cfg.seed else ""))
    if cfg.precision != ExtractConfig.precision:  # an int8 cache must not take the float32 cache's name
        parts.append(cfg.precision)
    if cfg.dtype != "float32":
        parts.append(cfg.dtype)
    if cfg.weights != "imagenet":
        parts.append("w-" + Path(cfg.weights).stem)
    return shard_out(cache_dir() / f"{'__'.join(parts)}.h5", shard)


def out_folder(cfg: ExtractConfig) -> Path:
    """The folder the caches of `cfg` go to (its shards too): that of --out, else the cache folder (`default_out`)."""
    return Path(cfg.out).parent if cfg.out else cache_dir()


def shard_out(out: Path, shard: tuple[int, int] | None) -> Path:
    """Shard I/N of the extraction whose merged cache is `out` goes beside it as <stem>.shardI-of-N<suffix>."""
    return out if shard is None else out.with_name(f"{out.stem}.shard{shard[0]}-of-{shard[1]}{out.suffix}")
