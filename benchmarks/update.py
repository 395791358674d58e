"""Section 8: incremental extraction. After a full extraction of N images, 1% more are added and the same command is
run again; then one more image is added and it is run again. Each run is a whole `python -m pipeline extract`
process, so the second update's wall time is the fixed cost of any update (start-up, model load, reading the folder,
copying the kept rows), and the difference between the two is what the added 1% costs beyond it. The two updates run
`sizes.steady_rounds` times, alternating, and the fastest of each counts, as in section 2: start-up alone varies by
seconds between identical processes on a shared machine."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, Section, Sizes, Sources, list_images, stage_images

TARGET = 0.03  # (T(update +1%) - T(update +1)) / T(full run)


def _extract(data: Path, out: Path) -> tuple[float, int]:
    """(wall seconds, images pushed through the model) of one whole extraction process with the default engine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "pipeline", "extract", "--data", str(data), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, int(re.search(r"(\d+) processed in this run", proc.stdout).group(1))


def _add(data: Path, spare: list[Path], k: int) -> list[Path]:
    """Hard-link k spare images into DATA under new names (new files to the catalog); returns the rest."""
    for src in spare[:k]:
        os.link(src, data / src.parent.name / f"added_{src.parent.name}_{src.name}")
    return spare[k:]


def section_update(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    n = sizes.update_images
    sec = Section(8, "Incremental extraction: an update computes only what changed",
                  f"an update after adding 1% of the images pushes exactly those through the model, and its wall "
                  f"time minus that of an update after adding one image is ≤ {TARGET:.0%} of a full run's",
                  ["run", "round", "images_in_folder", "added", "processed", "wall_s", "share_of_full_run"])
    data = stage_images(sources.images, n, work / "img_update", link=True)
    spare = list_images(stage_images(sources.images, (n // 100 + 1) * sizes.steady_rounds, work / "img_update_spare",
                                     link=True))
    out = work / "update.h5"
    out.unlink(missing_ok=True)
    log(f"section 8: full extraction of {n} images, then updates after adding {n // 100} and 1")
    # the ONNX export (kept beside the caches, whatever the data) is made before anything is timed
    _extract(stage_images(sources.images, 4, work / "img_update_warm", link=True), work / "warm.h5")
    full_s, full_n = _extract(data, out)
    rows = [{"run": "full", "round": 1, "images_in_folder": n, "added": n, "processed": full_n, "wall_s": full_s,
             "share_of_full_run": 1.0}]
    updates = {"update +1%": n // 100, "update +1": 1}
    for round_ in range(sizes.steady_rounds):
        for label, k in updates.items():
            spare = _add(data, spare, k)
            seconds, processed = _extract(data, out)
            rows.append({"run": label, "round": round_ + 1, "images_in_folder": len(list_images(data)), "added": k,
                         "processed": processed, "wall_s": seconds, "share_of_full_run": seconds / full_s})
    sec.rows = rows
    fastest = {label: min(r["wall_s"] for r in rows if r["run"] == label) for label in updates}
    extra = (fastest["update +1%"] - fastest["update +1"]) / full_s
    exact = all(r["processed"] == r["added"] for r in rows)
    sec.met = exact and extra <= TARGET
    sec.value = (f"processed = added in every run: {'yes' if exact else 'NO'}; (T(+1%) − T(+1)) / T(full) = "
                 f"{extra:.2%}")
    sec.notes.append("Each row is one whole process (imports, model load, folder scan, kept rows copied, new rows "
                     "computed). Added images are hard links of real JPEGs under new names. Each round adds 1% of N "
                     "and updates, then adds one image and updates; T is the fastest of a kind over the rounds.")
    return sec
