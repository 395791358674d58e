"""One-screen summaries printed at the end of long work."""
from __future__ import annotations

from collections import Counter

import numpy as np

from features.engines import reduced_precision
from features.store import read_attrs
from pipeline.extraction import ExtractResult

SHOWN_REASONS = 5  # the most common reasons for skipping on the summary's line (a reason may name its file)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def print_extract_summary(r: ExtractResult) -> None:
    attrs = read_attrs(r.path)
    dtype = attrs.dtype if attrs else "float32"
    itemsize = np.dtype(dtype).itemsize
    t = r.timings
    rate = r.processed / t.wall_s if t.wall_s else 0.0
    lines = [
        f"{r.status}: {r.path}  ({human_bytes(r.path.stat().st_size)})",
        f"images: {r.images} written, {len(r.skipped)} skipped; {r.processed} processed in this run "
        f"in {t.wall_s:.1f} s ({rate:.1f} img/s)",
    ]
    if r.status == "updated":
        lines.append(f"update: {r.reused} rows kept from the earlier cache (unchanged files), {r.processed} new or "
                     "changed images through the model")
    for layer, shape in r.layer_shapes.items():
        per_image = int(np.prod(shape)) * itemsize
        lines.append(f"  features/{layer}: (N, {', '.join(map(str, shape))}) {dtype}, {human_bytes(per_image)} per image")
    lines.append(f"time: model ({r.engine}) {t.model_s:.1f} s, waiting for decoder {t.wait_input_s:.1f} s, "
                 f"write {t.write_s:.1f} s; "
                 f"decode {t.decode_cpu_s:.1f} cpu-s across threads")
    if attrs and attrs.engine_reason:
        lines.append(f"engine: {attrs.engine} ({attrs.engine_reason})")
    if attrs and (reduced := reduced_precision(attrs.precision, attrs.calibration)):
        lines.append(f"precision: {reduced}")
    if r.skipped:
        reasons = Counter(reason for _, reason in r.skipped).most_common()
        others = f"; {len(reasons) - SHOWN_REASONS} other reasons" if len(reasons) > SHOWN_REASONS else ""
        lines.append("skipped: " + "; ".join(f"{n} x {reason}" for reason, n in reasons[:SHOWN_REASONS]) + others)
        lines += [f"  {path}: {reason}" for path, reason in r.skipped[:8]]
        if len(r.skipped) > 8:
            lines.append(f"  ... and {len(r.skipped) - 8} more (dataset 'skipped' in the file)")
    print("\n".join(lines))
