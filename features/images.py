"""Decode any image a real folder holds into RGB uint8 at the model's input size, or say why it cannot be used.

OpenCV does the work: it applies EXIF orientation, converts CMYK, grayscale, palette and 16-bit images to 8-bit BGR,
reads the first frame of a GIF, returns None for truncated or non-image bytes, and releases the GIL so a thread pool
decodes in parallel. We only flip BGR to RGB and resize.

Why JPEGs are decoded small: libjpeg-turbo can scale by 1/2, 1/4 or 1/8 inside the inverse DCT, which costs a
fraction of a full decode plus a resize (a 12-MP photo: ~9x faster) and averages each block like area resampling.
`decode_rgb(path, min_short)` picks the smallest such scale that keeps at least `min_short` pixels across the short
side (read from the JPEG's frame header, so before decoding); the short side does not depend on EXIF orientation,
which OpenCV applies to scaled decodes too. What remains is a shrink by less than 2x, done by area averaging as
before DCT scaling: bilinear would be 1.6x cheaper there on web-size photos, but it changed the pixels of every such
image and moved a linear probe's val accuracy on hymenoptera by one image, while area kept all 153 predictions
(docs/batch.md, "Input pipeline").
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
DCT_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
INTERPOLATION = "area when shrinking, linear when enlarging (OpenCV)"
DECODER = (f"opencv-{cv2.__version__} JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the needed short "
           "side; other formats full size")


def _interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Area averaging where it shrinks on both axes (every source pixel counts, no aliasing); else bilinear."""
    return cv2.INTER_AREA if src_hw[0] >= dst_hw[0] and src_hw[1] >= dst_hw[1] else cv2.INTER_LINEAR


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
NEEDED_SHORT: dict[str, Callable[[int], int]] = {  # pixels across the short side each policy resizes from
    "crop": lambda size: round(size / CROP_FRACTION),
    "stretch": lambda size: size,
}


def jpeg_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOF marker), as stored (before EXIF orientation); None when the
    bytes are not a JPEG or the header is missing, so the caller decodes at full size."""
    data = memoryview(buf)
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            h, w = int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (h, w) if h and w else None
        pos += 2 + length
    return None


def dct_scale(short: int, min_short: int) -> int:
    """The largest divisor in 1, 2, 4, 8 whose scaled decode (libjpeg rounds up) keeps `min_short` pixels."""
    return max((d for d in DCT_FLAGS if -(-short // d) >= min_short), default=1)


def decode_bgr(path: str | Path, min_short: int = 0) -> np.ndarray:
    """`decode_rgb` in OpenCV's BGR channel order, for callers that resize before they flip (see `load_image`)."""
    buf = np.fromfile(str(path), dtype=np.uint8)
    if buf.size == 0:
        raise ValueError("empty file (0 bytes)")
    hw = jpeg_size(buf) if min_short else None
    img = cv2.imdecode(buf, DCT_FLAGS[dct_scale(min(hw), min_short) if hw else 1])
    if img is None:
        raise ValueError("not a decodable image (corrupt, truncated or another file type)")
    return img


def decode_rgb(path: str | Path, min_short: int = 0) -> np.ndarray:
    """RGB uint8 (H, W, 3): full size, or for a JPEG when `min_short` is given, the smallest DCT-scaled decode with
    at least that short side. Raises ValueError with a reason for files that are not usable images."""
    return cv2.cvtColor(decode_bgr(path, min_short), cv2.COLOR_BGR2RGB)


def load_image(path: str | Path, size: int, resize: str) -> np.ndarray:
    """RGB uint8 (size, size, 3) ready for the backbone's own preprocess_input. Resized in OpenCV's BGR order and
    flipped to RGB last: resizing treats every channel alike, so the pixels are those of resizing the RGB image,
    and the flip touches size² pixels instead of the decoded image's (a web-size photo: ~10% of its decode time)."""
    return cv2.cvtColor(RESIZE_POLICIES[resize](decode_bgr(path, NEEDED_SHORT[resize](size)), size),
                        cv2.COLOR_BGR2RGB)


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
