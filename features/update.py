"""Incremental extraction: when the image folder changed since a complete cache was written (same configuration
otherwise), keep the rows of unchanged files and compute only the new or changed ones.

A file is unchanged when its relative path, size and modification time (ns) match the stamp its row recorded, and its
label and split are the same. The new or changed candidates are extracted into a cache of their own (`update_path`,
resumable like any extraction). The updated cache is then written in the new folder's row order under its partial
name and published only when complete, in one of two ways:

- linked (`write_linked`, the rule): its features are a virtual dataset over the earlier version and the computed
  rows, kept beside it as hidden parts (`store.part_path`: hard links, so nothing is copied), one mapping per run of
  consecutive rows; only the per-row metadata is written. The cost is O(change) plus a few bytes a row, where a
  rewrite costs a copy of every feature (1.5 GB at 300k rows of 1280 floats). A later update links the parts its rows
  still come from; a part no version reads any more is removed when the next version is published.
- rewritten (`assemble`): kept rows copied from the old version, computed rows from their cache, into one plain file,
  where linking would not pay (`link_plan`: more than LINKED_FILES files, or rows scattered over too many runs) or the
  filesystem makes no hard links. That also compacts a linked cache into one file again.

The result equals a fresh extraction of the new folder row for row; its features are bit for bit the same with an
engine whose output for an image does not depend on its place in the batch (ONNX Runtime, checked in
tests/test_update.py); with TensorFlow on CPU a kept row may differ from a fresh one by ~1e-6, as an image's output
there depends on its batch slot.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import h5py
import numpy as np

from features.catalog import Catalog
from features.schema import CacheAttrs, DamagedCache, StaleCache
from features.store import (COPY_BLOCK_BYTES, Cache, CacheWriter, Linked, Progress, check_generation, fix_hint,
                            linked_rows, part_path, read_attrs, run_starts)

LINKED_FILES = 8  # most files an updated cache reads its rows from; one more and the update rewrites a plain file


def update_path(out: Path) -> Path:
    """Where the rows an update computes are kept until they are assembled into `out` (hidden, no .h5 suffix, so
    cache discovery never takes it for a cache of its own)."""
    return out.with_name(f".{out.name}.update")


def _keys(paths: np.ndarray | list[str], views: np.ndarray | list[int]) -> dict[tuple[str, int], int]:
    return {(str(p), int(v)): row for row, (p, v) in enumerate(zip(paths, views))}


def _label_map(old_names: list[str], new_names: list[str]) -> np.ndarray:
    """Old label index -> new label index (-2 for a class the new list lacks); index -1 (unlabelled) -> -1."""
    index = {name: i for i, name in enumerate(new_names)}
    return np.array([index.get(name, -2) for name in old_names] + [-1], np.int64)


def reusable_rows(old: Cache, catalog: Catalog) -> np.ndarray:
    """Per candidate of `catalog`: the row of `old` that holds exactly its features, or -1 when it must be computed.
    One dict lookup per candidate, then whole-array compares of stamps, splits and label names: no Python work per
    row beyond the lookup."""
    if not old.view.any() and not any(catalog.views):  # no augmented views: a row is named by its path alone
        rows: dict = dict(zip(old.paths.tolist(), range(len(old.paths))))
        keys = catalog.paths
    else:
        rows = dict(zip(zip(old.paths.tolist(), old.view.tolist()), range(len(old.paths))))
        keys = zip(catalog.paths, catalog.views or [0] * len(catalog))
    reuse = np.fromiter(map(rows.get, keys, itertools.repeat(-1)), np.int64, len(catalog))
    found = np.flatnonzero(reuse >= 0)
    if not len(found):
        return reuse
    at = reuse[found]
    stamps = np.fromiter(itertools.chain.from_iterable(catalog.stamps), np.int64, 2 * len(catalog)).reshape(-1, 2)
    stamps = stamps[found]
    splits = np.array(catalog.splits, dtype=str)[found]
    labels = np.asarray(catalog.labels, np.int64)[found]
    same = ((old.file_stamps[at] == stamps).all(axis=1) & (old.split[at] == splits)
            & (_label_map(old.label_names, catalog.label_names)[old.labels[at]] == labels))
    reuse[found[~same]] = -1
    return reuse


def computed_rows(catalog: Catalog, reuse: np.ndarray, delta: Cache | None) -> np.ndarray:
    """Per candidate of `catalog`: its row in `delta` (the computed rows), or -1 (kept, or could not be used)."""
    computed = np.full(len(catalog), -1, np.int64)
    if delta is not None:
        delta_rows = _keys(delta.paths, delta.view)  # O(change)
        views = catalog.views or [0] * len(catalog)
        for i in np.flatnonzero(reuse < 0).tolist():
            computed[i] = delta_rows.get((catalog.paths[i], views[i]), -1)  # absent: it could not be used (skipped)
    return computed


def link_plan(out: Path, old: Cache, delta: Cache | None, reuse: np.ndarray, computed: np.ndarray
              ) -> tuple[list[Linked], np.ndarray, np.ndarray] | None:
    """The rows of the updated cache as (files, source, row) for `CacheWriter.link_features`, where `reuse` and
    `computed` name each row's place in `old` and `delta`: kept rows stay where they are (`old` itself, as a part
    of its own, or the parts an earlier update linked) and computed ones are read from `delta`'s part. None where
    linking would not pay: the rows would come from more than LINKED_FILES files, or in more than
    `max_runs` runs of consecutive rows (every row changed in turn), or `old` maps its rows otherwise (a virtual merge
    of very many shards): the update then rewrites one plain file (`assemble`), which also compacts the parts."""
    linked = linked_rows(old) if old.virtual else (
        [Linked(part_path(out, old.attrs.generation), old.attrs.generation, len(old.paths))],
        np.zeros(len(old.paths), np.int64), np.arange(len(old.paths)))
    if linked is None:
        return None
    files, old_source, old_row = linked
    kept = reuse >= 0
    if delta is not None:
        files = [*files, Linked(part_path(out, delta.attrs.generation), delta.attrs.generation, len(delta.paths))]
    source = np.where(kept, old_source[np.maximum(reuse, 0)], len(files) - 1)
    row = np.where(kept, old_row[np.maximum(reuse, 0)], computed)
    used = np.unique(source)  # files no row reads any more are left out (and pruned once this is published)
    files = [files[k] for k in used.tolist()]
    source = np.searchsorted(used, source)
    runs = len(run_starts(source, row))
    return (files, source, row) if len(files) <= LINKED_FILES and runs <= max_runs(len(source)) else None


def max_runs(rows: int) -> int:
    """Most runs of consecutive rows a linked cache maps: a read of any block then meets a handful of mappings (300k
    rows with 1% new files between them: 6,000 runs, mapped in ~0.25 s; 2,000 mappings over 100k rows read in
    1.2-1.4x the time of a plain file)."""
    return 64 + rows // 16


def write_linked(out: Path, attrs: CacheAttrs, catalog: Catalog, reuse: np.ndarray, computed: np.ndarray, old: Cache,
                 delta: Cache | None, skipped: list[list[str]]) -> tuple[int, list[Linked]] | None:
    """Publish the updated cache as a linked one (`link_plan`): no feature row is copied, only the per-row metadata is
    written. Returns its rows and the files it reads them from: hard links (a second name for the same data, no copy)
    to `old` and to the update's computed rows, made before the new file is written and checked under the writer's
    lock to be the versions planned with; `old` itself is replaced only when the new file is complete (`finalize`).
    None, with nothing changed, where the plan says to rewrite or the filesystem makes no hard links."""
    out_rows = np.flatnonzero((reuse >= 0) | (computed >= 0))
    plan = link_plan(out, old, delta, reuse[out_rows], computed[out_rows])
    if plan is None:
        return None
    files, source, row = plan
    named = {part_path(out, old.attrs.generation): out}
    if delta is not None:
        named[part_path(out, delta.attrs.generation)] = delta.path
    made = []
    try:
        for part, origin in named.items():
            if any(f.path == part for f in files) and not part.exists():
                os.link(origin, part)
                made.append(part)
    except OSError:  # no hard links here (FAT, some network filesystems): the caller rewrites instead
        for part in made:
            part.unlink(missing_ok=True)
        return None
    writer = CacheWriter.create(out, attrs, {}, catalog.paths, catalog.label_names)
    try:
        for path, generation in [(out, old.attrs.generation), *((f.path, f.generation) for f in files)]:
            found = read_attrs(path)  # under the lock: the very versions the plan read, not a later update's
            if found is None or found.generation != generation:
                raise StaleCache(f"{out} was replaced (updated, overwritten or merged) while this update was "
                                 "planned; run the command again.")
        writer.link_features(files, source, row, old.shapes, old.dtypes)
        views = catalog.views or [0] * len(catalog)
        block = max(1, COPY_BLOCK_BYTES // 64)
        for lo in range(0, len(out_rows), block):
            _write_rows(writer, lo, [], catalog, views, out_rows[lo:lo + block])
        writer.finalize(Progress(rows_written=len(out_rows), files_done=len(catalog), skipped=skipped))
    finally:
        writer.close()
    return len(out_rows), files


def _write_rows(writer: CacheWriter, lo: int, features: list[np.ndarray], catalog: Catalog, views: list[int],
                idx: np.ndarray) -> None:
    """Rows `lo`.. of the writer: `features`, and the per-row metadata of candidates `idx` of `catalog`."""
    at = idx.tolist()
    writer.write(lo, features, [catalog.paths[i] for i in at], [catalog.labels[i] for i in at],
                 [catalog.splits[i] for i in at], [views[i] for i in at], [catalog.stamps[i] for i in at])


def assemble(writer: CacheWriter, catalog: Catalog, reuse: np.ndarray, computed: np.ndarray, old: Cache,
             delta: Cache | None, skipped: list[list[str]]) -> int:
    """Write every row of the updated cache, in `catalog` order, from `old` (kept rows) and `delta` (computed rows,
    `computed_rows`), then publish it; returns the number of rows.

    The output is written in blocks of about COPY_BLOCK_BYTES, each a whole number of feature chunks, with one write
    per dataset. A block's kept rows are one HDF5 read of the rows of `old` they span (rows keep their order: new files
    and removed ones only leave gaps), placed with one numpy gather (`_KeptRows`); its computed rows are read from
    `delta`. Per-row metadata comes from `catalog`, where a kept row's path, view, stamp, split and label
    name equal the old row's by `reusable_rows` (labels are thereby renumbered for the new class list), and a computed
    row's are the ones it was computed with. So the cost is a sequential copy of the features, not an open and a read
    per run of kept rows between two new files."""
    n = len(catalog)
    out = np.flatnonzero((reuse >= 0) | (computed >= 0))
    row_bytes = sum(math.prod(old.shapes[layer]) * old.dtypes[layer].itemsize for layer in writer.layers)
    chunk = max(writer.file[f"features/{layer}"].chunks[0] for layer in writer.layers) if writer.layers else 1
    block = max(1, COPY_BLOCK_BYTES // max(1, row_bytes) // chunk) * chunk
    views = catalog.views or [0] * n
    buffers = {layer: np.empty((min(block, len(out)), *old.shapes[layer]), old.dtypes[layer])
               for layer in writer.layers}
    with _KeptRows(old) as kept_rows:
        for lo in range(0, len(out), block):
            idx = out[lo:lo + block]
            kept = reuse[idx] >= 0
            features = []
            for layer in writer.layers:
                rows = buffers[layer][: len(idx)]  # one buffer per layer, refilled for every block
                if kept.any():
                    kept_rows.read_into(layer, reuse[idx[kept]], np.flatnonzero(kept), rows)
                if not kept.all():  # the few computed rows: the checked reader of `delta`
                    at = np.flatnonzero(~kept)
                    for positions, values in delta.blocks(layer, computed[idx[at]], 2 * block):
                        rows[at[positions]] = values
                features.append(rows)
            _write_rows(writer, lo, features, catalog, views, idx)
    writer.finalize(Progress(rows_written=len(out), files_done=n, skipped=skipped))
    return len(out)


class _KeptRows:
    """The features of `old`, read block by block into place: the file opened once, at the generation `old` was
    opened at; one read per block of the rows its kept rows span into a scratch buffer, then one gather (on 300k rows
    of 2.3 KiB with 1% new rows: 0.64-1.18 s of CPU, where a `read_direct` per run of consecutive rows, 3,000 calls,
    took 0.83-1.19 s). What the cache's own reader checks is checked here too (chunk checksums by HDF5, NaN/inf rows
    after each block); a block that fails is read again through `Cache.read`, whose one-line error names the rows."""

    def __init__(self, old: Cache):
        self.old = old

    def __enter__(self) -> "_KeptRows":
        self.file = h5py.File(self.old.path, "r")
        self.scratch: dict[str, np.ndarray] = {}
        try:
            check_generation(self.old.path, self.file, self.old.attrs.generation)
        except StaleCache:
            self.file.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _buffer(self, name: str, rows: int, dset: h5py.Dataset) -> np.ndarray:
        """A scratch array of at least `rows` rows, kept for the next block: no block allocates memory of its own
        (first touching memory is what a block's copy spends most on, on a VM; see COPY_BLOCK_BYTES)."""
        buffer = self.scratch.get(name)
        if buffer is None or len(buffer) < rows:
            buffer = self.scratch[name] = np.empty((rows, *dset.shape[1:]), dset.dtype)
        return buffer

    def read_into(self, layer: str, src: np.ndarray, dst: np.ndarray, out: np.ndarray) -> None:
        """out[dst] = rows `src` of `layer`; both ascending (rows keep their order), else the checked reader."""
        if len(src) > 1 and ((np.diff(src) <= 0).any() or (np.diff(dst) <= 0).any()):
            out[dst] = self.old.read(layer, src)
            return
        dset = self.file[f"features/{layer}"]
        first, stop = int(src[0]), int(src[-1]) + 1
        if stop - first > 2 * len(out):  # many removed rows in between: the checked reader, in blocks of its own
            out[dst] = self.old.read(layer, src)
            return
        scratch = self._buffer(layer, max(stop - first, len(out)), dset)
        gathered = self._buffer(f"{layer} gathered", len(out), dset)
        try:
            dset.read_direct(scratch, np.s_[first:stop], np.s_[0:stop - first])
        except OSError:
            out[dst] = self.old.read(layer, src)  # raises naming the rows whose checksum fails
            return
        out[dst] = np.take(scratch, src - first, axis=0, out=gathered[: len(src)])
        with np.errstate(all="ignore"):  # rows not filled yet hold anything; only the kept ones are looked at
            sums = out.reshape(len(out), -1).sum(axis=1, dtype=np.float64)[dst]
        if not np.isfinite(sums).all():
            self.old.read(layer, src[~np.isfinite(sums)])  # raises naming the rows (or the missing shard files)
            raise DamagedCache(f"{self.old.path} holds NaN or inf in features/{layer}. {fix_hint(self.old.path)}")
