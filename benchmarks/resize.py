"""Resize + centre crop against the decode before it, per image on one core: the crop-first resize of
features.images beside the former whole-image area resize and the other candidates (docs/batch.md, "Input pipeline").

    python -m benchmarks.resize                  # the shipped JPEGs, and the full-size photos of ../shared if present
    python -m benchmarks.resize --accuracy       # also 5 x 4-fold CV of logreg on Lite0 features, former vs crop-first

Timing runs on one core (this thread pinned to one CPU, OpenCV on one thread), in interleaved rounds: each round
decodes every image (read + DCT-scaled JPEG decode, as load_image does), then runs every candidate over the decoded
images, each followed by the BGR -> RGB flip; the fastest round of each counts. `make bench` reports the same table in
section 1 (`resize_table`).
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import LITE0_NAME, ROOT, SHARED, SHIPPED_IMAGES, list_images
from features.images import (CROP_FRACTION, IMAGE_EXTENSIONS, NEEDED_SHORT, RESIZE_POLICIES, _interpolation,
                             crop_window, decode_bgr)


def former_resize_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The resize before crop-first (cache `decoder` without "crop cuts the source before resizing"): the whole image's
    shorter side to size / 0.875, area when shrinking, linear when enlarging, then the centre size x size."""
    h, w = img.shape[:2]
    scale = round(size / CROP_FRACTION) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=_interpolation((h, w), (nh, nw)))
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top : top + size, left : left + size]


def _whole_linear(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = round(size / CROP_FRACTION) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top : top + size, left : left + size]


def _crop_first(interpolation: int) -> Callable[[np.ndarray, int], np.ndarray]:
    def resize(img: np.ndarray, size: int) -> np.ndarray:
        top, left, side = crop_window(*img.shape[:2], size)
        return cv2.resize(img[top : top + side, left : left + side], (size, size), interpolation=interpolation)
    return resize


FORMER = "former: area on the whole image, then crop"
CURRENT = "crop first, linear below 2x (features.images)"
CANDIDATES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    FORMER: former_resize_crop,
    "linear on the whole image, then crop": _whole_linear,
    "crop first, area": _crop_first(cv2.INTER_AREA),
    "crop first, cubic": _crop_first(cv2.INTER_CUBIC),
    CURRENT: lambda img, size: RESIZE_POLICIES["crop"](img, size, CROP_FRACTION),
}
COLUMNS = ["images", "candidate", "n", "decode_ms", "resize_ms", "ratio", "vs_former", "pixel_diff"]


@contextmanager
def one_core() -> Iterator[int]:
    """Pin this thread to one of its CPUs and OpenCV to one thread; both restored afterwards."""
    cpus, threads = os.sched_getaffinity(0), cv2.getNumThreads()
    cpu = min(cpus)
    os.sched_setaffinity(0, {cpu})  # pid 0: the calling thread
    cv2.setNumThreads(1)
    try:
        yield cpu
    finally:
        cv2.setNumThreads(threads)
        os.sched_setaffinity(0, cpus)


def resize_profile(paths: list[Path], label: str, size: int = 224, rounds: int = 5) -> list[dict]:
    """One row per candidate: ms per image of the decode and of the resize + crop + flip, their ratio, the resize's
    ratio to the former one, and the mean |pixel difference| to the former's output (of 255)."""
    need = NEEDED_SHORT["crop"](size, CROP_FRACTION)
    best = dict.fromkeys(["decode", *CANDIDATES], float("inf"))
    outputs: dict[str, np.ndarray] = {}
    with one_core():
        imgs = [decode_bgr(p, need) for p in paths]  # untimed: warms the page cache and the decoder
        for _ in range(rounds):
            start = time.perf_counter()
            for p in paths:
                decode_bgr(p, need)
            best["decode"] = min(best["decode"], time.perf_counter() - start)
            for name, resize in CANDIDATES.items():
                start = time.perf_counter()
                out = [cv2.cvtColor(resize(img, size), cv2.COLOR_BGR2RGB) for img in imgs]
                best[name] = min(best[name], time.perf_counter() - start)
                outputs[name] = np.stack(out)
    n = len(paths)
    former = outputs[FORMER].astype(np.int16)
    return [{"images": label, "candidate": name, "n": n, "decode_ms": 1e3 * best["decode"] / n,
             "resize_ms": 1e3 * best[name] / n, "ratio": best[name] / best["decode"],
             "vs_former": best[name] / best[FORMER],
             "pixel_diff": float(np.abs(outputs[name] - former).mean())} for name in CANDIDATES]


def image_sets(full_size: bool = True, limit: int | None = None) -> list[tuple[str, list[Path]]]:
    """(label, JPEGs): the shipped copies (short side about 256), and the full-size photos when asked and present."""
    sets = [(f"shipped JPEGs ({SHIPPED_IMAGES.relative_to(ROOT)})", list_images(SHIPPED_IMAGES)[:limit])]
    photos = SHARED / "datasets" / "hymenoptera"
    if full_size and photos.is_dir():
        sets.append(("full-size photos (shared/datasets/hymenoptera, ~500x375)", list_images(photos)[:limit]))
    return sets


def resize_table(full_size: bool, log=print) -> tuple[str, list[str], list[dict]]:
    """Section 1's extra table; the smoke run (no full-size photos) times 24 shipped images in 2 rounds."""
    rows = []
    limit, rounds = (None, 5) if full_size else (24, 2)
    for label, paths in image_sets(full_size, limit):
        log(f"section 1: resize + crop vs decode on {len(paths)} {label}")
        rows += resize_profile(paths, label, rounds=rounds)
    return ("Resize + centre crop (+ RGB flip) vs the decode before it, ms per image on ONE core, fastest of "
            "interleaved rounds; ratio = resize ÷ decode (target ≤ 0.5 on web-size JPEGs); pixel_diff: mean "
            "|difference| to the former resize, of 255", COLUMNS, rows)


def accuracy(folder: Path, model_path: Path, size: int = 224, repeats: int = 5, folds: int = 4, seed: int = 0,
             log=print) -> dict:
    """Lite0 avg_pool features of every image under `folder` (label: its parent folder), made with the former resize
    and the current one from the same decode, then `repeats` x `folds`-fold stratified CV of the logreg head (C
    picked on inner folds), the same splits for both. Mean accuracy ± standard error over the folds, the paired
    difference, and the mean relative feature difference ||new - old|| / ||old||."""
    import keras
    from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold

    from classifiers.heads import get_head

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    pixels: dict[str, list[np.ndarray]] = {"former": [], "current": []}
    labels = []
    for p in paths:
        try:
            img = decode_bgr(p, NEEDED_SHORT["crop"](size, CROP_FRACTION))
        except ValueError as err:
            log(f"skipped {p.name}: {err}")
            continue
        pixels["former"].append(cv2.cvtColor(former_resize_crop(img, size), cv2.COLOR_BGR2RGB))
        pixels["current"].append(cv2.cvtColor(CANDIDATES[CURRENT](img, size), cv2.COLOR_BGR2RGB))
        labels.append(p.parent.name)
    classes, y = np.unique(labels, return_inverse=True)
    model = keras.models.load_model(model_path)
    cut = keras.Model(model.input, model.get_layer("avg_pool").output)
    feats = {k: cut.predict((np.stack(v).astype(np.float32) - 127.0) / 128.0, batch_size=32, verbose=0)
             for k, v in pixels.items()}
    log(f"features of {len(y)} images ({', '.join(f'{c}: {(y == i).sum()}' for i, c in enumerate(classes))})")
    head = get_head("logreg")
    splits = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed).split(y, y))
    scores = {k: [] for k in feats}
    for train, test in splits:
        for k, X in feats.items():
            search = GridSearchCV(head.build(seed), head.grid, cv=3).fit(X[train], y[train])
            scores[k].append(search.score(X[test], y[test]))
    out = {"images": len(y), "folds": len(splits)}
    for k, s in scores.items():
        s = np.asarray(s)
        out[k] = (s.mean(), s.std(ddof=1) / np.sqrt(len(s)))
    d = np.asarray(scores["current"]) - np.asarray(scores["former"])
    out["difference"] = (d.mean(), d.std(ddof=1) / np.sqrt(len(d)))
    old, new = feats["former"].astype(np.float64), feats["current"].astype(np.float64)
    out["relative_feature_difference"] = float(np.mean(np.linalg.norm(new - old, axis=1)
                                                       / np.linalg.norm(old, axis=1)))
    out["pixel_diff"] = float(np.abs(np.stack(pixels["current"]).astype(np.int16) - np.stack(pixels["former"])).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shipped-only", action="store_true", help="skip the full-size photos of ../shared")
    p.add_argument("--accuracy", action="store_true", help="also the CV check on the full-size photos (minutes)")
    args = p.parse_args()
    print(f"machine: {machine_model()}; load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for label, paths in image_sets(not args.shipped_only):
        print(f"{label}: {len(paths)} images")
        for r in resize_profile(paths, label, rounds=args.rounds):
            print(f"  {r['candidate']:48s} resize {r['resize_ms']:.3f} ms  ÷ decode {r['decode_ms']:.3f} ms = "
                  f"{r['ratio']:.3f}  (÷ former {r['vs_former']:.2f}; |pixel diff| {r['pixel_diff']:.2f})")
    if args.accuracy:
        res = accuracy(SHARED / "datasets" / "hymenoptera", ROOT / "models" / LITE0_NAME)
        print(f"{res['folds']}-fold CV of logreg on {res['images']} images (Lite0 avg_pool): "
              + "; ".join(f"{k} {res[k][0]:.4f} ± {res[k][1]:.4f}" for k in ("former", "current", "difference"))
              + f"; mean relative feature difference {res['relative_feature_difference']:.4f}; "
                f"mean |pixel difference| {res['pixel_diff']:.2f}")


def machine_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
