"""`--precision int8`: the exported graph quantized by ONNX Runtime (static, QDQ, per-channel weights), calibrated on
K images of DATA and kept beside the float export under its own hash.

Which images: K (`--calibration-images`, default 64) clean training views (split `train` where DATA has splits, else
every image), evenly spaced over the sorted candidate list of the whole set (every shard picks the same ones; the
first K would all be of the first class). The set's identity is the sha256 of their decoded pixels with K,
`sha256:<hex>:K=64`: the cache's `calibration` attribute (a `recipe` attribute), so a resume, an update, a merge and a
prediction use the same quantized graph or are refused. A resume or update keeps the cache's calibration (the kept
graph is found by it); `--calibration <identity>` names one explicitly (what predict runs with).

Settings, the same on every CPU so that one kept graph gives one set of features: QDQ format; activations uint8 per
tensor, their range the min/max over the calibration set; weights int8 per output channel in 7 bits (`reduce_range`):
the uint8 x int8 kernels of CPUs without VNNI (AVX2, AVX-512F) add pairs of products in 16 bits and saturate with full
8-bit weights (Lite0 -> avg_pool: 0.40 mean relative deviation from float32 against 0.21, at the same speed;
docs/engines.md). The float graph is first optimised by ONNX Runtime's `quant_pre_process` (without symbolic shape
inference, which needs sympy).

    python -m pipeline extract --data data/hymenoptera-small --precision int8 --calibration-images 64
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import UsageError
from features.model import installed_version

DEFAULT_IMAGES = 64
SETTINGS = {"format": "QDQ", "activations": "QUInt8, per tensor, MinMax", "weights": "QInt8, per channel, reduce_range",
            "preprocess": "quant_pre_process(skip_symbolic_shape=True)"}
IDENTITY = re.compile(r"sha256:[0-9a-f]{64}:K=[1-9][0-9]*")


@dataclass(frozen=True, eq=False)
class Calibration:
    """The images an int8 graph is calibrated on: their identity, and how to decode them from DATA again when the
    quantized graph is not kept (returns the identity they have now, and the pixels)."""

    identity: str
    decode: Callable[[], tuple[str, np.ndarray]]


def check_identity(value: str, flag: str = "--calibration") -> None:
    if value and not IDENTITY.fullmatch(value):
        raise UsageError(f"{flag[2:]} '{value[:80]}' is not valid. Expected the `calibration` attribute of an int8 "
                         "cache, 'sha256:<64 hex digits>:K=<images>', or nothing (calibrate on DATA).")


def calibration_rows(catalog, k: int) -> list[int]:
    """Rows of `catalog` (the whole set) to calibrate on: k evenly spaced over its clean training views."""
    views = catalog.views or [0] * len(catalog)
    clean = [i for i in range(len(catalog)) if views[i] == 0]
    pool = [i for i in clean if catalog.splits[i] == "train"] or clean
    n = min(k, len(pool))
    return [pool[j * len(pool) // n] for j in range(n)]


def decode_set(catalog, k: int, size: int, resize: str, crop: float, workers: int, max_pixels: int
               ) -> tuple[str, np.ndarray]:
    """(identity, pixels) of the calibration images of `catalog`, decoded as extract decodes clean views; files that
    cannot be used are left out (their absence changes the identity)."""
    from features.augment import file_loader
    from features.images import decode_stream

    rows = calibration_rows(catalog, k)
    load_view = file_loader(size, resize, crop, "standard", 0, 0, max_pixels)
    decoded = [d.pixels for d in decode_stream(((i, i) for i in rows),
                                               lambda i: load_view(catalog.paths[i], catalog.source(i)), workers,
                                               lookahead=max(1, len(rows)))
               if d.pixels is not None]
    if not decoded:
        raise UsageError(f"none of the {len(rows)} calibration images for --precision int8 could be decoded; "
                         "DATA needs usable images (clean training views).")
    pixels = np.stack(decoded)
    digest = hashlib.sha256(json.dumps(list(pixels.shape)).encode() + pixels.tobytes()).hexdigest()
    return f"sha256:{digest}:K={k}", pixels


def calibration(catalog_of: Callable[[], object], k: int, size: int, resize: str, crop: float, workers: int,
                max_pixels: int,
                identity: str = "") -> Calibration:
    """The calibration of this run: `identity` when known (recorded by the cache being resumed or updated, or given),
    its images decoded only if its graph is not kept; else the K images of the whole set (`catalog_of()`), decoded
    now to know their identity."""
    def decode() -> tuple[str, np.ndarray]:
        return decode_set(catalog_of(), k, size, resize, crop, workers, max_pixels)

    if identity:
        return Calibration(identity, decode)
    found = decode()
    return Calibration(found[0], lambda: found)


def quantized_path(export: Path, identity: str) -> Path:
    """<hash>.int8.onnx beside the float export `export`: the hash over the float graph's name (its own hash), the
    calibration's identity, the settings and the quantizer's version."""
    key = {"graph": export.name, "calibration": identity, "settings": SETTINGS,
           "quantizer": f"onnxruntime {installed_version('onnxruntime')}"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return export.with_name(f"{digest}.int8.onnx")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger; a run prints its own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(floating: Path, out: Path | None, calib: Calibration, variant: dict | None = None) -> Path:
    """Quantize the float export `floating` on `calib`'s images into `out` (atomically), or into a temporary file when
    `out` is None; the calibration images are decoded again here, and must still have the recorded identity.
    `variant` overrides `quantize_static` arguments (names as strings: {"weight_type": "QUInt8", "reduce_range":
    False}); only benchmarks/engines.py uses it, to compare the settings this module fixes."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    identity, pixels = calib.decode()
    if identity != calib.identity:
        raise UsageError(f"the int8 graph calibrated on {calib.identity[:19]}…{calib.identity[-6:]} is not kept "
                         f"({out or 'random weights are never kept'}), and DATA's calibration images now give "
                         f"{identity[:19]}…{identity[-6:]}: they changed. Pass --overwrite to calibrate anew, or "
                         "restore the engines/ folder that held the graph.")
    folder = out.parent if out is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=folder) as tmp, _quiet_root_logger():
        prepared, result = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(floating), str(prepared), skip_symbolic_shape=True)
        first = onnx.load(str(prepared)).graph.input[0]
        name, sub = first.name, first.type.tensor_type.shape.dim[0].dim_value
        padded = np.resize(pixels, (-(-len(pixels) // sub) * sub, *pixels.shape[1:]))  # whole sub-batches: repeated

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{name: padded[i : i + sub]} for i in range(0, len(padded), sub)])

            def get_next(self):
                return next(self.batches, None)

        arguments = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": True,
                     "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
        arguments.update({k: getattr(QuantType, v) if k.endswith("_type") else v for k, v in (variant or {}).items()})
        try:
            quantize_static(str(prepared), str(result), Reader(), **arguments)
        except Exception as err:  # the quantizer raises plain exceptions for what it cannot handle
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            raise UsageError(f"ONNX Runtime could not quantize this graph to int8 ({type(err).__name__}: "
                             f"{first_line}). Use --precision float32.") from None
        if out is None:
            fd, kept = tempfile.mkstemp(prefix=".int8-", suffix=".onnx")
            os.close(fd)
            os.replace(result, kept)
            return Path(kept)
        os.chmod(result, 0o644)  # a shared cache folder's graphs are readable by all, as the float export
        os.replace(result, out)
    return out
