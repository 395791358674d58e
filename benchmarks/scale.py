"""The scale section: how each stage's whole-process time and peak RSS grow with the number of images.

Synthetic 48x48 JPEGs (a few hundred distinct ones, hard-linked to N files in 10 class folders, so the folder costs
no disk) and the shipped Lite0 at 32 px, cut at avg_pool: the model is cheap, so what shows is the pipeline's own
cost per image (listing, stat, decode, HDF5, bookkeeping). Per N, each stage is one `python -m pipeline` process
(start-up included, as a user waits for it) timed by its wall clock, its peak RSS read from `wait4`:

- `extract`: a full run on the folder; `extract (tar)`: the same images packed as WebDataset shards of 10,000;
- `up-to-date`, `up-to-date (tar)`: the same command again (lists DATA, finds nothing to do): what any update costs
  before its change, the floor of the update ratio;
- `listing`: DATA listed once into a manifest (what `slurm` does at submit time);
- `shard task`: one task of an array with 1,000 images per shard, reading its slice of the manifest: its cost
  must not grow with N (no walk, no stat of other tasks' files);
- `update +1%`: 1% new files sorting between existing ones, and the same command again; its time over the full run's
  is the update ratio; `update +1% (tar)`: a new tar shard of 1% more samples, whose rows sort after all others, so
  the update appends them (its time over `extract (tar)`'s); the section reports the larger ratio;
- `merge`, `merge virtual`: four shards of the folder (four `extract --shard` processes, not timed) merged by copy
  and as virtual datasets;
- `verify` of the merged cache; `classify`: the default heads on the cache, report included.

The growth exponent of a stage is log(t2/t1) / log(N2/N1) between the two largest N (start-up weighs less there).
Targets: every exponent <= 1.1 (the `shard task` is compared with 0: its N does not change), update +1% <= 3% of the
full run. Apart from N, one merge of 1,000 tiny shards (2 images each, written by one process) by copy and virtual.

    python -m benchmarks --sections 10                                  # N = 10k, 100k, 300k (40 min on 2 cores)
    python -m benchmarks --sections 10 --scale-images 100000,1000000   # 1M on request
"""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, Section

SIDE = 48  # synthetic JPEG side
CLASSES = 10
DISTINCT = 400  # distinct JPEGs hard-linked over and over
SHARD_IMAGES = 1000  # images per shard task
TAR_SAMPLES = 10_000  # samples per WebDataset shard (what img2dataset writes)
EXPONENT_TARGET = 1.1
UPDATE_TARGET = 0.03
FLAGS = ["--backbone", str(ROOT / "models/efficientnet_lite0/efficientnet_lite0_imagenet.keras"), "--image-size", "32",
         "--batch-size", "256", "--workers", "2", "--engine", "onnx"]  # pinned: `auto` would time both on one N only


# Runs argv[1:] as a child and prints its peak RSS in KiB. Why a wrapper: a process's peak RSS starts from its parent's
# at fork and survives exec, so a child forked straight from this process (which has imported TensorFlow) would report
# at least this process's size. The wrapper, a bare interpreter of a few MiB, is the one that forks.
PEAK_RSS_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def stage(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `python -m pipeline args` process (`args` starting with -c: that code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = args if args[0] == "-c" else ["-m", "pipeline", *args]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", PEAK_RSS_WRAPPER, *command], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, int(proc.stdout.split()[-1]) / 1024


def write_images(data: Path, n: int, rng: np.random.Generator) -> list[Path]:
    """n JPEGs `data/cNN/iNNNNNNN.jpg` in CLASSES folders, hard links to DISTINCT files (coloured noise)."""
    import cv2

    pool = data / ".pool"
    pool.mkdir(parents=True)
    sources = []
    for k in range(DISTINCT):
        sources.append(pool / f"{k}.jpg")
        cv2.imwrite(str(sources[-1]), rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    files = [data / f"c{k % CLASSES:02d}" / f"i{k:07d}.jpg" for k in range(n)]
    for folder in {f.parent for f in files}:
        folder.mkdir()
    for k, f in enumerate(files):
        os.link(sources[k % DISTINCT], f)
    return files


def add_new(files: list[Path], share: float) -> None:
    """share x len(files) new files, each named to sort right after an existing one (so rows after it move)."""
    step = max(1, round(1 / share))
    for f in files[::step]:
        os.link(f, f.with_name(f.stem + "a.jpg"))


def pack_tars(files: list[Path], out: Path, first: int = 0) -> None:
    """The images as WebDataset shards `train-NNNNNN.tar` of TAR_SAMPLES samples (`<key>.jpg` + `<key>.cls`) in
    `out`, numbered from `first`."""
    out.mkdir(exist_ok=True)
    for s in range(-(-len(files) // TAR_SAMPLES)):
        with tarfile.open(out / f"train-{first + s:06d}.tar", "w") as tar:
            for f in files[s * TAR_SAMPLES:(s + 1) * TAR_SAMPLES]:
                key = f"{f.parent.name}_{f.stem}"
                for name, data in ((f"{key}.jpg", f.read_bytes()), (f"{key}.cls", f.parent.name.encode())):
                    info = tarfile.TarInfo(name)  # as data, not `tar.add`: that stores a hard-linked file as a link
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def listing_code(data: Path, manifest: Path) -> str:
    """Python for one process that lists DATA into a manifest, as `slurm` does at submit time."""
    return ("from features.catalog import discover, manifest_source, write_manifest; from pathlib import Path; "
            f"write_manifest(Path({str(manifest)!r}), discover({str(data)!r}), "
            f"manifest_source({str(data)!r}, None, None, None, 0))")


def tiny_shards_code(data: Path, out: Path, shards: int) -> str:
    """Python for one process that writes `shards` shards of DATA one after the other (their ONNX export is made
    once, in engines/ beside them)."""
    return ("from pipeline.config import ExtractConfig; from pipeline.extraction import extract; "
            f"cfg = ExtractConfig(backbone={FLAGS[1]!r}, data={str(data)!r}, image_size=32, batch_size=256, "
            f"workers=2, engine='onnx', out={str(out)!r})\n"
            f"for i in range({shards}): extract(cfg.replace(shard='{{}}/{shards}'.format(i)), verbose=False)")


def measure(n: int, work: Path, rng: np.random.Generator, log) -> dict[str, tuple[float, float]]:
    """{stage: (seconds, peak MiB)} at n images. Every cache lies in work/cache/, beside the one ONNX export."""
    data, cache = work / f"data{n}", work / "cache"
    files = write_images(data, n, rng)
    out, merged = cache / f"c{n}.h5", cache / f"m{n}.h5"
    flags = [*FLAGS, "--data", str(data)]
    got: dict[str, tuple[float, float]] = {}

    def timed(name: str, args: list[str]) -> None:
        got[name] = stage(args)
        log(f"scale N={n}: {name} {got[name][0]:.1f} s, {got[name][1]:.0f} MiB")

    timed("extract", ["extract", *flags, "--out", str(out)])
    timed("up-to-date", ["extract", *flags, "--out", str(out)])
    manifest = cache / f"listing{n}.jsonl"
    timed("listing", ["-c", listing_code(data, manifest)])
    timed("shard task", ["extract", *flags, "--manifest", str(manifest), "--shard", f"0/{max(1, n // SHARD_IMAGES)}",
                         "--out", str(cache / f"task{n}.h5")])
    tars = work / f"tars{n}"
    pack_tars(files, tars)
    timed("extract (tar)", ["extract", *FLAGS, "--data", str(tars), "--out", str(cache / f"tar{n}.h5")])
    timed("up-to-date (tar)", ["extract", *FLAGS, "--data", str(tars), "--out", str(cache / f"tar{n}.h5")])
    for i in range(4):
        stage(["extract", *flags, "--shard", f"{i}/4", "--out", str(merged)])
    timed("merge", ["merge", "--shards-of", str(merged)])
    timed("merge virtual", ["merge", "--shards-of", str(merged), "--out", str(cache / f"v{n}.h5"), "--virtual"])
    timed("verify", ["verify", str(merged)])
    timed("classify", ["classify", "--features", str(out), "--out", str(work / f"results{n}")])
    add_new(files, 0.01)
    timed("update +1%", ["extract", *flags, "--out", str(out)])
    pack_tars(files[:: round(1 / 0.01)], tars, first=len(list(tars.iterdir())))  # its rows sort after all others
    timed("update +1% (tar)", ["extract", *FLAGS, "--data", str(tars), "--out", str(cache / f"tar{n}.h5")])
    return got


def tiny_merge(shards: int, work: Path, rng: np.random.Generator, log) -> dict[str, tuple[float, float]]:
    """Merge `shards` shards of 2 images each, by copy and virtual."""
    data, cache = work / "tiny", work / "cache"
    write_images(data, 2 * shards, rng)
    started = time.perf_counter()
    stage(["-c", tiny_shards_code(data, cache / "t.h5", shards)])
    log(f"scale: {shards} tiny shards written in {time.perf_counter() - started:.0f} s")
    return {"merge": stage(["merge", "--shards-of", str(cache / "t.h5")]),
            "merge virtual": stage(["merge", "--shards-of", str(cache / "t.h5"), "--out", str(cache / "v.h5"),
                                    "--virtual"])}


def exponent(t1: float, t2: float, n1: int, n2: int) -> float:
    """k in t ∝ N^k between two sizes."""
    return math.log(t2 / t1) / math.log(n2 / n1)


def section_scale(sizes: tuple[int, ...], work: Path, log, tiny_shards: int) -> Section:
    """Section 10: per stage, seconds and peak RSS at each N, the growth exponents, the update ratio; then a merge
    of `tiny_shards` shards of 2 images (0: none)."""
    rng = np.random.default_rng(0)
    warm = work / "warm-up"
    write_images(warm, 64, rng)
    stage(["extract", *FLAGS, "--data", str(warm), "--out", str(work / "cache" / "warm-up.h5")])  # the ONNX export
    runs = {n: measure(n, work, rng, log) for n in sizes}
    n1, n2 = sizes[-2:]
    rows, worst = [], {}
    for name in runs[n2]:
        row = {"stage": name}
        for n in sizes:
            row[f"s_at_{n}"], row[f"mib_at_{n}"] = runs[n][name]
        row["time_exponent"] = exponent(runs[n1][name][0], runs[n2][name][0], n1, n2)
        row["rss_exponent"] = exponent(runs[n1][name][1], runs[n2][name][1], n1, n2)
        worst[name] = row["time_exponent"]
        rows.append(row)
    def share(n: int, stage: str) -> float:  # the larger of the folder's and the tar shards' share of a full run
        return max(runs[n][stage][0] / runs[n]["extract"][0],
                   runs[n][f"{stage} (tar)"][0] / runs[n]["extract (tar)"][0])

    update = {n: share(n, "update +1%") for n in sizes}
    beyond = max((runs[n2][f"update +1%{kind}"][0] - runs[n2][f"up-to-date{kind}"][0]) / runs[n2][f"extract{kind}"][0]
                 for kind in ("", " (tar)"))  # the restated target: what an update costs above a rerun's stats
    flat = worst.pop("shard task")
    met = max(worst.values()) <= EXPONENT_TARGET and flat <= EXPONENT_TARGET - 1 and update[n2] <= UPDATE_TARGET
    sec = Section(10, f"Scale: whole-process seconds and peak RSS per stage at N = {', '.join(map(str, sizes))} "
                      "(synthetic 48x48 JPEGs, Lite0 @32 px)",
                  f"every stage's time exponent ≤ {EXPONENT_TARGET} (the 1,000-image shard task's ≤ "
                  f"{EXPONENT_TARGET - 1:.1f}: flat in N); update after +1% ≤ {UPDATE_TARGET:.0%} of a full run",
                  ["stage", *[c for n in sizes for c in (f"s_at_{n}", f"mib_at_{n}")], "time_exponent",
                   "rss_exponent"], rows, met=met,
                  value=(f"largest exponent {max(worst.values()):.2f} ({max(worst, key=worst.get)}), shard task "
                         f"{flat:.2f}, update +1% / full = " + ", ".join(f"{v:.1%} at {n}" for n, v in update.items())
                         + f" (up-to-date / full = {share(n2, 'up-to-date'):.1%} at {n2}: the floor of any update; "
                           f"beyond it, (update - up-to-date) / full = {beyond:.1%})"))
    if tiny_shards:
        merged = tiny_merge(tiny_shards, work, rng, log)
        sec.extra_tables.append((f"Merging {tiny_shards} shards of 2 images", ["how", "seconds", "peak_mib"],
                                 [{"how": k, "seconds": v[0], "peak_mib": v[1]} for k, v in merged.items()]))
    sec.notes.append("Exponents come from the two largest N; whole-process times include start-up (~5-10 s), "
                     "which flattens them at small N.")
    return sec
