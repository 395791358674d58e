"""Deterministic augmented views of one image: a named policy plus a seed derived from (seed, path, view).

Why seeded per (seed, path, view) and not from a running generator: a view is then the same whichever process,
shard, batch or resumed run makes it, so a cache of augmented views resumes to identical contents and a fine-tune
epoch can be replayed. View 0 is always the clean view (the stage-one resize); views 1.. are augmented.

>>> import numpy as np
>>> img = np.full((120, 160, 3), 100, np.uint8)
>>> augment_view(img, 64, "standard", seed=0, path="a.jpg", view=1).shape
(64, 64, 3)
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from features.errors import UsageError
from features.images import (CROP_FRACTION, MAX_PIXELS, NEEDED_SHORT, RESIZE_POLICIES, Readable, _interpolation,
                             decode_rgb)


@dataclass(frozen=True)
class AugmentPolicy:
    """A documented set of random transforms. `scale` bounds the crop's share of the image area; `rotate` is the
    largest rotation in degrees; `jitter` the largest relative change of brightness, contrast and saturation."""

    name: str
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    rotate: float = 0.0
    jitter: float = 0.0
    summary: str = ""

    def min_short(self, size: int, crop: float = CROP_FRACTION) -> int:
        """Pixels the decoded image needs across its short side so that the smallest crop this policy can draw
        (area share scale[0], the most extreme aspect) still spans `size` pixels: the JPEG decoder may shrink to it."""
        if self.scale == (1.0, 1.0):
            return NEEDED_SHORT["crop"](size, crop)
        return math.ceil(size / math.sqrt(self.scale[0] * min(self.ratio[0], 1 / self.ratio[1])))


AUGMENT_POLICIES: dict[str, AugmentPolicy] = {}


def register_policy(policy: AugmentPolicy) -> AugmentPolicy:
    AUGMENT_POLICIES[policy.name] = policy
    return policy


register_policy(AugmentPolicy("standard", scale=(0.35, 1.0), rotate=10.0, jitter=0.2,
                              summary="random resized crop (35-100% of the area, aspect 3/4-4/3), horizontal flip, "
                                      "rotation up to ±10°, brightness/contrast/saturation jitter ±20%"))
register_policy(AugmentPolicy("light", scale=(0.6, 1.0), summary="random resized crop (60-100% of the area), "
                                                                 "horizontal flip"))
register_policy(AugmentPolicy("flip", summary="centre crop as the clean view, horizontal flip only"))


def get_policy(name: str) -> AugmentPolicy:
    if name not in AUGMENT_POLICIES:
        raise UsageError(f"augment policy '{name}' is not valid. Expected one of: {', '.join(AUGMENT_POLICIES)}.")
    return AUGMENT_POLICIES[name]


def view_rng(seed: int, path: str, view: int) -> np.random.Generator:
    """The generator of one view: a function of (seed, relative path, view index) only."""
    digest = hashlib.sha256(f"{seed}\0{path}\0{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _crop_box(h: int, w: int, policy: AugmentPolicy, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area share in `scale` and aspect in `ratio` (as torchvision
    RandomResizedCrop); the full image when the policy does not crop."""
    if policy.scale == (1.0, 1.0):
        return 0, 0, h, w
    for _ in range(10):
        area = h * w * rng.uniform(*policy.scale)
        aspect = math.exp(rng.uniform(math.log(policy.ratio[0]), math.log(policy.ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    brightness, contrast, saturation = rng.uniform(1 - amount, 1 + amount, size=3)
    x = img.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * saturation + gray[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment(img: np.ndarray, size: int, policy: AugmentPolicy, rng: np.random.Generator,
            crop: float = CROP_FRACTION) -> np.ndarray:
    """Full-size RGB uint8 -> one augmented (size, size, 3) uint8 view; a policy that does not crop at random takes
    the clean view's centre crop (`crop` of the short side)."""
    if policy.scale == (1.0, 1.0):
        out = RESIZE_POLICIES["crop"](img, size, crop)
    else:
        top, left, ch, cw = _crop_box(*img.shape[:2], policy, rng)
        crop = img[top:top + ch, left:left + cw]
        out = cv2.resize(crop, (size, size), interpolation=_interpolation((ch, cw), (size, size)))
    if policy.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if policy.rotate:
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-policy.rotate, policy.rotate), 1.0)
        out = cv2.warpAffine(np.ascontiguousarray(out), matrix, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    if policy.jitter:
        out = _jitter(out, policy.jitter, rng)
    return np.ascontiguousarray(out)


def augment_view(img: np.ndarray, size: int, policy: str, seed: int, path: str, view: int,
                 crop: float = CROP_FRACTION) -> np.ndarray:
    """View `view` (>= 1) of the image at relative `path`: the same pixels on every run."""
    return augment(img, size, get_policy(policy), view_rng(seed, path, view), crop)


def view_loader(size: int, resize: str, crop: float, policy: str, seed: int, view: int
                ) -> Callable[[str, np.ndarray], np.ndarray]:
    """(relative path, full-size RGB) -> view `view` of it: the clean stage-one resize for view 0 (its centre crop
    keeps `crop` of the short side: the backbone's data config), else augmented."""
    if view == 0:
        return lambda path, img: RESIZE_POLICIES[resize](img, size, crop)
    get_policy(policy)
    return lambda path, img: augment_view(img, size, policy, seed, path, view, crop)


def file_loader(size: int, resize: str, crop: float, policy: str, seed: int, view: int,
                max_pixels: int = MAX_PIXELS) -> Callable[[str, Path | Readable], np.ndarray]:
    """(relative path, file or image in a tar shard) -> view `view` of it, decoded no larger than the view needs
    (see decode_rgb):
    augmented views keep enough pixels for the policy's smallest crop, so a crop is never upsampled for want of them.
    Images of more than `max_pixels` pixels raise ValueError without being decoded."""
    load = view_loader(size, resize, crop, policy, seed, view)
    need = NEEDED_SHORT[resize](size, crop) if view == 0 else get_policy(policy).min_short(size, crop)
    return lambda path, file: load(path, decode_rgb(file, need, max_pixels))
