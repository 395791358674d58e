"""The HDF5 feature cache (docs/hdf5-schema.md), end to end: the one place that writes, reads and checks the format.

Writing: a new cache is written under a temporary name beside its target (`.X.h5.partial`, with its progress record
`.X.h5.partial.progress.json`) and renamed to `X.h5` only once complete, so a file at the target path is always
whole. Datasets are allocated in full when the file is created and every chunk is the same size (fletcher32 adds 4
bytes to a fixed-size chunk), so a batch write rewrites chunks in place and never the file's metadata: a process
killed at any moment leaves a partial file that opens, holding every batch up to the one recorded in the progress file.

Reading: `open_cache` checks a file is a complete cache of this schema and loads its per-row metadata; `Cache.blocks`
and `Cache.read` read feature rows within a memory budget, turning a checksum mismatch or a NaN/inf row into one line
that names the rows and the fix; `verify` checks a whole file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from features.errors import UsageError
from features.lock import exclusive

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20  # h5py suggests 10 KiB - 1 MiB per chunk; readers take whole rows
MAX_ROWS_PER_CHUNK = 1024
# The writer's chunk cache per dataset: one chunk keeps the chunk a batch leaves half-filled for the next batch, and
# larger chunks (rows over 1 MiB) bypass it: a 64 MiB cache made 2 MiB rows 1.4x slower to write (an extra copy).
WRITE_CACHE_BYTES = CHUNK_BYTES
COPY_BLOCK_BYTES = 64 << 20  # rows are copied and verified in blocks of about this size
COMPRESSIONS = ("none", "lzf")
STORAGE_DTYPES = ("float16", "float32")
PER_ROW = ("paths", "labels", "split", "view", "file_stamp")
# Attributes that must match for a file to be resumed or reused as is.
IDENTITY_ATTRS = ("backbone", "backbone_file_sha256", "weights", "image_size", "resize", "decoder", "interpolation",
                  "preprocessing", "pool", "dtype", "compression", "precision", "layers", "source_fingerprint",
                  "shard", "num_candidates", "augment", "augment_policy", "augment_seed", "engine")


def cache_dir() -> Path:
    """Where caches go unless --out says otherwise: $FEATURE_CACHE_DIR, else cache/ in the working directory."""
    return Path(os.environ.get("FEATURE_CACHE_DIR") or "cache")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rows_per_chunk(row_shape: tuple[int, ...], dtype: str) -> int:
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(np.clip(CHUNK_BYTES // max(row_bytes, 1), 1, MAX_ROWS_PER_CHUNK))


def partial_path(path: Path) -> Path:
    """Where the cache `path` is written until it is complete."""
    return path.with_name(f".{path.name}.partial")


def progress_path(path: Path) -> Path:
    """The progress record of the cache `path` while it is written (beside its partial file)."""
    return path.with_name(f".{path.name}.partial.progress.json")


def discard_partial(path: Path) -> None:
    """Forget an interrupted write of `path`: its partial file and progress record."""
    partial_path(path).unlink(missing_ok=True)
    progress_path(path).unlink(missing_ok=True)


def fix_hint(path: Path) -> str:
    return (f"Rebuild it: rerun the `python -m pipeline extract` that made it (its flags are in the file's config_json "
            f"attribute) with --out {path} --overwrite (make extract ... OVERWRITE=1).")


@dataclass
class Progress:
    rows_written: int = 0
    files_done: int = 0
    skipped: list[list[str]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Replace the record of cache `path` atomically (write + rename)."""
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


def _plain(value):
    """h5py attribute -> plain Python (bytes -> str, numpy scalars/arrays -> Python)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: Path) -> dict | None:
    """Root attributes of a file, or None when it cannot be read (e.g. a partial file killed during creation)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, RuntimeError):
        return None


def existing_cache(path: Path) -> dict | None:
    """The root attributes of the cache at `path`, None when nothing is there. Anything else at `path` (a folder, a
    file that is not HDF5, HDF5 without this tool's schema marker) is refused: this tool never replaces it."""
    path = Path(path)
    if not path.exists():
        return None
    refuse = (f"{path} exists and is not a feature cache of this tool ({{}}); it is never replaced, --overwrite "
              "included. Move it away or choose another output path.")
    if not path.is_file():
        raise UsageError(refuse.format("not a file"))
    if not h5py.is_hdf5(path):
        raise UsageError(refuse.format("not an HDF5 file"))
    attrs = read_attrs(path)
    if attrs is None:
        raise UsageError(refuse.format("an HDF5 file that cannot be read"))
    if "schema_version" not in attrs or "features" not in _members(path):
        raise UsageError(refuse.format("HDF5 without the schema_version attribute and features group"))
    return attrs


def _members(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return list(f)


def identity_diff(existing: dict, wanted: dict) -> list[str]:
    return [f"{k}: {existing.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_ATTRS if existing.get(k) != wanted.get(k)]


class Rows(NamedTuple):
    """Consecutive rows of a cache, every per-row dataset: what `CacheWriter.write` takes."""

    features: list[np.ndarray]  # one array per layer, in the cache's layer order
    paths: list[str]
    labels: list[int]
    splits: list[str]
    views: list[int]
    stamps: list[tuple[int, int]]  # (size, mtime_ns) of each row's file; (-1, -1) where unknown


class CacheWriter:
    """Owns one open partial cache file while an extraction or a merge writes into it."""

    def __init__(self, path: Path, file: h5py.File, layers: list[str], lock: ExitStack):
        self.path, self.file, self.layers = path, file, layers  # path: the target, published by finalize()
        self._lock = lock  # held from create/reopen until close: one writer per target

    @staticmethod
    def _claim(path: Path) -> ExitStack:
        """Take `path`'s lock (or refuse in one line naming the holder), then check under it that whatever is at
        `path` is a cache of this tool, so that publishing may replace it."""
        lock = ExitStack()
        lock.enter_context(exclusive(path))
        try:
            existing_cache(path)
        except BaseException:
            lock.close()
            raise
        return lock

    @classmethod
    def create(cls, path: Path, attrs: dict, layer_shapes: dict[str, tuple[int, ...]], paths: list[str],
               label_names: list[str]) -> "CacheWriter":
        """Start `path` anew under its partial name (an earlier partial file is discarded; `path` is untouched)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = cls._claim(path)
        discard_partial(path)
        n = len(paths)
        f = h5py.File(partial_path(path), "w", rdcc_nbytes=WRITE_CACHE_BYTES)
        f.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "complete": False, "created": utc_now()})
        dtype, compressed = attrs["dtype"], attrs["compression"] != "none"

        def per_row(name: str, row_shape: tuple[int, ...], dt, chunk_rows: int):
            return f.create_dataset(
                name, shape=(n, *row_shape), maxshape=(None, *row_shape), dtype=dt,
                chunks=(max(1, min(chunk_rows, n)), *row_shape), fletcher32=True,
                **({"compression": "lzf"} if compressed else {"dcpl": _dcpl_early()}),
            )

        for layer, shape in layer_shapes.items():
            ds = per_row(f"features/{layer}", shape, dtype, rows_per_chunk(shape, dtype))
            ds.attrs.update({"layer": layer, "shape": shape})
        f.require_group("features")
        text_rows = CHUNK_BYTES // 256
        per_row("paths", (), _fixed_utf8(paths).dtype, text_rows)
        per_row("split", (), h5py.string_dtype("utf-8", 5), text_rows)
        per_row("labels", (), "int32", text_rows)
        per_row("view", (), "int16", text_rows)
        per_row("file_stamp", (2,), "int64", text_rows)
        names = _fixed_utf8(label_names)
        f.create_dataset("label_names", data=names, chunks=(max(1, len(names)),), maxshape=(None,), fletcher32=True)
        f.flush()
        return cls(path, f, list(layer_shapes), lock)

    @classmethod
    def reopen(cls, path: Path) -> "CacheWriter":
        """Continue the partial file of `path`."""
        lock = cls._claim(path)
        try:
            f = h5py.File(partial_path(path), "r+", rdcc_nbytes=WRITE_CACHE_BYTES)
        except OSError as err:
            lock.close()
            raise UsageError(f"the half-written {partial_path(path)} changed or vanished while this run started "
                             f"({err}); run the same command again.") from None
        return cls(path, f, [str(v) for v in f.attrs["layers"]], lock)

    def write(self, row: int, features: list[np.ndarray], paths: list[str], labels: list[int], splits: list[str],
              views: list[int], stamps: list[tuple[int, int]]) -> None:
        """Write rows [row, row+n) and flush them, so a progress record saved afterwards never claims unwritten rows."""
        n = len(paths)
        for layer, values in zip(self.layers, features):
            self.file[f"features/{layer}"][row : row + n] = values
        self.file["paths"][row : row + n] = _fixed_utf8(paths, self.file["paths"].dtype.itemsize)
        self.file["labels"][row : row + n] = labels
        self.file["split"][row : row + n] = _fixed_utf8(splits, 5)
        self.file["view"][row : row + n] = views
        self.file["file_stamp"][row : row + n] = np.asarray(stamps, np.int64).reshape(n, 2)
        self.file.flush()

    def link_features(self, sources: list[tuple[Path, int]], shapes: dict[str, tuple[int, ...]],
                      dtypes: dict[str, np.dtype]) -> None:
        """features/<layer> as a virtual dataset over (file, rows) sources, named relative to the target (HDF5 looks
        for relative source files beside the virtual file, so the folder can move as a whole). Reads go to the
        sources' chunks, whose checksums are verified as usual."""
        for layer, shape in shapes.items():
            layout = h5py.VirtualLayout(shape=(sum(n for _, n in sources), *shape), dtype=dtypes[layer])
            start = 0
            for source, n in sources:
                name = os.path.relpath(source.resolve(), self.path.resolve().parent)
                layout[start : start + n] = h5py.VirtualSource(name, f"features/{layer}", shape=(n, *shape))
                start += n
            ds = self.file.create_virtual_dataset(f"features/{layer}", layout)
            ds.attrs.update({"layer": layer, "shape": shape})

    def finalize(self, progress: Progress, **attrs) -> None:
        """Trim to the rows written, record the skipped files, mark the file complete, and only then publish it
        under its target name (replacing an earlier cache there: `_claim` checked it is one). A file without rows
        is discarded instead: it would be of no use, and an earlier cache at the target stays."""
        f, n = self.file, progress.rows_written
        if n == 0:
            self.close()
            discard_partial(self.path)
            return
        for name in [f"features/{layer}" for layer in self.layers] + list(PER_ROW):
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        if "skipped" in f:
            del f["skipped"]
        text = h5py.string_dtype("utf-8")
        skipped = np.array([tuple(s) for s in progress.skipped], dtype=[("path", text), ("reason", text)])
        f.create_dataset("skipped", data=skipped)
        f.attrs.update({"num_images": n, "completed": utc_now(), **attrs})
        f.flush()
        f.attrs["complete"] = True
        f.flush()
        f.close()
        os.replace(partial_path(self.path), self.path)
        progress_path(self.path).unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Close the file and release the lock (the partial file stays, to be resumed)."""
        if self.file.id.valid:
            self.file.close()
        self._lock.close()


def _ranges(rows: np.ndarray | list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (at most 8 ranges, then a count)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not len(rows):
        return ""
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts, ends = rows[np.r_[0, breaks + 1]], rows[np.r_[breaks, len(rows) - 1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends)]
    return ", ".join(parts[:8]) + (f" and {len(parts) - 8} more ranges" if len(parts) > 8 else "")


def _scan_block(dset: h5py.Dataset, start: int, stop: int) -> list[int]:
    """Rows of [start, stop) whose chunk fails its checksum, found chunk by chunk."""
    step = dset.chunks[0] if dset.chunks else rows_per_chunk(dset.shape[1:], dset.dtype)
    bad: list[int] = []
    for lo in range(start - start % step, stop, step):
        hi = min(lo + step, dset.shape[0])
        try:
            dset[lo:hi]
        except OSError:
            bad += range(max(lo, start), min(hi, stop))
    return bad


def _read(path: Path, dset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """dset[start:stop], or one line naming the rows whose checksum fails and the fix."""
    try:
        return dset[start:stop]
    except OSError as err:
        bad = _scan_block(dset, start, stop) or list(range(start, stop))
        raise UsageError(f"{path} is damaged: rows {_ranges(bad)} of {dset.name.lstrip('/')} fail their checksum "
                         f"({err.__class__.__name__} from HDF5). {fix_hint(path)}") from None


def _nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Positions of rows holding NaN or inf: one float64 sum per row (finite values cannot overflow it)."""
    sums = block.reshape(len(block), -1).sum(axis=1, dtype=np.float64)
    return np.flatnonzero(~np.isfinite(sums))


@dataclass(frozen=True, eq=False)
class Cache:
    """One complete cache file: its attributes, the per-row metadata, and the shape of each layer's rows.
    Feature rows are read on demand (`blocks`, `read`, `records`), checked for checksum and NaN/inf."""

    path: Path
    attrs: dict
    shapes: dict[str, tuple[int, ...]]
    labels: np.ndarray
    label_names: list[str]
    split: np.ndarray
    paths: np.ndarray = field(repr=False)
    view: np.ndarray = field(repr=False)  # 0 = the clean view, 1.. = augmented views of a training image
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)
    dtypes: dict[str, np.dtype] = field(default_factory=dict, repr=False)
    file_stamps: np.ndarray | None = field(default=None, repr=False)  # (N, 2) size, mtime_ns; -1 where unknown
    path_bytes: int = 1  # width of the fixed-length `paths` strings

    @functools.cached_property
    def images(self) -> np.ndarray:
        """Image id per row: the views of one image (rows with the same path) share it, so folds can group them."""
        return np.unique(self.paths, return_inverse=True)[1]

    @functools.cached_property
    def data_id(self) -> str:
        """Identity of the labelled images behind the clean views (path, label, split), whatever views were added:
        a clean and an augmented cache of the same images share it (their source_fingerprint differs)."""
        clean = np.flatnonzero(self.view == 0)
        digest = hashlib.sha256()
        for row in clean[np.argsort(self.paths[clean], kind="stable")]:
            digest.update(f"{self.paths[row]}\0{self.labels[row]}\0{self.split[row]}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def augment(self) -> str:
        """'<policy>×<K>' for a cache with augmented views, '' for a clean one: the leaderboard's `augment`."""
        k = int(self.attrs.get("augment", 0) or 0)
        return f"{self.attrs.get('augment_policy', '')}×{k}" if k else ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def backbone(self) -> str:
        backbone = str(self.attrs.get("backbone", "?"))
        return Path(backbone).stem if backbone.endswith(".keras") else backbone

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    def block_rows(self, layer: str, block_bytes: int = COPY_BLOCK_BYTES) -> int:
        """Rows of `layer` in about `block_bytes` as stored."""
        return max(1, block_bytes // max(1, math.prod(self.shapes[layer]) * self.dtypes[layer].itemsize))

    def blocks(self, layer: str, rows: np.ndarray, block_rows: int, rng: np.random.Generator | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`read_blocks` of this cache."""
        return read_blocks(self.path, layer, rows, block_rows, rng)

    def read(self, layer: str, rows: np.ndarray | None = None, block_rows: int | None = None) -> np.ndarray:
        """Rows `rows` (any order; default all) of `layer` as one array, in the order given."""
        rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shapes[layer]), dtype=self.dtypes[layer])
        for positions, block in self.blocks(layer, rows, block_rows or self.block_rows(layer)):
            out[positions] = block
        return out

    def records(self, rows: np.ndarray | None = None, layers: list[str] | None = None,
                block_bytes: int = COPY_BLOCK_BYTES) -> Iterator[Rows]:
        """The selected rows (default all) of every per-row dataset (features of `layers`, default all), in the order
        given, in blocks of about `block_bytes`: what `copy_rows` feeds to another cache's writer."""
        rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        layers = self.layers if layers is None else layers
        row_bytes = sum(math.prod(self.shapes[layer]) * self.dtypes[layer].itemsize for layer in layers)
        step = max(1, block_bytes // max(1, row_bytes))
        for lo in range(0, len(rows), step):
            sel = rows[lo:lo + step]
            yield Rows([self.read(layer, sel) for layer in layers], self.paths[sel].tolist(),
                       self.labels[sel].tolist(), self.split[sel].tolist(), self.view[sel].tolist(),
                       self.file_stamps[sel].tolist())


def read_blocks(path: Path, layer: str, rows: np.ndarray, block_rows: int, rng: np.random.Generator | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions, raw rows) covering `rows` of the opened cache `path` in blocks of contiguous file rows.

    `positions` index into `rows` (any order); blocks come in file order, or shuffled when `rng` is given.
    Reading contiguous ranges keeps reads sequential and aligned with the row-wise chunking of the cache.
    A block whose checksum fails or that holds NaN/inf is refused in one line naming the rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    block_of = rows[order] // block_rows
    starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]]) if len(rows) else np.array([], int)
    groups = np.split(order, starts[1:]) if len(rows) else []
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    with h5py.File(path, "r") as file:
        dset = file["features"][layer]
        for positions in groups:
            first, last = rows[positions[0]], rows[positions[-1]]
            block = _read(path, dset, first, last + 1)[rows[positions] - first]
            bad = _nonfinite_rows(block)
            if len(bad):
                raise UsageError(f"{path} holds NaN or inf in rows {_ranges(rows[positions][bad])} of "
                                 f"features/{layer}. {fix_hint(path)}")
            yield positions, block


def copy_rows(source: Cache, writer: CacheWriter, start: int = 0, rows: np.ndarray | None = None) -> int:
    """Copy `rows` (default all, in the order given) of `source` into `writer` from row `start`, every per-row dataset
    and the writer's layers, verified on the way; returns the next free row."""
    for r in source.records(rows, writer.layers):
        writer.write(start, *r)
        start += len(r.paths)
    return start


def _metadata(path: Path, file: h5py.File, name: str) -> np.ndarray:
    dset = file[name]
    return _read(path, dset, 0, dset.shape[0]) if dset.shape else dset[()]


def open_cache(path: str | Path) -> Cache:
    """Read and check a cache's metadata (not its features). Raises for missing, incomplete or foreign files."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise UsageError(f"Feature cache {str(path)!r} is incomplete: its extraction was interrupted or is still "
                             f"running ({partial_path(path).name} beside it). Rerun the same `make extract` command "
                             "to finish it.")
        raise FileNotFoundError(f"Feature cache {str(path)!r} does not exist. Create it with `make extract`, "
                                f"or pass FEATURES=<file.h5> of an existing cache (see `ls {cache_dir()}/`).")
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        raise UsageError(f"{str(path)!r} is not a readable HDF5 feature cache ({err}).") from err
    with file:
        attrs = {key: _plain(value) for key, value in file.attrs.items()}
        if "features" not in file or "schema_version" not in attrs:
            raise UsageError(f"{str(path)!r} is not a feature cache: it lacks the 'features' group or the "
                             f"'schema_version' attribute (see docs/hdf5-schema.md).")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise UsageError(f"{str(path)!r} has schema_version={attrs['schema_version']}; this version reads "
                             f"schema {SCHEMA_VERSION}. Re-extract it with `make extract ... OVERWRITE=1`.")
        if not attrs.get("complete", False):
            raise UsageError(f"Feature cache {str(path)!r} is incomplete (complete=False): its extraction was "
                             f"interrupted or is still running. Rerun the same `make extract` command to finish it.")
        features = file["features"]
        labels = _metadata(path, file, "labels").astype(np.int64)
        # caches written before augmentation existed have no `view`: every row is a clean view
        view = _metadata(path, file, "view").astype(np.int64) if "view" in file else np.zeros(len(labels), np.int64)
        text = {name: np.char.decode(_metadata(path, file, name), "utf-8").astype(str)
                if file[name].dtype.kind == "S" else np.array([_plain(v) for v in _metadata(path, file, name)], str)
                for name in ("paths", "split", "label_names")}
        skipped = [(_plain(p), _plain(r)) for p, r in file["skipped"][()]] if "skipped" in file else []
        # caches written before updates existed have no `file_stamp`: their files count as unknown (never reused)
        stamps = (_metadata(path, file, "file_stamp").astype(np.int64) if "file_stamp" in file
                  else np.full((len(labels), 2), -1, np.int64))
        return Cache(path=path, attrs=attrs, shapes={k: tuple(int(d) for d in v.shape[1:]) for k, v in features.items()},
                     labels=labels, label_names=text["label_names"].tolist(), split=text["split"],
                     paths=text["paths"], view=view, skipped=skipped, file_stamps=stamps,
                     dtypes={k: v.dtype for k, v in features.items()}, path_bytes=file["paths"].dtype.itemsize)


@dataclass
class Damage:
    """What `verify` found wrong in one dataset."""

    dataset: str
    checksum_rows: list[int] = field(default_factory=list)
    nonfinite_rows: list[int] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"rows {_ranges(self.checksum_rows)} fail their checksum"] if self.checksum_rows else []
        parts += [f"rows {_ranges(self.nonfinite_rows)} hold NaN or inf"] if self.nonfinite_rows else []
        return f"{self.dataset}: {'; '.join(parts)}"


@dataclass
class Verified:
    path: Path
    rows: int
    damage: list[Damage]
    unchecked: list[str]  # datasets written without checksums (virtual datasets are checked through their sources)


def verify(path: str | Path, block_bytes: int = COPY_BLOCK_BYTES) -> Verified:
    """Read every row of every per-row dataset, checking chunk checksums and (features) NaN/inf; refuses what
    `open_cache` refuses, except damaged metadata, which is reported like damaged features."""
    path = Path(path)
    if not path.exists():
        open_cache(path)  # missing or partial: the usual one line
    damage, unchecked = [], []
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        raise UsageError(f"{str(path)!r} is not a readable HDF5 feature cache ({err}).") from err
    with file:
        if "schema_version" not in file.attrs or "features" not in file:
            open_cache(path)  # the usual refusal of a foreign file
        names = [f"features/{k}" for k in file["features"]] + [k for k in PER_ROW + ("label_names",) if k in file]
        n = 0
        for name in names:
            dset = file[name]
            if not (dset.fletcher32 or dset.is_virtual):
                unchecked.append(name)
            found = Damage(name)
            step = max(1, block_bytes // max(1, dset.dtype.itemsize * math.prod(dset.shape[1:])))
            for lo in range(0, dset.shape[0], step):
                hi = min(lo + step, dset.shape[0])
                try:
                    block = dset[lo:hi]
                except OSError:
                    found.checksum_rows += _scan_block(dset, lo, hi)
                    continue
                if name.startswith("features/"):
                    found.nonfinite_rows += (lo + _nonfinite_rows(block)).tolist()
            n = max(n, dset.shape[0])
            if found.checksum_rows or found.nonfinite_rows:
                damage.append(found)
    if not damage:
        open_cache(path)  # complete, this schema
    return Verified(path, n, damage, unchecked)
