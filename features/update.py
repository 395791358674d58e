"""Incremental extraction: when the image folder changed since a complete cache was written (same configuration
otherwise), keep the rows of unchanged files and compute only the new or changed ones.

A file is unchanged when its relative path, size and modification time (ns) match the stamp its row recorded, and its
label and split are the same. The new or changed candidates are extracted into a cache of their own (`update_path`,
resumable like any extraction); `assemble` then writes, in the new folder's row order, the kept rows and the new ones
into the target's partial file, which is published only when complete. The result equals a fresh extraction of the
new folder row for row; its features are bit for bit the same with an engine whose output for an image does not depend
on its place in the batch (ONNX Runtime, checked in tests/test_update.py); with TensorFlow on CPU a kept row may differ
from a fresh one by ~1e-6, as an image's output there depends on its batch slot.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from features.catalog import Catalog
from features.store import Cache, CacheWriter, Progress


def update_path(out: Path) -> Path:
    """Where the rows an update computes are kept until they are assembled into `out` (hidden, no .h5 suffix, so
    cache discovery never takes it for a cache of its own)."""
    return out.with_name(f".{out.name}.update")


def _keys(paths: np.ndarray | list[str], views: np.ndarray | list[int]) -> dict[tuple[str, int], int]:
    return {(str(p), int(v)): row for row, (p, v) in enumerate(zip(paths, views))}


def reusable_rows(old: Cache, catalog: Catalog) -> np.ndarray:
    """Per candidate of `catalog`: the row of `old` that holds exactly its features, or -1 when it must be computed."""
    rows = _keys(old.paths, old.view)
    reuse = np.full(len(catalog), -1, np.int64)
    for i, key in enumerate(zip(catalog.paths, catalog.views)):
        row = rows.get(key, -1)
        if row < 0 or tuple(old.file_stamps[row]) != catalog.stamps[i] or old.split[row] != catalog.splits[i]:
            continue
        old_label = old.label_names[old.labels[row]] if old.labels[row] >= 0 else None
        new_label = catalog.label_names[catalog.labels[i]] if catalog.labels[i] >= 0 else None
        if old_label == new_label:
            reuse[i] = row
    return reuse


def _runs(sources: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """[(source, row), ...] -> [(source, rows), ...]: consecutive rows of one source copied in one call."""
    runs: list[tuple[int, list[int]]] = []
    for source, row in sources:
        if runs and runs[-1][0] == source:
            runs[-1][1].append(row)
        else:
            runs.append((source, [row]))
    return runs


def assemble(writer: CacheWriter, catalog: Catalog, reuse: np.ndarray, old: Cache, delta: Cache | None,
             skipped: list[list[str]]) -> int:
    """Write every row of the updated cache, in `catalog` order, from `old` (kept rows) and `delta` (computed rows),
    then publish it; returns the number of rows. Labels of kept rows are renumbered for the new class list."""
    computed = _keys(delta.paths, delta.view) if delta is not None else {}
    sources = []
    for i, key in enumerate(zip(catalog.paths, catalog.views)):
        if reuse[i] >= 0:
            sources.append((0, int(reuse[i])))
        elif key in computed:
            sources.append((1, computed[key]))  # else: the file could not be used; it is in `skipped`
    relabel = np.array([catalog.label_names.index(n) if n in catalog.label_names else -1 for n in old.label_names]
                       + [-1], np.int64)  # index -1 (unlabelled) maps to the appended -1
    start = 0
    for source, rows in _runs(sources):
        for block in (old if source == 0 else delta).records(np.asarray(rows), writer.layers):
            labels = relabel[np.asarray(block.labels)].tolist() if source == 0 else block.labels
            writer.write(start, *block._replace(labels=labels))
            start += len(block.paths)
    writer.finalize(Progress(rows_written=start, files_done=len(catalog), skipped=skipped))
    return start
