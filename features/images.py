"""Decode any image a real folder holds into RGB uint8 at the model's input size, or say why it cannot be used.

OpenCV does the work: it applies EXIF orientation, converts CMYK, grayscale, palette and 16-bit images to 8-bit BGR,
reads the first frame of a GIF, returns None for truncated or non-image bytes, and releases the GIL so a thread pool
decodes in parallel. We only flip BGR to RGB and resize.

Why JPEGs are decoded small: libjpeg-turbo can scale by 1/2, 1/4 or 1/8 inside the inverse DCT, which costs a
fraction of a full decode plus a resize (a 12-MP photo: ~9x faster) and averages each block like area resampling.
`decode_rgb(path, min_short)` picks the smallest such scale that keeps at least `min_short` pixels across the short
side (read from the JPEG's frame header, so before decoding); the short side does not depend on EXIF orientation,
which OpenCV applies to scaled decodes too. What remains is a shrink by less than 2x. `--resize crop` cuts the centre
square first and shrinks only it, bilinearly (area averaging from 2x): on web-size photos that costs 0.09x the decode
on one core, where area averaging of the whole image cost 0.8x, at the same 5 x 4-fold CV accuracy of a linear probe
on Lite0 features (docs/batch.md, "Input pipeline").

Why the size is read before decoding: a small file can declare a huge image (a 2.6 MB PNG of 30000x30000 zeros
decodes to 2.7 GB of pixels, 5-7 GB peak). `image_size` reads width and height from the header of every format we
decode, and an image of more than `max_pixels` is refused with a reason before any pixel is decoded.
"""
from __future__ import annotations

import os
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
T = TypeVar("T")
MAX_PIXELS = 89_478_485  # the default of --max-pixels: Pillow's MAX_IMAGE_PIXELS (a 3-channel decode of ~256 MiB)
UNDECODABLE = "not a decodable image (corrupt, truncated or another file type)"
CROP_FRACTION = 0.875  # the ImageNet convention, a data config's default: the centre crop keeps 87.5% of the short side
DCT_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
INTERPOLATION = ("crop: the centre square cut first, then linear (area where it shrinks 2x or more); stretch and "
                 "augmented crops: area when shrinking, linear when enlarging (OpenCV)")
DECODER = (f"opencv-{cv2.__version__} JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the needed short "
           "side; other formats full size; crop cuts the source before resizing")
LINEAR_BELOW = 2.0  # crop: bilinear below this shrink (every source pixel lies within one of a sample), area from it


def _interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """Area averaging where it shrinks on both axes (every source pixel counts, no aliasing); else bilinear."""
    return cv2.INTER_AREA if src_hw[0] >= dst_hw[0] and src_hw[1] >= dst_hw[1] else cv2.INTER_LINEAR


def _resize_stretch(img: np.ndarray, size: int, crop: float) -> np.ndarray:
    """The whole image to size x size (`crop` does not apply)."""
    return cv2.resize(img, (size, size), interpolation=_interpolation(img.shape[:2], (size, size)))


def crop_window(h: int, w: int, size: int, crop: float = CROP_FRACTION) -> tuple[int, int, int]:
    """(top, left, side) of the centred square of an h x w image that the centre crop keeps: what resizing the
    shorter side to size / crop and cutting size x size would keep, i.e. `crop` of the shorter side (the backbone's
    data config: 0.875 for most ImageNet models, 1.0 for models evaluated on the whole short side), rounded to whole
    source pixels (so it lies up to half a source pixel off the exact region)."""
    side = max(1, round(min(h, w) * size / round(size / crop)))
    return (h - side) // 2, (w - side) // 2, side


def _resize_crop(img: np.ndarray, size: int, crop: float) -> np.ndarray:
    """Cut the centre square, then resize only it. Resizing the whole image and cutting afterwards reads 1.7x as
    many source pixels (4:3) and, area-averaged, cost as much as the decode (docs/batch.md, "Input pipeline").

    Bilinear below a 2x shrink: its samples lie under 2 source pixels apart, so every source pixel still counts, and
    DCT-scaled decoding leaves every JPEG with a short side under 16x the needed one within 2x of the target. Area
    averaging from 2x (full-size PNGs, larger JPEGs), where bilinear would skip pixels and alias; bilinear when
    enlarging."""
    top, left, side = crop_window(*img.shape[:2], size, crop)
    square = img[top : top + side, left : left + side]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA if side >= LINEAR_BELOW * size
                      else cv2.INTER_LINEAR)


RESIZE_POLICIES: dict[str, Callable[[np.ndarray, int, float], np.ndarray]] = {  # (image, size, crop fraction)
    "crop": _resize_crop,  # keeps the aspect ratio; what the pretrained models were evaluated with
    "stretch": _resize_stretch,  # what keras.utils.image_dataset_from_directory does
}
NEEDED_SHORT: dict[str, Callable[[int, float], int]] = {  # pixels across the short side each policy resizes from
    "crop": lambda size, crop: round(size / crop),
    "stretch": lambda size, crop: size,
}


def jpeg_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOF marker), as stored (before EXIF orientation); None when the
    bytes are not a JPEG or the header is missing (such bytes are not decoded: see `decode_bgr`)."""
    data = memoryview(buf)
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # stray bytes before a marker: libjpeg skips them (with a warning) and decodes
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x00:  # a stuffed zero is no marker: stray bytes too
            pos += 2
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


def _png_size(d: memoryview) -> tuple[int, int] | None:
    if d[:8] == b"\x89PNG\r\n\x1a\n" and d[12:16] == b"IHDR":
        w, h = struct.unpack_from(">II", d, 16)
        return h, w
    return None


def _gif_size(d: memoryview) -> tuple[int, int] | None:
    """The logical screen: the canvas OpenCV draws the first frame on."""
    if d[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack_from("<HH", d, 6)
        return h, w
    return None


def _bmp_size(d: memoryview) -> tuple[int, int] | None:
    if d[:2] != b"BM":
        return None
    w, h = struct.unpack_from("<HH" if struct.unpack_from("<I", d, 14)[0] == 12 else "<ii", d, 18)  # 12: OS/2 header
    return abs(h), w  # a negative height marks a top-down bitmap


def _webp_size(d: memoryview) -> tuple[int, int] | None:
    if d[:4] != b"RIFF" or d[8:12] != b"WEBP":
        return None
    chunk = d[12:16]
    if chunk == b"VP8X":  # extended (alpha, animation): the canvas, 24-bit sizes minus one
        return int.from_bytes(d[27:30], "little") + 1, int.from_bytes(d[24:27], "little") + 1
    if chunk == b"VP8L" and d[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = struct.unpack_from("<I", d, 21)[0]
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the key frame's start code
        w, h = struct.unpack_from("<HH", d, 26)
        return h & 0x3FFF, w & 0x3FFF
    return None


def _tiff_size(d: memoryview) -> tuple[int, int] | None:
    """ImageLength and ImageWidth of the first directory (the page OpenCV decodes), of a TIFF or a BigTIFF."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(d[:2]))
    magic = struct.unpack_from(order + "H", d, 2)[0] if order else 0
    if magic not in (42, 43):
        return None
    big = magic == 43
    offset = struct.unpack_from(order + ("Q" if big else "I"), d, 8 if big else 4)[0]
    count = struct.unpack_from(order + ("Q" if big else "H"), d, offset)[0]
    sizes = {}
    for k in range(count):
        pos = offset + (8 + 20 * k if big else 2 + 12 * k)
        tag, kind = struct.unpack_from(order + "HH", d, pos)
        if tag in (256, 257) and kind in (3, 4, 16):  # SHORT, LONG, LONG8
            sizes[tag] = struct.unpack_from(order + {3: "H", 4: "I", 16: "Q"}[kind], d, pos + (12 if big else 8))[0]
            if len(sizes) == 2:
                return sizes[257], sizes[256]
    return None


HEADER_READERS = (jpeg_size, _png_size, _gif_size, _bmp_size, _webp_size, _tiff_size)


def image_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) as stored, from the header of a JPEG, PNG, GIF, BMP, WebP or TIFF; None for other or damaged
    bytes. It costs no decode, so that the pixel limit is checked before a decoder allocates anything."""
    data = memoryview(buf)
    for read in HEADER_READERS:
        try:
            hw = read(data)
        except (struct.error, IndexError):  # the header is cut short
            return None
        if hw is not None:
            return hw if hw[0] > 0 and hw[1] > 0 else None
    return None


def read_file(path: str | Path | Readable) -> np.ndarray:
    """The bytes of a regular file, or of anything with a `read()` method that returns them: an image inside a tar
    shard (`features.tars.Member`) reads itself with one pread at its offset. A file is opened non-blocking and
    checked before it is read, because reading a named pipe waits forever (`features.catalog.discover` never offers
    one; this protects every other caller). A path through a shard, `DATA/<shard>.tar/<member>` (a tar sample's row
    path under its data root), is read from the shard too, for callers that have only the path (fine-tuning)."""
    if not isinstance(path, (str, os.PathLike)):
        return path.read()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise ValueError("cannot be read (permission denied). Fix its permissions (e.g. chmod a+r) to include it."
                         ) from None
    except NotADirectoryError:  # a file on the way is no folder: perhaps a tar shard (features.tars)
        for find in INSIDE_FILES:
            source = find(Path(path))
            if source is not None:
                return source.read()
        raise
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (a named pipe, socket or device); not read")
        return np.fromfile(file, dtype=np.uint8)


class Readable(Protocol):
    """A source of image bytes other than a file path (see `read_file`)."""

    def read(self) -> np.ndarray: ...


# Finders of an image that a path names inside a file (`features.tars` adds its own when imported): path -> a
# Readable, or None when the path leads through no such file.
INSIDE_FILES: list[Callable[[Path], Readable | None]] = []


def decode_bgr(path: str | Path | Readable, min_short: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`decode_rgb` in OpenCV's BGR channel order, for callers that resize before they flip (see `load_image`)."""
    buf = read_file(path)
    if buf.size == 0:
        raise ValueError("empty file (0 bytes)")
    jpeg = jpeg_size(buf)
    hw = jpeg or image_size(buf)
    if hw is None:
        raise ValueError(UNDECODABLE)
    if hw[0] * hw[1] > max_pixels:
        raise ValueError(f"{hw[1]}x{hw[0]} is {hw[0] * hw[1]:,} pixels, more than --max-pixels {max_pixels}; not "
                         "decoded, as it could exhaust memory. Raise MAX_PIXELS (--max-pixels) to include it.")
    img = cv2.imdecode(buf, DCT_FLAGS[dct_scale(min(jpeg), min_short) if jpeg and min_short else 1])
    if img is None:
        raise ValueError(UNDECODABLE)
    return img


def decode_rgb(path: str | Path | Readable, min_short: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3): full size, or for a JPEG when `min_short` is given, the smallest DCT-scaled decode with
    at least that short side. Raises ValueError with a reason for files that are not usable images, among them
    images of more than `max_pixels` pixels (refused from their header, before decoding)."""
    return cv2.cvtColor(decode_bgr(path, min_short, max_pixels), cv2.COLOR_BGR2RGB)


def load_image(path: str | Path, size: int, resize: str, max_pixels: int = MAX_PIXELS,
               crop: float = CROP_FRACTION) -> np.ndarray:
    """RGB uint8 (size, size, 3) ready for the backbone's own preprocess_input. Resized in OpenCV's BGR order and
    flipped to RGB last: resizing treats every channel alike, so the pixels are those of resizing the RGB image,
    and the flip touches size² pixels instead of the decoded image's (a web-size photo: ~10% of its decode time)."""
    bgr = decode_bgr(path, NEEDED_SHORT[resize](size, crop), max_pixels)
    return cv2.cvtColor(RESIZE_POLICIES[resize](bgr, size, crop), cv2.COLOR_BGR2RGB)


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
