"""The data audit on real photos with planted problems: re-encoded, resized copies across splits and flipped labels.

A copy of 20 images per class and split of data/hymenoptera-small gets 5 train images copied into val (90% size,
JPEG quality 80: what a scraper's second download looks like) and 5 train images moved to the other class.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2

PER_CLASS = 20
PLANTED = 5


def planted_copy(source: Path, target: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Copy a subset of `source` into `target` and plant problems; returns (duplicate pairs, flipped paths),
    paths relative to `target`."""
    classes = sorted(p.name for p in (source / "train").iterdir())
    for split in ("train", "val"):
        for name in classes:
            (target / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).iterdir())[:PER_CLASS]:
                shutil.copy(path, target / split / name / path.name)
    duplicates, flips = [], []
    for i in range(PLANTED):
        name = classes[i % 2]
        original = sorted((target / "train" / name).iterdir())[i]
        image = cv2.imread(str(original))
        smaller = cv2.resize(image, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA)
        copy = target / "val" / name / f"dup_{original.stem}.jpg"
        cv2.imwrite(str(copy), smaller, [cv2.IMWRITE_JPEG_QUALITY, 80])
        duplicates.append((f"train/{name}/{original.name}", f"val/{name}/{copy.name}"))
    for i in range(PLANTED):
        name, other = classes[i % 2], classes[1 - i % 2]
        moved = sorted((target / "train" / name).iterdir())[-1 - i]
        shutil.move(moved, target / "train" / other / moved.name)
        flips.append(f"train/{other}/{moved.name}")
    return duplicates, flips
