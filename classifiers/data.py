"""Feature caches for stage two: finding them, sizing reads to a memory budget, reducing rows block by block.

Every file access goes through `features.store` (which owns the format and refuses missing, incomplete, foreign or
damaged files in one line); this module decides which caches and rows, and how many rows fit the budget, so a
spatial map larger than RAM is never held whole.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from classifiers.reduce import ReduceSpec
from features import store
from features.errors import UsageError, did_you_mean
from features.store import Cache, cache_dir

# A block read costs: stored rows + selected copy + float32 cast + reduced output; keep it under budget / READ_SHARE.
READ_SHARE = 8
# A streamed head's batch costs more: the block, its shuffled copy, the standardised copy and the float64 copy the
# linear models make (about 6x the block, measured in tests/test_classify_stream.py): keep it under budget / 32.
STREAM_SHARE = 32
# Heads that hold the matrix (scaling copies, CV splits, float64 solvers) need about this many times its size.
IN_MEMORY_FACTOR = 8
# A shuffled pass over a RowStream reads runs of contiguous rows in random order and mixes SHUFFLE_BLOCKS blocks' worth
# of them at a time: at least RUNS_PER_BUFFER runs per buffer and MIN_RUNS runs per stream, so that even a class-sorted
# cache (extraction writes class folders in path order) gives batches drawn from across the whole file, as an
# in-memory shuffle does. The buffer is the only block-sized copy of a pass: batches are at most a block and each is
# copied on its own, so four blocks (and the previous buffer, until it is let go) stay within STREAM_SHARE's margin.
SHUFFLE_BLOCKS = 4
RUNS_PER_BUFFER = 128
MIN_RUNS = 256
# A run shorter than an HDF5 chunk still reads (and checksums) the whole chunk: runs are kept long enough that a
# shuffled pass reads at most this many times the chunks of an ordered one, unless the stream is under MIN_RUNS chunks.
MAX_READ_FACTOR = 4


def open_cache(path: str | Path) -> Cache:
    """`features.store.open_cache`, plus stage two's own check that augmented views cannot leak into evaluation."""
    cache = store.open_cache(path)
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


def find_caches(spec: str | None, root: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """FEATURES -> cache paths, plus notes on what was passed over.

    `spec` is one file, a comma-separated list, or a glob; None takes every complete `*.h5` under `root` (default: the
    cache folder); incomplete ones are noted and skipped; named ones are checked by `open_cache`, which refuses them.
    """
    root = cache_dir() if root is None else root
    notes: list[str] = []
    if spec is None:
        found = sorted(Path(root).glob("*.h5"))
        attrs = {p: store.read_attrs(p) for p in found}
        paths = [p for p in found if attrs[p] and attrs[p].complete]
        partial = sorted(p.with_name(p.name[1:-len(".partial")]) for p in Path(root).glob(".*.h5.partial"))
        notes += [f"skipped incomplete cache {str(p)!r} (rerun its `make extract` to finish it)"
                  for p in sorted(set(partial) - set(found))]
        notes += [f"skipped {str(p)!r}: not a complete cache of this version (name it in FEATURES to see why)"
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
    generation: str | None = None  # the version of the file planned with: a replaced file is refused, never mixed
    chunk_rows: int = 1  # rows per HDF5 chunk of the layer (what one read costs at least), for the shuffled runs

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.dim

    def take(self, positions: np.ndarray) -> "RowStream":
        return dataclasses.replace(self, rows=self.rows[positions])

    @property
    def buffer_rows(self) -> int:
        """Rows a shuffled pass mixes at a time."""
        return SHUFFLE_BLOCKS * self.block_rows

    @property
    def run_rows(self) -> int:
        """Rows per read of a shuffled pass: short enough for RUNS_PER_BUFFER runs per buffer and MIN_RUNS per
        stream, long enough that the chunks read stay under MAX_READ_FACTOR times an ordered pass's; whole chunks or
        equal parts of one, so that no run straddles two chunks."""
        chunk, most = self.chunk_rows, -(-len(self.rows) // MIN_RUNS)
        run = max(1, min(self.buffer_rows // RUNS_PER_BUFFER, most), min(most, -(-chunk // MAX_READ_FACTOR)))
        return run // chunk * chunk if run >= chunk else chunk // (chunk // run)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions into `rows`, reduced float32 rows): in file order, in blocks of `block_rows`; or, with `rng`,
        in buffers of about `buffer_rows` rows for the caller to mix (`iter_batches`), each made of runs of `run_rows`
        contiguous rows from all over the file: the runs in file order are cut into as many equal strata as a buffer
        holds runs, and every buffer takes one random run of each stratum.

        Why runs and not single rows: a read costs a whole HDF5 chunk, so random single rows would read the file
        hundreds of times over per pass. Why strata and not runs in plain random order: extraction writes class
        folders in path order, and a buffer of random runs still holds the classes in uneven shares (streamed `sgd`
        scored 0.894 against 0.909 in memory on a class-sorted 10k cache; docs/classify.md, "Large caches"), where a
        buffer spanning the file evenly holds them as the whole file does. The old way, whole blocks in random order,
        made each block one class (0.717 against 0.880). A stream that fits one block is read in file order and mixed
        whole by the caller, exactly like an in-memory array.
        """
        if rng is None or len(self.rows) <= self.block_rows:
            for positions, raw in store.read_blocks(self.path, self.layer, self.rows, self.block_rows, None,
                                                    self.generation):
                yield positions, self.reducer.transform(raw).astype(np.float32, copy=False)
            return
        run = self.run_rows
        runs, run_of = np.unique(self.rows // run, return_inverse=True)  # the runs in file order; each row's run
        per_buffer = max(1, round(len(runs) * self.buffer_rows / len(self.rows)))
        n_buffers = -(-len(runs) // per_buffer)
        strata = np.full(per_buffer * n_buffers, -1)
        strata[:len(runs)] = np.arange(len(runs))
        strata = rng.permuted(strata.reshape(per_buffer, n_buffers), axis=1)  # column b: the runs of buffer b
        stratum, buffer = np.nonzero(strata >= 0)
        buffer_of_run = np.empty(len(runs), np.int64)
        buffer_of_run[strata[stratum, buffer]] = buffer
        buffer_of_row = buffer_of_run[run_of]
        order = np.argsort(buffer_of_row, kind="stable")
        for picked in np.split(order, np.searchsorted(buffer_of_row[order], np.arange(1, n_buffers))):
            positions, out, filled = np.empty(len(picked), np.int64), np.empty((len(picked), self.dim), np.float32), 0
            for where, raw in store.read_blocks(self.path, self.layer, self.rows[picked], run, None,
                                                self.generation):
                positions[filled:filled + len(where)] = picked[where]
                out[filled:filled + len(where)] = self.reducer.transform(raw)
                filled += len(where)
            yield positions, out


@functools.singledispatch
def take_rows(X, positions: np.ndarray):
    """X[positions] for an array; a narrower RowStream for a stream (nothing is read)."""
    return X[positions]


@take_rows.register
def _(X: RowStream, positions: np.ndarray) -> RowStream:
    return X.take(positions)


def iter_batches(X, batch_size: int, rng: np.random.Generator | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, float32 rows) batches of an array or a RowStream; shuffled when `rng` is given. Every batch but
    the last has `batch_size` rows (for a stream at most `block_rows`, which the memory budget sized): a stream's
    blocks need not be multiples of it."""
    if isinstance(X, RowStream):
        batch_size = min(batch_size, X.block_rows)
        carry_positions, carry = np.empty(0, np.int64), np.empty((0, X.dim), np.float32)  # a part batch, not yet out
        for positions, block in X.blocks(rng):
            order = rng.permutation(len(positions)) if rng is not None else np.arange(len(positions))
            start = 0
            if len(carry):
                start = batch_size - len(carry)
                carry_positions = np.concatenate([carry_positions, positions[order[:start]]])
                carry = np.concatenate([carry, block[order[:start]]])
                if len(carry) < batch_size:
                    continue
                yield carry_positions, carry
                carry_positions, carry = carry_positions[:0], carry[:0]
            for i in range(start, len(order), batch_size):
                pick = order[i:i + batch_size]
                if len(pick) < batch_size:
                    carry_positions, carry = positions[pick], block[pick]
                    break
                yield positions[pick], block[pick]
        if len(carry):
            yield carry_positions, carry
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
        chunk = min(len(cache.labels), store.rows_per_chunk(shape, cache.dtypes[layer]))  # as the writer chunks it
        stream = RowStream(cache.path, layer, rows, reducer, dim, min(block, block_rows_for(shape, budget, STREAM_SHARE)),
                           cache.attrs.generation, chunk)
        return Loaded(stream, reducer, rows, time.perf_counter() - start, streamed=True)
    X = np.empty((len(rows), dim), dtype=np.float32)
    with tqdm(total=len(rows), desc=f"reduce {desc}", unit="img", leave=False, disable=len(rows) * row_values < 5e7) as bar:
        for positions, raw in cache.blocks(layer, rows, block):
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
        for _, raw in cache.blocks(layer, np.sort(fit_rows), block):
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
