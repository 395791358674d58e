"""Reading feature caches (docs/hdf5-schema.md) for stage two, within a memory budget.

Why here and not with the writer: stage two only reads, and it must refuse what it cannot trust (missing,
incomplete or foreign files) with one line that says what to do. Rows are read in blocks sized from the
budget and reduced block by block, so a spatial map larger than RAM is never held whole.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from classifiers.reduce import ReduceSpec
from features.errors import UsageError, did_you_mean
from features.store import cache_dir

SCHEMA_VERSION = 1
# A block read costs: stored rows + selected copy + float32 cast + reduced output; keep it under budget / READ_SHARE.
READ_SHARE = 8
# A streamed head's batch costs more: the block, its shuffled copy, the standardised copy and the float64 copy the
# linear models make (about 6x the block, measured in tests/test_classify_stream.py): keep it under budget / 32.
STREAM_SHARE = 32
# Heads that hold the matrix (scaling copies, CV splits, float64 solvers) need about this many times its size.
IN_MEMORY_FACTOR = 8


def _plain(value):
    """h5py attribute -> plain Python (bytes -> str, numpy scalars/arrays -> Python)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True, eq=False)
class Cache:
    """One complete cache file: its attributes, the per-row metadata, and the shape of each layer's rows."""

    path: Path
    attrs: dict
    shapes: dict[str, tuple[int, ...]]
    labels: np.ndarray
    label_names: list[str]
    split: np.ndarray
    paths: np.ndarray = field(repr=False)
    view: np.ndarray = field(repr=False)  # 0 = the clean view, 1.. = augmented views of a training image
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (path, reason): files not in the rows

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


def open_cache(path: str | Path) -> Cache:
    """Read and check a cache's metadata (not its features). Raises for missing, incomplete or foreign files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Feature cache {str(path)!r} does not exist. Create it with `make extract`, "
                                f"or pass FEATURES=<file.h5> of an existing cache (see `ls cache/`).")
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
        shapes = {name: tuple(int(d) for d in dset.shape[1:]) for name, dset in file["features"].items()}
        labels = file["labels"][:].astype(np.int64)
        # caches written before augmentation existed have no `view`: every row is a clean view
        view = file["view"][:].astype(np.int64) if "view" in file else np.zeros(len(labels), dtype=np.int64)
        cache = Cache(path=path, attrs=attrs, shapes=shapes, labels=labels,
                      label_names=list(file["label_names"].asstr()[:]), split=file["split"].asstr()[:].astype(str),
                      paths=file["paths"].asstr()[:].astype(str), view=view,
                      skipped=[(p.decode(), r.decode()) for p, r in file["skipped"][()]] if "skipped" in file else [])
    check_views(cache)
    return cache


def check_views(cache: Cache) -> None:
    """Augmented views must belong to labelled training images that also have a clean view (docs/hdf5-schema.md);
    anything else could leak evaluation images into training, so it is refused."""
    augmented = np.flatnonzero(cache.view > 0)
    if not len(augmented):
        return
    wrong = augmented[(cache.labels[augmented] < 0) | ~np.isin(cache.split[augmented], ["train", ""])]
    orphan = augmented[~np.isin(cache.paths[augmented], cache.paths[cache.view == 0])]
    for rows, what in ((wrong, "unlabelled or outside the 'train' split"), (orphan, "without a clean view (view 0)")):
        if len(rows):
            row = int(rows[0])
            raise UsageError(f"Feature cache {str(cache.path)!r} has {len(rows)} augmented row(s) {what}, e.g. row "
                             f"{row}: path {cache.paths[row]!r}, view {cache.view[row]}, split {cache.split[row]!r}. "
                             f"Expected augmented views of labelled training images only; re-extract it with "
                             f"`make extract ... AUGMENT=K OVERWRITE=1`.")


def _is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as file:
            return bool(file.attrs.get("complete", False))
    except OSError:
        return False


def find_caches(spec: str | None, root: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """FEATURES -> cache paths, plus notes on what was passed over.

    `spec` is one file, a comma-separated list, or a glob; None takes every complete `*.h5` under `root` (default: the
    cache folder); incomplete ones are noted and skipped; named ones are checked by `open_cache`, which refuses them.
    """
    root = cache_dir() if root is None else root
    notes: list[str] = []
    if spec is None:
        found = sorted(Path(root).glob("*.h5"))
        paths = [p for p in found if _is_complete(p)]
        notes += [f"skipped incomplete cache {str(p)!r} (rerun its `make extract` to finish it)"
                  for p in found if p not in paths]
        if not paths:
            raise UsageError(f"No complete feature caches under {str(root)!r}/. Run `make extract` first, "
                             f"or pass FEATURES=<file.h5>[,<file.h5>...] or a glob.")
        return paths, notes
    paths = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"FEATURES pattern {item!r} matches no file.")
            paths += matches
        else:
            paths.append(Path(item))
    return list(dict.fromkeys(paths)), notes


def layers_in(cache: Cache, wanted: list[str]) -> list[str]:
    """The requested layers present in this cache (all of them when none is requested)."""
    return [layer for layer in wanted if layer in cache.shapes] if wanted else list(cache.shapes)


def require_layers(caches: list[Cache], wanted: list[str]) -> None:
    """Every requested layer must exist in at least one cache; the error lists what each cache has."""
    available = sorted({layer for cache in caches for layer in cache.shapes})
    for layer in wanted:
        if layer not in available:
            raise UsageError(f"Unknown layer {layer!r}: no selected cache contains it. Layers in the caches: "
                             f"{', '.join(available)}.{did_you_mean(layer, available)}")


def block_rows_for(row_shape: tuple[int, ...], budget: int, share: int = READ_SHARE) -> int:
    """Rows per read so that a block (float32) stays under budget / share; at least one row."""
    return max(1, budget // (share * 4 * max(1, math.prod(row_shape))))


def iter_blocks(path: Path, layer: str, rows: np.ndarray, block_rows: int,
                rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions, raw rows) covering `rows` in blocks of contiguous file rows.

    `positions` index into `rows` (any order); blocks come in file order, or shuffled when `rng` is given.
    Reading contiguous ranges keeps reads sequential and aligned with the row-wise chunking of the cache.
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
            block = dset[first:last + 1]
            yield positions, block[rows[positions] - first]


@dataclass(frozen=True, eq=False)
class RowStream:
    """Reduced rows of one cache layer, read and reduced block by block: the X of streaming heads
    (`sgd`, `mlp`) when the reduced matrix does not fit the memory budget."""

    path: Path
    layer: str
    rows: np.ndarray
    reducer: object  # a fitted (or stateless) transformer: raw rows -> vectors
    dim: int
    block_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.dim

    def take(self, positions: np.ndarray) -> "RowStream":
        return RowStream(self.path, self.layer, self.rows[positions], self.reducer, self.dim, self.block_rows)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for positions, raw in iter_blocks(self.path, self.layer, self.rows, self.block_rows, rng):
            yield positions, self.reducer.transform(raw).astype(np.float32, copy=False)


@functools.singledispatch
def take_rows(X, positions: np.ndarray):
    """X[positions] for an array; a narrower RowStream for a stream (nothing is read)."""
    return X[positions]


@take_rows.register
def _(X: RowStream, positions: np.ndarray) -> RowStream:
    return X.take(positions)


def iter_batches(X, batch_size: int, rng: np.random.Generator | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, float32 rows) batches of an array or a RowStream; shuffled when `rng` is given."""
    if isinstance(X, RowStream):
        for positions, block in X.blocks(rng):
            order = rng.permutation(len(positions)) if rng is not None else np.arange(len(positions))
            for i in range(0, len(order), batch_size):
                pick = order[i:i + batch_size]
                yield positions[pick], block[pick]
        return
    X = np.asarray(X)
    order = rng.permutation(len(X)) if rng is not None else np.arange(len(X))
    for i in range(0, len(order), batch_size):
        pick = order[i:i + batch_size]
        yield pick, X[pick].astype(np.float32, copy=False)


@dataclass
class Loaded:
    """The reduced features of one (cache, layer, reduce): an array when it fits the budget, else a RowStream."""

    X: np.ndarray | RowStream
    reducer: object
    rows: np.ndarray  # file rows behind X's rows
    seconds: float
    streamed: bool


def load_reduced(cache: Cache, layer: str, spec: ReduceSpec, rows: np.ndarray, fit_rows: np.ndarray,
                 budget: int, desc: str = "") -> Loaded:
    """Reduce `rows` of `layer` once per run; learnable reductions (pca<k>) are fitted on `fit_rows` only.

    The result is an in-memory float32 matrix when IN_MEMORY_FACTOR times its size fits the budget,
    otherwise a RowStream that re-reads and reduces blocks on demand.
    """
    start = time.perf_counter()
    shape = cache.shapes[layer]
    row_values = math.prod(shape)
    reducer = spec.build()
    block = block_rows_for(shape, budget)
    if spec.components:
        block = _fit_incremental(cache, layer, spec, reducer, fit_rows, block, budget, desc)
    dim = spec.dim(shape)
    if len(rows) * dim * 4 * IN_MEMORY_FACTOR > budget:
        stream = RowStream(cache.path, layer, rows, reducer, dim, min(block, block_rows_for(shape, budget, STREAM_SHARE)))
        return Loaded(stream, reducer, rows, time.perf_counter() - start, streamed=True)
    X = np.empty((len(rows), dim), dtype=np.float32)
    with tqdm(total=len(rows), desc=f"reduce {desc}", unit="img", leave=False, disable=len(rows) * row_values < 5e7) as bar:
        for positions, raw in iter_blocks(cache.path, layer, rows, block):
            X[positions] = reducer.transform(raw)
            bar.update(len(positions))
    return Loaded(X, reducer, rows, time.perf_counter() - start, streamed=False)


def _fit_incremental(cache: Cache, layer: str, spec: ReduceSpec, reducer, fit_rows: np.ndarray, block: int,
                     budget: int, desc: str) -> int:
    """One pass of IncrementalPCA.partial_fit over the training rows; returns the block size used."""
    k, values = spec.components, math.prod(cache.shapes[layer])
    if len(fit_rows) < k:
        raise UsageError(f"Reduce {spec.name!r} needs at least {k} training images; {cache.name} has "
                         f"{len(fit_rows)}. Use a smaller k (e.g. pca{max(1, len(fit_rows) // 2)}) or a pooling reduce.")
    block = max(k, min(block, 4 * k))  # SVD cost grows with (k + block)^2: a few k rows per partial_fit
    need = 4 * (2 * k + block + 1) * values * 8  # float64 SVD input and factors of IncrementalPCA
    if need > budget:
        raise UsageError(f"Reduce {spec.name!r} on layer {layer!r} ({values} values per image) needs about "
                         f"{need / 2**30:.1f} GiB, over the memory budget of {budget / 2**30:.1f} GiB. Use a pooling "
                         f"reduce first (avg, grid2, grid4), a smaller k, or raise --memory-budget.")
    *pre, (_, pca) = reducer.steps
    pending: list[np.ndarray] = []
    with tqdm(total=len(fit_rows), desc=f"fit {spec.name} {desc}", unit="img", leave=False) as bar:
        for _, raw in iter_blocks(cache.path, layer, np.sort(fit_rows), block):
            for _, step in pre:
                raw = step.transform(raw)
            bar.update(len(raw))
            if not hasattr(pca, "components_"):  # the first partial_fit needs at least k rows
                pending.append(raw)
                if sum(map(len, pending)) < k:
                    continue
                raw, pending = np.concatenate(pending), []
            pca.partial_fit(raw)
    return block
