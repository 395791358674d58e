"""The HDF5 feature cache (docs/hdf5-schema.md): pre-allocated, written batch by batch, resumable, crash-safe.

Uncompressed datasets are allocated in full when the file is created, so a batch write touches raw bytes only and
never the file's metadata: a process killed at any moment leaves a file that opens, holding every batch up to the one
recorded in the progress file. The progress file is replaced atomically after each flushed batch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20  # h5py suggests 10 KiB - 1 MiB per chunk; readers take whole rows
MAX_ROWS_PER_CHUNK = 1024
CHUNK_CACHE_BYTES = 64 << 20
COMPRESSIONS = ("none", "lzf")
STORAGE_DTYPES = ("float16", "float32")
# Attributes that must match for a file to be resumed or reused as is.
IDENTITY_ATTRS = ("backbone", "backbone_file_sha256", "weights", "image_size", "resize", "decoder", "preprocessing", "pool",
                  "dtype", "compression", "precision", "layers", "source_fingerprint", "shard", "num_candidates",
                  "augment", "augment_policy", "augment_seed", "engine")


def cache_dir() -> Path:
    """Where caches go unless --out says otherwise: $FEATURE_CACHE_DIR, else cache/ in the working directory."""
    return Path(os.environ.get("FEATURE_CACHE_DIR") or "cache")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rows_per_chunk(row_shape: tuple[int, ...], dtype: str) -> int:
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(np.clip(CHUNK_BYTES // max(row_bytes, 1), 1, MAX_ROWS_PER_CHUNK))


def progress_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress.json")


@dataclass
class Progress:
    rows_written: int = 0
    files_done: int = 0
    skipped: list[list[str]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        tmp = progress_path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, progress_path(path))

    @classmethod
    def load(cls, path: Path) -> "Progress | None":
        try:
            return cls(**json.loads(progress_path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _fixed_utf8(values: list[str], length: int | None = None) -> np.ndarray:
    """Fixed-length UTF-8 strings: written as raw bytes, unlike variable-length ones that live in a heap."""
    encoded = [v.encode("utf-8") for v in values]
    length = length or max([len(e) for e in encoded] + [1])
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", length))


def _dcpl_early():
    """Allocate all chunks at creation and never write fill values: later writes change no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def read_attrs(path: Path) -> dict | None:
    """Root attributes of an existing cache, or None when the file cannot be opened (e.g. killed during creation)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError:
        return None


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def identity_diff(existing: dict, wanted: dict) -> list[str]:
    return [f"{k}: {existing.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_ATTRS if existing.get(k) != wanted.get(k)]


class CacheWriter:
    """Owns one open cache file while an extraction writes into it."""

    def __init__(self, path: Path, file: h5py.File, layers: list[str]):
        self.path, self.file, self.layers = path, file, layers

    @classmethod
    def create(cls, path: Path, attrs: dict, layer_shapes: dict[str, tuple[int, ...]], paths: list[str],
               label_names: list[str]) -> "CacheWriter":
        path.parent.mkdir(parents=True, exist_ok=True)
        progress_path(path).unlink(missing_ok=True)
        n = len(paths)
        f = h5py.File(path, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
        f.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "complete": False, "created": utc_now()})
        dtype, compressed = attrs["dtype"], attrs["compression"] != "none"

        def per_row(name: str, row_shape: tuple[int, ...], dt, chunk_rows: int):
            return f.create_dataset(
                name, shape=(n, *row_shape), maxshape=(None, *row_shape), dtype=dt,
                chunks=(max(1, min(chunk_rows, n)), *row_shape),
                **({"compression": "lzf"} if compressed else {"dcpl": _dcpl_early()}),
            )

        for layer, shape in layer_shapes.items():
            ds = per_row(f"features/{layer}", shape, dtype, rows_per_chunk(shape, dtype))
            ds.attrs.update({"layer": layer, "shape": shape})
        text_rows = CHUNK_BYTES // 256
        per_row("paths", (), _fixed_utf8(paths).dtype, text_rows)
        per_row("split", (), h5py.string_dtype("utf-8", 5), text_rows)
        per_row("labels", (), "int32", text_rows)
        per_row("view", (), "int16", text_rows)
        f.create_dataset("label_names", data=_fixed_utf8(label_names))
        f.flush()
        return cls(path, f, list(layer_shapes))

    @classmethod
    def reopen(cls, path: Path) -> "CacheWriter":
        f = h5py.File(path, "r+", rdcc_nbytes=CHUNK_CACHE_BYTES)
        return cls(path, f, [str(v) for v in f.attrs["layers"]])

    def write(self, row: int, features: list[np.ndarray], paths: list[str], labels: list[int], splits: list[str],
              views: list[int]) -> None:
        """Write rows [row, row+n) and flush them, so a progress record saved afterwards never claims unwritten rows."""
        n = len(paths)
        for layer, values in zip(self.layers, features):
            self.file[f"features/{layer}"][row : row + n] = values
        self.file["paths"][row : row + n] = _fixed_utf8(paths, self.file["paths"].dtype.itemsize)
        self.file["labels"][row : row + n] = labels
        self.file["split"][row : row + n] = _fixed_utf8(splits, 5)
        self.file["view"][row : row + n] = views
        self.file.flush()

    def finalize(self, progress: Progress) -> None:
        """Trim to the rows written, record the skipped files, and only then mark the file complete."""
        f, n = self.file, progress.rows_written
        for name in [f"features/{layer}" for layer in self.layers] + ["paths", "labels", "split", "view"]:
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        if "skipped" in f:
            del f["skipped"]
        text = h5py.string_dtype("utf-8")
        skipped = np.array([tuple(s) for s in progress.skipped], dtype=[("path", text), ("reason", text)])
        f.create_dataset("skipped", data=skipped)
        f.attrs.update({"num_images": n, "completed": utc_now()})
        f.flush()
        f.attrs["complete"] = True
        f.flush()
        self.close()
        progress_path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
