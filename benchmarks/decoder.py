"""Decode + resize + centre crop on one thread: the seed's path (full decode, area resize) vs features.images.

    taskset -c 0 python -m benchmarks.decoder --folder ../shared/datasets/hymenoptera --photos /tmp/photos

`--photos` is filled, if empty, with 20 of the folder's JPEGs upscaled to 4032x3024 (quality 92, every other one
portrait): 12-MP phone photos, the case where DCT-scaled decoding pays most. Best of `--repeats` passes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from features.images import CROP_FRACTION, DECODER, decode_rgb, load_image


def seed_load(path: Path, size: int) -> np.ndarray:
    """The path before DCT scaling: full decode, area resize whenever shrinking, centre crop."""
    img = decode_rgb(path)
    h, w = img.shape[:2]
    scale = round(size / CROP_FRACTION) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top : top + size, left : left + size]


def make_photos(sources: list[Path], out: Path, n: int = 20) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources[:: max(1, len(sources) // n)][:n]):
        big = cv2.resize(cv2.imread(str(src)), (4032, 3024), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(out / f"{i:02d}.jpg"), np.rot90(big) if i % 2 else big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return sorted(out.glob("*.jpg"))


def best_rate(load, paths: list[Path], size: int, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = np.stack([load(p, size) for p in paths])
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--photos", type=Path, required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cv2.setNumThreads(1)
    web = sorted(args.folder.rglob("*.jpg"))
    photos = sorted(args.photos.glob("*.jpg")) or make_photos(web, args.photos)
    print(f"decoder: {DECODER}")
    for name, paths in [(f"web-size JPEGs ({len(web)})", web), (f"12-MP photos ({len(photos)})", photos)]:
        old, a = best_rate(seed_load, paths, args.size, args.repeats)
        new, b = best_rate(lambda path, size: load_image(path, size, "crop"), paths, args.size, args.repeats)
        diff = np.abs(a.astype(int) - b).mean()
        print(f"{name}: seed path {old:.1f} img/s, scaled decode {new:.1f} img/s ({new / old:.2f}x); "
              f"mean |pixel difference| {diff:.2f} of 255")


if __name__ == "__main__":
    main()
