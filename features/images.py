"""Decode any image a real folder holds into RGB uint8 at the model's input size, or say why it cannot be used.

OpenCV does the work: it applies EXIF orientation, converts CMYK, grayscale, palette and 16-bit images to 8-bit BGR,
reads the first frame of a GIF, returns None for truncated or non-image bytes, and releases the GIL so a thread pool
decodes in parallel. We only flip BGR to RGB and resize.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
T = TypeVar("T")
CROP_FRACTION = 0.875  # ImageNet evaluation convention: resize the shorter side to size / 0.875, then centre-crop


def _resize_stretch(img: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(img, (size, size), interpolation=_interpolation(img.shape[:2], (size, size)))


def _resize_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    short = round(size / CROP_FRACTION)
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=_interpolation((h, w), (nh, nw)))
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top : top + size, left : left + size]


RESIZE_POLICIES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "crop": _resize_crop,  # keeps the aspect ratio; what the pretrained models were evaluated with
    "stretch": _resize_stretch,  # what keras.utils.image_dataset_from_directory does
}


def _interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Area averaging when shrinking (no aliasing), bilinear when enlarging."""
    return cv2.INTER_AREA if dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1] else cv2.INTER_LINEAR


def decode_rgb(path: str | Path) -> np.ndarray:
    """Full-size RGB uint8 (H, W, 3). Raises ValueError with a reason for files that are not usable images."""
    buf = np.fromfile(str(path), dtype=np.uint8)
    if buf.size == 0:
        raise ValueError("empty file (0 bytes)")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image (corrupt, truncated or another file type)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_image(path: str | Path, size: int, resize: str) -> np.ndarray:
    """RGB uint8 (size, size, 3) ready for the backbone's own preprocess_input."""
    return RESIZE_POLICIES[resize](decode_rgb(path), size)


@dataclass(frozen=True)
class Decoded:
    index: int
    pixels: np.ndarray | None  # None: skipped, see `reason`
    reason: str = ""
    seconds: float = 0.0


def _decode_one(index: int, item: T, load: Callable[[T], np.ndarray]) -> Decoded:
    start = time.perf_counter()
    try:
        pixels = load(item)
    except (ValueError, OSError, cv2.error) as err:
        return Decoded(index, None, str(err), time.perf_counter() - start)
    return Decoded(index, pixels, "", time.perf_counter() - start)


def decode_stream(items: Iterable[tuple[int, T]], load: Callable[[T], np.ndarray], workers: int, lookahead: int
                  ) -> Iterator[Decoded]:
    """`load` each item in a thread pool, `lookahead` items ahead of the consumer, yielding results in input order.

    `load` is e.g. `lambda path: load_image(path, size, resize)`, or a loader of augmented views."""
    cv2.setNumThreads(1)  # parallelism comes from the pool; OpenCV's own threads would oversubscribe the cores
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque(pool.submit(_decode_one, i, item, load) for i, item in islice(it, lookahead))
        while pending:
            yield pending.popleft().result()
            for i, item in islice(it, 1):
                pending.append(pool.submit(_decode_one, i, item, load))
