"""Fabricate small caches through the real writer, for tests and examples that need no backbone.

Why in the package: the tests of both stages and anyone trying stage two without images can build a cache
with a known answer (e.g. linearly separable classes) in milliseconds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from features.schema import CacheAttrs
from features.store import CacheWriter, Progress

def separable(n_per_class: int, n_classes: int, dim: int, seed: int = 0, spread: float = 0.3
              ) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs around random unit centres: any sane linear head scores 1.0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) / 3
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(len(y), dim)) / np.sqrt(dim)
    return X.astype(np.float32), y


def with_views(X: np.ndarray, labels: np.ndarray, split: np.ndarray | None = None, k: int = 2,
               noise: float = 0.05, seed: int = 0) -> dict:
    """The rows of an augmented cache made from clean rows: each training image (split 'train', or every labelled
    row without splits) is followed by `k` views = the clean row plus Gaussian noise of scale `noise` (relative to
    the row's norm). Returns the keyword arguments of `write_cache` (`layers` under 'X').

    >>> rows = with_views(np.eye(2, dtype=np.float32), np.array([0, 1]), k=2)
    >>> rows["view"].tolist(), rows["paths"][:3]
    ([0, 1, 2, 0, 1, 2], ['class0/img00000.jpg', 'class0/img00000.jpg', 'class0/img00000.jpg'])
    """
    labels = np.asarray(labels)
    split = np.asarray(split if split is not None else [""] * len(labels), dtype=str)
    names = [f"class{i}" for i in range(int(labels.max()) + 1)]
    paths = [f"{split[i] + '/' if split[i] else ''}{names[labels[i]] if labels[i] >= 0 else 'x'}/img{i:05d}.jpg"
             for i in range(len(labels))]
    trained = (labels >= 0) & ((split == "train") | ~np.isin(split, ["val", "test"]))
    source = np.repeat(np.arange(len(labels)), np.where(trained, k + 1, 1))
    view = np.concatenate([np.arange(k + 1) if t else [0] for t in trained]).astype(np.int16)
    rng = np.random.default_rng(seed)
    scale = noise * np.linalg.norm(X.reshape(len(X), -1), axis=1)[source] / np.sqrt(X[0].size)
    jitter = rng.normal(size=(len(source),) + X.shape[1:]) * scale.reshape((-1,) + (1,) * (X.ndim - 1))
    rows = X[source] + np.where((view > 0).reshape(jitter.shape[:1] + (1,) * (X.ndim - 1)), jitter, 0)
    return {"X": rows.astype(np.float32), "labels": labels[source], "split": split[source],
            "paths": [paths[i] for i in source], "view": view, "augment": k, "augment_policy": "toy"}


def write_cache(path: str | Path, layers: dict[str, np.ndarray], labels: np.ndarray,
                label_names: list[str] | None = None, split: list[str] | np.ndarray | None = None,
                paths: list[str] | None = None, view: np.ndarray | None = None, complete: bool = True,
                **attrs) -> Path:
    """Write `layers` (name -> (N, ...) array or np.memmap) and per-row metadata through the real `CacheWriter`;
    `view` (0 = clean, 1.. = augmented) defaults to all clean rows; `attrs` override the schema's example values
    (a fictitious backbone, `CacheAttrs.example`). With
    `complete=False` the rows are written but the file is left unpublished, as an interrupted extraction leaves it."""
    path = Path(path)
    labels = np.asarray(labels, dtype=np.int32)
    n = len(labels)
    label_names = label_names or [f"class{i}" for i in range(int(labels.max()) + 1 if n and labels.max() >= 0 else 0)]
    split = np.asarray(split if split is not None else [""] * n, dtype=str)
    paths = paths or [f"{split[i] + '/' if split[i] else ''}{label_names[labels[i]] if labels[i] >= 0 else 'x'}"
                      f"/img{i:05d}.jpg" for i in range(n)]
    view = np.zeros(n, np.int16) if view is None else np.asarray(view, dtype=np.int16)
    meta = dataclasses.replace(CacheAttrs.example(**attrs), layers=list(layers), num_candidates=n)
    if meta.config_json == CacheAttrs.example().config_json:  # not given: say what a fictitious run was asked
        meta = dataclasses.replace(meta, config_json=json.dumps({"backbone": meta.backbone, "data": meta.data_root,
                                                                 "layer": list(layers), "pool": meta.pool,
                                                                 "dtype": meta.dtype}))
    writer = CacheWriter.create(path, meta, {name: values.shape[1:] for name, values in layers.items()}, paths,
                                label_names)
    try:
        step = max(1, min(1024, (1 << 20) // max(1, sum(v[0].nbytes for v in layers.values())))) if n else 1
        for start in range(0, n, step):  # block by block, so a np.memmap larger than RAM can be written
            stop = min(n, start + step)
            writer.write(start, [values[start:stop] for values in layers.values()], paths[start:stop],
                         labels[start:stop].tolist(), split[start:stop].tolist(), view[start:stop].tolist(),
                         [(-1, -1)] * (stop - start))
        if complete:
            writer.finalize(Progress(rows_written=n, files_done=n))
    finally:
        writer.close()
    return path
