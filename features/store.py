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

import dataclasses
import functools
import hashlib
import json
import math
import os
import stat
import uuid
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
from features.schema import (PER_ROW, SCHEMA_VERSION, SOURCE_GENERATIONS, VERSION_ATTR, CacheAttrs, DamagedCache,
                             ForeignFile, IncompleteCache, SchemaMismatch, StaleCache, backbone_label, plain)

CHUNK_BYTES = 1 << 20  # h5py suggests 10 KiB - 1 MiB per chunk; readers take whole rows
MAX_ROWS_PER_CHUNK = 1024
# The writer's chunk cache per dataset: one chunk keeps the chunk a batch leaves half-filled for the next batch, and
# larger chunks (rows over 1 MiB) bypass it: a 64 MiB cache made 2 MiB rows 1.4x slower to write (an extra copy).
WRITE_CACHE_BYTES = CHUNK_BYTES
TEXT_ROWS = CHUNK_BYTES // 256  # rows per chunk of the per-row metadata (paths, split, labels, view, file_stamp)
# rows are copied and verified in blocks of about this size: memory does not grow with the data, and a larger block
# costs more to touch for the first time than it saves in calls (an update of 100k rows took 8.4 s with 64 MiB
# blocks, 5.0 s with 8 MiB, on a VM where first touching memory costs 4-23 ms a MiB)
COPY_BLOCK_BYTES = 8 << 20
COMPRESSIONS = ("none", "lzf")
STORAGE_DTYPES = ("float16", "float32")
# Most a chunk of lzf-compressed data can shrink (runs of 264 bytes in 3): a dataset declaring more rows than its stored
# bytes could hold is refused before anything is allocated for it.
MAX_COMPRESSION = 100


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


def part_path(path: Path, generation: str) -> Path:
    """Where a complete cache whose rows the cache `path` links (an update's kept rows or computed ones, see
    features/update.py) lies: beside it, hidden and without the .h5 suffix (no discovery takes it for a cache of its
    own), named by its generation (one name per version: never written twice)."""
    return path.with_name(f".{path.name}.part-{generation}")


class Linked(NamedTuple):
    """A complete cache that a virtual cache reads rows of: its file (beside it), generation and row count."""

    path: Path
    generation: str
    rows: int


def discard_partial(path: Path) -> None:
    """Forget an interrupted write of `path`: its partial file, progress record and log of skipped files."""
    partial_path(path).unlink(missing_ok=True)
    progress_path(path).unlink(missing_ok=True)
    Progress.log_path(path).unlink(missing_ok=True)


def fix_hint(path: Path) -> str:
    return (f"Rebuild it: rerun the `python -m pipeline extract` that made it (its flags are in the file's config_json "
            f"attribute) with --out {path} --overwrite (make extract ... OVERWRITE=1).")


@dataclass
class Progress:
    """How far the partial file of cache `path` is. The record (`progress_path`, replaced after every flushed batch)
    holds the two counters only. Files skipped on the way go to a log beside it (`log_path`), appended per batch, one
    `[candidate index, path, reason]` a line (discovery's entries, which precede every candidate, with index -1), so
    saving a batch costs the same however many files were skipped before it. `skipped` holds them in memory, in
    candidate order: what `CacheWriter.finalize` records. `load` reads back only the logged entries before
    `files_done`: a run killed after appending a batch's entries but before saving its record leaves them past
    `files_done`, and they are dropped, never counted twice (`start_log` rewrites the log without them)."""

    rows_written: int = 0
    files_done: int = 0
    skipped: list[list[str]] = field(default_factory=list)

    @staticmethod
    def log_path(path: Path) -> Path:
        """The log of files skipped while cache `path` is written (beside its partial file and progress record)."""
        return path.with_name(f".{path.name}.partial.skipped.jsonl")

    def save(self, path: Path) -> None:
        """Replace the record of cache `path` atomically (write + rename). When that fails (a full disk), the previous
        record stays as it was, no temporary file is left, and the error is one line naming the record."""
        tmp = progress_path(path).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"rows_written": self.rows_written, "files_done": self.files_done}))
            os.replace(tmp, progress_path(path))
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise _write_failed(err, f"the progress record {progress_path(path)}", path) from None

    def start_log(self, path: Path) -> None:
        """Write the log of cache `path` anew (write + rename) holding exactly `skipped`, when a run starts or resumes:
        O(skipped) once per run, never per batch. Their candidate indices are all before `files_done`, so they are
        logged as -1, which every later `load` keeps."""
        log = self.log_path(path)
        tmp = log.with_suffix(".tmp")
        try:
            tmp.write_text("".join(json.dumps([-1, *item]) + "\n" for item in self.skipped))
            os.replace(tmp, log)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise _write_failed(err, f"the log of skipped files {log}", path) from None

    @classmethod
    def append_log(cls, path: Path, entries: list[tuple[int, str, str]]) -> None:
        """Append (candidate index, path, reason) entries to the log of cache `path`; one line for a failed write."""
        if not entries:
            return
        log = cls.log_path(path)
        try:
            with open(log, "a", encoding="utf-8") as file:
                file.write("".join(json.dumps([int(i), p, r]) + "\n" for i, p, r in entries))
        except OSError as err:
            raise _write_failed(err, f"the log of skipped files {log}", path) from None

    @classmethod
    def load(cls, path: Path) -> "Progress | None":
        """The record of cache `path` with the logged skipped files it counts, or None when there is no readable
        record. An older record that holds its `skipped` list itself is read as it is."""
        try:
            progress = cls(**json.loads(progress_path(path).read_text()))
            progress.skipped = [list(item) for item in progress.skipped] + cls._logged(path, progress.files_done)
        except (OSError, ValueError, TypeError):
            return None
        return progress

    @classmethod
    def _logged(cls, path: Path, files_done: int) -> list[list[str]]:
        """[path, reason] of the logged entries before candidate `files_done`; reading stops at the first entry past
        it or at a line cut short by a kill (both only ever at the end: the log is appended in candidate order)."""
        try:
            lines = cls.log_path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                index, name, reason = json.loads(line)
            except (ValueError, TypeError):
                break
            if index >= files_done:
                break
            found.append([name, reason])
        return found


def _fixed_utf8(values: list[str], length: int | None = None) -> np.ndarray:
    """Fixed-length UTF-8 strings (`length` bytes, else the longest value's): written as raw bytes, unlike
    variable-length ones that live in a heap."""
    raw = f"S{length or ''}"
    try:
        encoded = np.array(values, raw)  # ASCII, as most names are: one conversion, ~3x faster than encoding each
    except UnicodeEncodeError:
        encoded = np.array([v.encode("utf-8") for v in values], raw)
    return encoded.astype(h5py.string_dtype("utf-8", max(encoded.dtype.itemsize, 1)))


def _dcpl_early():
    """Allocate all chunks at creation and never write fill values: later writes change no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def read_attrs(path: Path) -> CacheAttrs | None:
    """The attributes of a cache or partial file of this schema, or None when they cannot be read (a partial file
    killed during creation, another schema, a foreign file)."""
    try:
        with h5py.File(path, "r") as f:
            return CacheAttrs.parse(f.attrs, str(path)) if f.attrs.get(VERSION_ATTR) == SCHEMA_VERSION else None
    except (OSError, KeyError, RuntimeError, DamagedCache):
        return None


def check_ours(path: Path) -> bool:
    """False when nothing is at `path`, True when a cache of this tool (of any schema version) is; anything else (a
    folder, a file that is not HDF5, HDF5 without this tool's schema marker) is refused: this tool never replaces it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    refuse = (f"{path} exists and is not a feature cache of this tool ({{}}); it is never replaced, --overwrite "
              "included. Move it away or choose another output path.")
    if path.is_symlink() or not path.is_file():
        raise ForeignFile(refuse.format("a link" if path.is_symlink() else "not a file"))
    if not h5py.is_hdf5(path):
        raise ForeignFile(refuse.format("not an HDF5 file"))
    try:
        with h5py.File(path, "r") as f:
            ours = VERSION_ATTR in f.attrs and isinstance(f.get("features", getlink=True), h5py.HardLink)
    except (OSError, KeyError, RuntimeError):
        raise ForeignFile(refuse.format("an HDF5 file that cannot be read")) from None
    if not ours:
        raise ForeignFile(refuse.format("HDF5 without the schema_version attribute and features group"))
    return True


def existing_cache(path: Path) -> CacheAttrs | None:
    """The attributes of the cache at `path`, None when nothing is there; a foreign file is refused (`check_ours`),
    a cache of another schema version too."""
    if not check_ours(path):
        return None
    with h5py.File(path, "r") as f:
        version = plain(f.attrs[VERSION_ATTR])
        if version != SCHEMA_VERSION:
            raise SchemaMismatch(f"{path} has schema_version={version!r}; this version reads schema {SCHEMA_VERSION}. "
                                 f"Re-extract it: the same `make extract` with OVERWRITE=1.")
        return CacheAttrs.parse(f.attrs, str(path))


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
            check_ours(path)
        except BaseException:
            lock.close()
            raise
        return lock

    @classmethod
    def create(cls, path: Path, attrs: CacheAttrs, layer_shapes: dict[str, tuple[int, ...]], paths: list[str],
               label_names: list[str]) -> "CacheWriter":
        """Start `path` anew under its partial name (an earlier partial file is discarded; `path` is untouched)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = cls._claim(path)
        discard_partial(path)
        n, path_dtype = len(paths), _fixed_utf8(paths).dtype
        if attrs.compression == "none":  # every chunk is allocated now: a full disk would fail inside HDF5
            need = _allocated_bytes(n, layer_shapes, attrs.dtype, path_dtype.itemsize)
            detail = _no_room(path.parent, 0, need)
            if detail:
                lock.close()
                raise _write_failed(detail, str(partial_path(path)), path)
        f = h5py.File(partial_path(path), "w", rdcc_nbytes=WRITE_CACHE_BYTES)
        f.attrs.update(dataclasses.replace(attrs, schema_version=SCHEMA_VERSION, complete=False, generation="",
                                           created=utc_now()).to_h5())
        dtype, compressed = attrs.dtype, attrs.compression != "none"
        for layer, shape in layer_shapes.items():
            ds = _per_row(f, f"features/{layer}", n, shape, dtype, rows_per_chunk(shape, dtype), compressed)
            ds.attrs.update({"layer": layer, "shape": shape})
        f.require_group("features")
        _per_row(f, "paths", n, (), path_dtype, TEXT_ROWS, compressed)
        _per_row(f, "split", n, (), h5py.string_dtype("utf-8", 5), TEXT_ROWS, compressed)
        _per_row(f, "labels", n, (), "int32", TEXT_ROWS, compressed)
        _per_row(f, "view", n, (), "int16", TEXT_ROWS, compressed)
        _per_row(f, "file_stamp", n, (2,), "int64", TEXT_ROWS, compressed)
        _write_label_names(f, label_names)
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
        try:
            layers = CacheAttrs.parse(f.attrs, str(partial_path(path))).layers
        except BaseException:
            f.close()
            lock.close()
            raise
        return cls(path, f, layers, lock)

    def write(self, row: int, features: list[np.ndarray], paths: list[str], labels: list[int], splits: list[str],
              views: list[int], stamps: list[tuple[int, int]]) -> None:
        """Write rows [row, row+n) and flush them, so a progress record saved afterwards never claims unwritten rows.

        Full disks: a write must not fail inside HDF5. When one does, HDF5 has already freed the old place of the chunk
        it rewrites (an lzf chunk moves whenever its size changes) and reuses it at the end of the file, so the failed
        write tears rows the progress record claims; the flush that follows writes index nodes and an end of file the
        disk does not have; and a close that fails leaves a freed file behind its id (tracebacks from finalizers, a
        segfault at exit). So the room the batch can take is checked first (`_check_room`): exact for a file-size
        limit, the free space for a full disk. A refusal writes nothing, and the partial file stays as the last flush
        left it: the rerun resumes at the progress record. A write that fails all the same (an I/O error, another
        writer filling the disk meanwhile) stops the writer at once (`_fail`)."""
        n = len(paths)
        datasets = {f"features/{layer}": self._uncached(f"features/{layer}") for layer in self.layers[:len(features)]}
        datasets.update({name: self._uncached(name) for name in PER_ROW})
        values = dict(zip(datasets, features))
        values.update(paths=_fixed_utf8(paths, datasets["paths"].dtype.itemsize), labels=labels,
                      split=_fixed_utf8(splits, 5), view=views, file_stamp=np.asarray(stamps, np.int64).reshape(n, 2))
        where = f"rows {row}-{row + n - 1} of {partial_path(self.path)}"
        self._check_room(sum(_growth(ds, row, n) for ds in datasets.values()), where)
        try:
            for name, ds in datasets.items():
                ds[row : row + n] = values[name]
            self.file.flush()
        except Exception as err:
            raise self._fail(err, where, row + n) from None

    def _uncached(self, name: str) -> h5py.Dataset:
        """Dataset `name` opened without a chunk cache: each write reaches the file, or fails, in the call that makes
        it (not later, in a finalizer), and a failed write leaves no dirty chunk for HDF5 to retry at close. As fast:
        a handle from `self.file[name]` is closed after each statement, which writes its cached chunk then."""
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_chunk_cache(0, 0, 1.0)
        return h5py.Dataset(h5py.h5d.open(self.file.id, name.encode(), dapl))

    def _check_room(self, growth: int, where: str) -> None:
        """Refuse in one line, before anything reaches HDF5, a write that could grow the file (by up to `growth`
        bytes, plus room for index nodes) past the file-size limit (RLIMIT_FSIZE, `ulimit -f`: exact) or the free
        space of its disk (as it is now: another writer may still take it before this one does)."""
        size = max(self.file.id.get_filesize(), partial_path(self.path).stat().st_size)
        detail = _no_room(self.path.parent, size, growth + (ROOM_MARGIN if growth else 0))
        if detail:
            raise _write_failed(detail, where, self.path)

    def _fail(self, err: Exception, where: str, stop: int) -> Exception:
        """After a write failed: stop writing (`_abandon`); keep the progress record if the partial file still reads
        back every chunk a resume rereads (the one holding the first unrecorded row) or the failed write touched (up
        to row `stop`), else remove the partial file and its record, so the rerun starts afresh instead of failing on
        a torn chunk. Returns the one-line error, or `err` itself when it is no I/O error."""
        self._abandon()
        if _errno(err) is None and not isinstance(err, OSError):
            return err
        record = Progress.load(self.path)
        # a close that failed leaves HDF5 holding the file, so it is not reopened here: the rerun's writes check it
        kept = record is None or getattr(self, "_close_failed", False) or self._readable(record.rows_written, stop)
        if not kept:
            discard_partial(self.path)
        return _write_failed(err, where, self.path, kept)

    def _readable(self, rows: int, stop: int) -> bool:
        """Whether the partial file opens, its attributes parse, and every per-row dataset reads back (checksums
        verified) the chunks from the one holding row `rows` to the one holding row `stop` - 1."""
        try:
            with h5py.File(partial_path(self.path), "r") as f:
                CacheAttrs.parse(f.attrs, str(partial_path(self.path)))
                for name in [f"features/{layer}" for layer in self.layers] + list(PER_ROW):
                    ds = f[name]
                    if ds.chunks is None:
                        continue
                    step = ds.chunks[0]
                    lo, hi = rows // step * step, min(ds.shape[0], -(-max(rows, stop) // step) * step)
                    if lo < hi:
                        ds[lo:hi]
            return True
        except Exception:  # noqa: BLE001  (whatever HDF5 raises, the file cannot be resumed)
            return False

    def _abandon(self) -> None:
        """Close the file without letting HDF5 write anything more to it. What HDF5 still holds for a failed write
        (index nodes pointing at chunks it could not write, the new end of file) would otherwise go to the disk at
        close, in place over what the last flush left, or fail there and leave the close half done. So its file
        descriptor is first pointed at a scratch file in memory: the close writes there, succeeds, and the disk keeps
        exactly what the last successful flush and the failed write itself left."""
        if not self.file.id.valid or getattr(self, "_close_failed", False):
            return
        try:
            fd = self.file.id.get_vfd_handle()
        except Exception:  # noqa: BLE001  (not the default sec2 driver: no descriptor to redirect)
            fd = None
        if fd is not None:
            sink = os.memfd_create("abandoned-hdf5") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_RDWR)
            os.dup2(sink, fd)
            os.close(sink)
        with _FileSizeLimitLifted():  # the scratch file takes what a file-size limit refused to the real one
            try:
                self._close_file()
            except Exception:  # noqa: BLE001  (recorded by _close_file; the failed write is what gets reported)
                pass

    def _close_file(self) -> None:
        """Close the HDF5 file once. A close that fails has freed the file all the same (HDF5 1.14 keeps the id of a
        file it freed): the id is locked, so that no finalizer closes it again."""
        fid = self.file.id
        if not fid.valid or getattr(self, "_close_failed", False):
            return
        try:
            self.file.close()
        except Exception:
            self._close_failed = True
            fid.locked = True
            raise

    def link_features(self, files: list[Linked], source: np.ndarray, row: np.ndarray,
                      shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
        """features/<layer> as a virtual dataset whose row i is row `row[i]` of the cache `files[source[i]]`: one
        mapping per run of consecutive rows of one file (a merge's shards one after the other; an update's kept rows
        and new ones, `features.update.link_plan`). The files lie beside the target and are named by their bare
        names (HDF5 looks for them beside the virtual file, so the folder can move as a whole; readers accept no
        other source). Reads go to the sources' chunks, whose checksums are verified as usual; the sources'
        generations are recorded, so a source replaced later is refused rather than read."""
        for linked in files:
            if linked.path.resolve().parent != self.path.resolve().parent:
                raise UsageError(f"a virtual merge links caches in its own folder only; {linked.path} is not beside "
                                 f"{self.path}. Merge without --virtual (a copy), or write --out beside the shards.")
        n = len(source)
        starts = run_starts(source, row)
        lengths = np.diff(np.r_[starts, n])
        for layer, shape in shapes.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.VIRTUAL)
            # NaN where a source cannot be read (missing, or more shards than the open-file limit): never zeros that
            # pass as features; every reader refuses NaN rows
            dcpl.set_fill_value(np.array([np.nan], dtypes[layer]))
            space = h5py.h5s.create_simple((n, *shape))
            sources = [h5py.h5s.create_simple((linked.rows, *shape)) for linked in files]
            name = f"features/{layer}".encode()
            for at, count in zip(starts.tolist(), lengths.tolist()):
                k = int(source[at])
                space.select_hyperslab((at, *[0] * len(shape)), (count, *shape))
                sources[k].select_hyperslab((int(row[at]), *[0] * len(shape)), (count, *shape))
                dcpl.set_virtual(space, files[k].path.name.encode(), name, sources[k])
            space.select_all()
            h5py.h5d.create(self.file.id, name, h5py.h5t.py_create(np.dtype(dtypes[layer]), logical=1), space,
                            dcpl=dcpl).close()
            self.file[name.decode()].attrs.update({"layer": layer, "shape": shape, SOURCE_GENERATIONS: [
                f"{linked.path.name}:{linked.generation}" for linked in files]})

    def finalize(self, progress: Progress, created: str | None = None) -> None:
        """Trim to the rows written, record the skipped files, mark the file complete under a new generation, and
        only then publish it under its target name (replacing an earlier cache there: `_claim` checked it is one).
        A file without rows is discarded instead: it would be of no use, and an earlier cache at the target stays.

        A full disk is refused before the first of these steps (`_check_room`, as in `write`); a step that fails all
        the same stops the writer (`_fail`). Either way nothing is published, and the partial file keeps its progress
        record: the rerun has no rows left to compute and finishes it (a failed rename leaves it complete, unnamed)."""
        f, n = self.file, progress.rows_written
        if n == 0:
            self.close()
            discard_partial(self.path)
            return
        where = f"the end (skipped files, attributes) of {partial_path(self.path)}"
        self._check_room(self._finalize_growth(progress), where)
        try:
            for name in [f"features/{layer}" for layer in self.layers] + list(PER_ROW):
                if f[name].shape[0] != n:
                    f[name].resize(n, axis=0)
            if "skipped" in f:
                del f["skipped"]
            text = h5py.string_dtype("utf-8")
            skipped = np.array([tuple(s) for s in progress.skipped], dtype=[("path", text), ("reason", text)])
            f.create_dataset("skipped", data=skipped)
            attrs = dataclasses.replace(CacheAttrs.parse(f.attrs, str(partial_path(self.path))), num_images=n,
                                        completed=utc_now(), generation=uuid.uuid4().hex)
            attrs = dataclasses.replace(attrs, created=created or attrs.created)  # kept by the complete=True update
            f.attrs.update(attrs.to_h5())
            f.flush()
            f.attrs.update(dataclasses.replace(attrs, complete=True).to_h5())
            f.flush()
            self._close_file()  # flushed: nothing is left to write
        except Exception as err:
            raise self._fail(err, where, n) from None
        try:
            os.replace(partial_path(self.path), self.path)
        except OSError as err:
            where = f"{self.path} (renaming {partial_path(self.path).name} to it)"
            raise _write_failed(err, where, self.path) from None
        progress_path(self.path).unlink(missing_ok=True)
        prune_parts(self.path)
        self.close()

    def _finalize_growth(self, progress: Progress) -> int:
        """Most bytes `finalize` can add to the file: the skipped files (strings in the global heap, twice over) and
        every attribute rewritten twice (h5py writes a new attribute before it deletes the old one)."""
        text = sum(len(str(p).encode()) + len(str(r).encode()) + 64 for p, r in progress.skipped)
        attrs = sum(len(str(plain(self.file.attrs[k])).encode()) + 64 for k in self.file.attrs)
        return 2 * text + 3 * attrs + 4096

    def close(self) -> None:
        """Close the file and release the lock (the partial file stays, to be resumed). Never raises for the file: it
        is flushed first, and should that fail (every write flushes, so it should not) it is abandoned as after a
        failed write, so the close itself cannot fail half way."""
        try:
            if self.file.id.valid and not getattr(self, "_close_failed", False):
                try:
                    self.file.flush()
                except Exception:  # noqa: BLE001  (called from `finally` blocks: the error that led here is reported)
                    self._abandon()
                else:
                    try:
                        self._close_file()
                    except Exception:  # noqa: BLE001  (as above)
                        pass
        finally:
            self._lock.close()


ROOM_MARGIN = 64 << 10  # room for index nodes and metadata blocks when a write can grow the file


def _no_room(folder: Path, size: int, need: int) -> str | None:
    """Why a file of `size` bytes in `folder` cannot grow by `need` more (the file-size limit, `ulimit -f`, exactly;
    the free space of its disk as it is now), or None."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size + need > limit:
        return f"the file-size limit is {limit} bytes; the file has {size} and may need {need} more"
    if need and (free := _free_bytes(folder)) < need:
        return f"{free} bytes are free on its disk; it may need {need}"
    return None


def _allocated_bytes(n: int, layer_shapes: dict[str, tuple[int, ...]], dtype: str, path_bytes: int) -> int:
    """What an uncompressed cache of `n` rows allocates when it is created (every chunk at once)."""
    row = sum(math.prod(shape) for shape in layer_shapes.values()) * np.dtype(dtype).itemsize
    return n * (row + path_bytes + 5 + 4 + 2 + 16)  # features, paths, split, labels, view, file_stamp


def _growth(dset: h5py.Dataset, row: int, n: int) -> int:
    """Most bytes writing rows [row, row+n) of `dset` can add to its file: none where the chunks were allocated with
    the file (rewritten in place); else every touched chunk anew, as large as uncompressed (lzf stores a chunk it
    cannot shrink as it is) with its checksum."""
    if n <= 0 or dset.chunks is None or dset.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY:
        return 0
    step = dset.chunks[0]
    touched = (row + n - 1) // step - row // step + 1
    return touched * (math.prod(dset.chunks) * dset.dtype.itemsize + 4)


def _per_row(f: h5py.File, name: str, n: int, row_shape: tuple[int, ...], dt, chunk_rows: int,
             compressed: bool) -> h5py.Dataset:
    """A per-row dataset of `n` rows that can grow, checksummed, lzf-compressed or allocated at once."""
    return f.create_dataset(
        name, shape=(n, *row_shape), maxshape=(None, *row_shape), dtype=dt,
        chunks=(max(1, min(chunk_rows, n)), *row_shape), fletcher32=True,
        **({"compression": "lzf"} if compressed else {"dcpl": _dcpl_early()}),
    )


def _write_label_names(f: h5py.File, label_names: list[str]) -> None:
    """One chunk of fixed-width strings, checksummed; none for an unlabelled cache (a chunk larger than the dataset
    needs `maxshape`)."""
    names = _fixed_utf8(label_names)
    f.create_dataset("label_names", data=names, chunks=(max(1, len(names)),), maxshape=(None,), fletcher32=True)


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return 1 << 62  # unknown: let the write tell
    return st.f_bavail * st.f_frsize


class _FileSizeLimitLifted:
    """`with _FileSizeLimitLifted():` the soft file-size limit is raised to the hard one (where the process may)."""

    def __enter__(self) -> None:
        import resource

        self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limits[1], self.limits[1]))
        except (ValueError, OSError):
            self.limits = None

    def __exit__(self, *exc) -> None:
        import resource

        if self.limits is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)


def _errno(err: BaseException) -> int | None:
    """The OS error behind an exception from a write: its errno, or the one HDF5 quotes in its message."""
    import re

    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


def _write_failed(cause: BaseException | str, where: str, path: Path, kept: bool = True) -> Exception:
    """The one line for a write into the cache `path` (its partial file, its progress record, its rename) that failed
    or was refused (`cause`: the error, or what `_check_room` found): what happened while writing what, the fix, and
    where the rerun resumes (the progress record's row, when there is one; `kept=False`: from the beginning)."""
    import errno

    from features.schema import WriteFailed

    code = None if isinstance(cause, str) else _errno(cause)
    if isinstance(cause, str) or code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        detail = cause if isinstance(cause, str) else os.strerror(code)
        head = (f"the disk is full or a file-size limit was reached ({detail}) while writing {where}: free space (or "
                "raise the limit: ulimit -f) and rerun the same command")
    else:
        detail = os.strerror(code) if code else " ".join(str(cause).split())[:300]
        head = f"writing {where} failed ({detail}): check the disk, then rerun the same command"
    record = Progress.load(path) if kept else None
    if not kept:
        tail = "; the half-written file could not be read back and was removed, so the rerun starts from the beginning"
    else:
        tail = f"; it resumes from row {record.rows_written}" if record is not None else ""
    return WriteFailed(head + tail + ".")


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
        raise DamagedCache(f"{path} is damaged: rows {_ranges(bad)} of {dset.name.removeprefix('/')} fail their "
                           f"checksum ({err.__class__.__name__} from HDF5). {fix_hint(path)}") from None


def _nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Positions of rows holding NaN or inf: one float64 sum per row (finite values cannot overflow it)."""
    sums = block.reshape(len(block), -1).sum(axis=1, dtype=np.float64)
    return np.flatnonzero(~np.isfinite(sums))


@dataclass(frozen=True, eq=False)
class Cache:
    """One complete cache file: its attributes, the per-row metadata, and the shape of each layer's rows.
    Feature rows are read on demand (`blocks`, `read`, `records`), checked for checksum and NaN/inf."""

    path: Path
    attrs: CacheAttrs
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
    virtual: bool = False  # features are virtual datasets over sibling caches (`merge --virtual`)

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
        return f"{self.attrs.augment_policy}×{self.attrs.augment}" if self.attrs.augment else ""

    @property
    def name(self) -> str:
        return self.path.stem

    @functools.cached_property
    def _stamps(self) -> dict[str, tuple[int, int]]:
        return {p: (int(size), int(mtime)) for p, (size, mtime) in zip(self.paths.tolist(), self.file_stamps)}

    def image_file(self, name: str) -> Path | None:
        """The image file of row path `name`, for a thumbnail: only the very file that was extracted (a regular file
        under the data root with the recorded size and modification time), never anything else a cache could name."""
        root, stamp = Path(self.attrs.data_root), self._stamps.get(name)
        if stamp is None or stamp[0] < 0 or not root.is_absolute() or root.parent == root:
            return None
        try:
            found = os.stat(root / name)
        except OSError:
            return None
        regular = stat.S_ISREG(found.st_mode)
        return root / name if regular and (found.st_size, found.st_mtime_ns) == stamp else None

    @property
    def backbone(self) -> str:
        return backbone_label(self.attrs.backbone)

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    def block_rows(self, layer: str, block_bytes: int = COPY_BLOCK_BYTES) -> int:
        """Rows of `layer` in about `block_bytes` as stored."""
        return max(1, block_bytes // max(1, math.prod(self.shapes[layer]) * self.dtypes[layer].itemsize))

    def blocks(self, layer: str, rows: np.ndarray, block_rows: int, rng: np.random.Generator | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`read_blocks` of this cache, of the version it was opened at."""
        return read_blocks(self.path, layer, rows, block_rows, rng, self.attrs.generation)

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


def read_blocks(path: Path, layer: str, rows: np.ndarray, block_rows: int, rng: np.random.Generator | None = None,
                generation: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (positions, raw rows) covering `rows` of the opened cache `path` in blocks of contiguous file rows.

    `positions` index into `rows` (any order); blocks come in file order, or shuffled when `rng` is given.
    Reading contiguous ranges keeps reads sequential and aligned with the row-wise chunking of the cache.
    A block whose checksum fails or that holds NaN/inf is refused in one line naming the rows, and so is a file
    whose generation is no longer `generation` (it was replaced since it was planned with).
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    block_of = rows[order] // block_rows
    starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]]) if len(rows) else np.array([], int)
    groups = np.split(order, starts[1:]) if len(rows) else []
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    with h5py.File(path, "r") as file:
        check_generation(path, file, generation)
        dset = file["features"][layer]
        for positions in groups:
            first, last = rows[positions[0]], rows[positions[-1]]
            block = _read(path, dset, first, last + 1)[rows[positions] - first]
            bad = _nonfinite_rows(block)
            if len(bad) and dset.is_virtual:
                raise DamagedCache(f"{path}: rows {_ranges(rows[positions][bad])} of features/{layer} could not be "
                                   "read from its shard files beside it (missing, unreadable, or more shards than the "
                                   "open-file limit allows). Raise the limit (ulimit -n), or merge again without "
                                   "--virtual (an updated cache: rerun its extraction with --overwrite).")
            if len(bad):
                raise DamagedCache(f"{path} holds NaN or inf in rows {_ranges(rows[positions][bad])} of "
                                   f"features/{layer}. {fix_hint(path)}")
            yield positions, block


def check_generation(path: Path, file: h5py.File, generation: str | None) -> None:
    if generation is not None and CacheAttrs.parse(file.attrs, str(path)).generation != generation:
        raise StaleCache(f"{path} was replaced (updated, overwritten or merged) while this command was reading it; "
                         "run the command again.")


def copy_rows(source: Cache, writer: CacheWriter, start: int = 0, rows: np.ndarray | None = None) -> int:
    """Copy `rows` (default all, in the order given) of `source` into `writer` from row `start`, every per-row dataset
    and the writer's layers, verified on the way; returns the next free row."""
    for r in source.records(rows, writer.layers):
        writer.write(start, *r)
        start += len(r.paths)
    return start


def _links(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(name, link) of every member, depth first, without following any link."""
    for name in group:
        link = group.get(name, getlink=True)
        yield prefix + name, link
        if isinstance(link, h5py.HardLink) and isinstance(group[name], h5py.Group):
            yield from _links(group[name], f"{prefix}{name}/")


def _outside_reads(path: Path, file: h5py.File) -> list[str]:
    """Everything in `file` that would make a reader read another file: external or soft links, external raw storage,
    and virtual sources other than the generation-pinned sibling caches a virtual merge links. One phrase each."""
    found = []
    for name, link in _links(file):
        if not isinstance(link, h5py.HardLink):
            found.append(f"{name} is a {type(link).__name__}")
            continue
        obj = file[name]
        if not isinstance(obj, h5py.Dataset):
            continue
        if obj.id.get_create_plist().get_external_count():
            found.append(f"{name} keeps its data in an external file")
        if obj.is_virtual:
            found += _virtual_problems(path, name, obj)
    return found


def _pinned(dset: h5py.Dataset) -> dict[str, str]:
    """A virtual dataset's sources as recorded when it was written: file name -> generation."""
    return dict(str(v).rsplit(":", 1) for v in plain(dset.attrs.get(SOURCE_GENERATIONS, [])) if ":" in str(v))


def _virtual_problems(path: Path, name: str, dset: h5py.Dataset) -> list[str]:
    pinned = _pinned(dset)
    problems = []
    for source in {s.file_name for s in dset.virtual_sources()}:
        sibling = path.parent / source
        if (not name.startswith("features/") or source in ("", ".", "..") or Path(source).name != source
                or source not in pinned):
            problems.append(f"{name} is virtual over {source!r}, not a cache beside it that a merge linked")
        elif not sibling.is_file():
            problems.append(f"{name} reads the shard {source!r}, which is missing beside it")
        elif (found := read_attrs(sibling)) is None or found.generation != pinned[source]:
            problems.append(f"{name} reads the shard {source!r}, which was replaced or damaged since the merge")
    return problems


def run_starts(source: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Where each run of a linked map begins: consecutive rows of one file are one run, one virtual mapping."""
    if not len(source):
        return np.array([], np.int64)
    return np.flatnonzero(np.r_[True, (np.diff(source) != 0) | (np.diff(row) != 1)])


def _run_rows(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The file rows of runs starting at file rows `firsts`, `counts` rows each, one after the other."""
    begins = np.cumsum(counts) - counts  # where each run begins in the output
    return np.repeat(np.asarray(firsts) - begins, counts) + np.arange(int(np.sum(counts)))


def concatenation(sources: list[Cache]) -> tuple[list[Linked], np.ndarray, np.ndarray]:
    """The rows of `sources` one after the other, as `CacheWriter.link_features` maps them (a virtual merge)."""
    lengths = np.array([len(source.paths) for source in sources])
    return ([Linked(s.path, s.attrs.generation, int(n)) for s, n in zip(sources, lengths)],
            np.repeat(np.arange(len(sources)), lengths), _run_rows(np.zeros(len(sources), np.int64), lengths))


def prune_parts(path: Path) -> None:
    """Remove the parts (`part_path`) of the cache `path` that it no longer reads: those of an earlier version, or of
    an update that stopped before publishing. Only complete caches of this tool under that name are removed."""
    keep: set[str] = set()
    if path.is_file():
        with h5py.File(path, "r") as file:
            for dset in file["features"].values():
                keep.update(_pinned(dset))
    prefix = f".{path.name}.part-"
    for found in path.parent.iterdir():
        if found.name.startswith(prefix) and found.name not in keep and read_attrs(found) is not None:
            found.unlink(missing_ok=True)


def linked_rows(cache: Cache) -> tuple[list[Linked], np.ndarray, np.ndarray] | None:
    """Where each row of a virtual cache's features lies: (files, source, row) with row i in row `row[i]` of
    `files[source[i]]`, as `CacheWriter.link_features` wrote it; None when the file maps anything else (layers mapped
    differently, a mapping that is not a run of whole rows, rows mapped twice or not at all), which an update then
    reads through HDF5 instead of linking again."""
    runs: list[tuple[int, str, int, int]] | None = None
    with h5py.File(cache.path, "r") as file:
        check_generation(cache.path, file, cache.attrs.generation)
        for layer in cache.layers:
            dset = file[f"features/{layer}"]
            if not dset.is_virtual:
                return None
            pinned = _pinned(dset)
            dcpl, found, sizes = dset.id.get_create_plist(), [], {}
            for i in range(dcpl.get_virtual_count()):
                space, src = dcpl.get_virtual_vspace(i), dcpl.get_virtual_srcspace(i)
                name = dcpl.get_virtual_filename(i)
                if (name not in pinned or dcpl.get_virtual_dsetname(i) != f"features/{layer}"
                        or space.get_select_type() != h5py.h5s.SEL_HYPERSLABS
                        or src.get_select_type() != h5py.h5s.SEL_HYPERSLABS
                        or space.get_select_hyper_nblocks() != 1 or src.get_select_hyper_nblocks() != 1):
                    return None
                (v0, *vrest), (v1, *vend) = space.get_select_bounds()
                (s0, *srest), (s1, *send) = src.get_select_bounds()
                full = tuple(d - 1 for d in dset.shape[1:])
                if any(vrest + srest) or tuple(vend) != full or tuple(send) != full or v1 - v0 != s1 - s0:
                    return None
                sizes[name] = max(sizes.get(name, 0), s1 + 1)  # rows it reads (HDF5 keeps no extent of its own)
                found.append((v0, name, s0, v1 - v0 + 1))
            found.sort()
            if runs is None:
                runs = found
            elif found != runs:
                return None
    if not runs:
        return None
    starts, names, rows, counts = (np.array(c) for c in zip(*runs))
    if starts[0] != 0 or (starts[1:] != (starts + counts)[:-1]).any() or (starts + counts)[-1] != len(cache.paths):
        return None
    order = list(dict.fromkeys(names.tolist()))
    files = [Linked(cache.path.parent / name, pinned[name], sizes[name]) for name in order]
    index = {name: k for k, name in enumerate(order)}
    source = np.repeat([index[name] for name in names.tolist()], counts)
    return files, source, _run_rows(rows, counts)


def _check_sizes(path: Path, file: h5py.File, n: int) -> None:
    """Every per-row dataset has `n` rows, and no dataset declares more data than its stored bytes can hold: checked
    before anything is read, so a small file declaring 10^9 rows is refused without allocating for them."""
    for name, link in _links(file):
        obj = file[name]
        if not isinstance(obj, h5py.Dataset):
            continue
        if (name.startswith("features/") or name in PER_ROW) and (not obj.shape or obj.shape[0] != n):
            raise DamagedCache(f"{path}: {name} has shape {obj.shape}, expected {n} rows (num_images). "
                               f"{fix_hint(path)}")
        if obj.is_virtual:
            continue
        declared = math.prod(obj.shape) * obj.dtype.itemsize
        stored = obj.id.get_storage_size()
        if stored * (MAX_COMPRESSION if obj.compression else 1) < declared:
            raise DamagedCache(f"{path}: {name} declares {declared} bytes of data but stores {stored}. "
                               f"{fix_hint(path)}")


def _metadata(path: Path, file: h5py.File, name: str) -> np.ndarray:
    dset = file[name]
    return _read(path, dset, 0, dset.shape[0]) if dset.shape else dset[()]


def _text(path: Path, file: h5py.File, name: str) -> np.ndarray:
    values = _metadata(path, file, name)
    if values.dtype.kind == "S":
        try:
            return values.astype(str)  # ASCII, as most names are: one cast, ~7x faster than decoding each
        except UnicodeDecodeError:
            values = values.tolist()
    return np.array([plain(v) for v in values], str)


def _open(path: Path) -> h5py.File:
    if not path.exists():
        if partial_path(path).exists():
            raise IncompleteCache(f"Feature cache {str(path)!r} is incomplete: its extraction was interrupted or is "
                                  f"still running ({partial_path(path).name} beside it). Rerun the same "
                                  "`make extract` command to finish it.")
        raise FileNotFoundError(f"Feature cache {str(path)!r} does not exist. Create it with `make extract`, "
                                f"or pass FEATURES=<file.h5> of an existing cache (see `ls {cache_dir()}/`).")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ForeignFile(f"{str(path)!r} is not a readable HDF5 feature cache ({err}).") from None


def _check_file(path: Path, file: h5py.File) -> CacheAttrs:
    """This tool's cache, of this schema, that reads nothing outside itself: its attributes, or one line."""
    if file.get("features", getlink=True) is None or VERSION_ATTR not in file.attrs:
        raise ForeignFile(f"{str(path)!r} is not a feature cache: it lacks the 'features' group or the "
                          f"'schema_version' attribute (see docs/hdf5-schema.md).")
    version = plain(file.attrs[VERSION_ATTR])
    if version != SCHEMA_VERSION:
        raise SchemaMismatch(f"{str(path)!r} has schema_version={version!r}; this version reads schema "
                             f"{SCHEMA_VERSION}. Re-extract it: the same `make extract` with OVERWRITE=1.")
    outside = _outside_reads(path, file)
    if outside:
        raise ForeignFile(f"{str(path)!r} reads data from outside its own file ({'; '.join(outside[:3])}); this tool "
                          "never writes such a file and does not read it. Re-extract the cache from its images.")
    return CacheAttrs.parse(file.attrs, repr(str(path)))


def open_cache(path: str | Path) -> Cache:
    """Read and check a cache's metadata (not its features): complete, this schema, nothing read from outside the
    file, every per-row dataset as long as the row count, labels within the label names, relative paths. Raises
    one line for missing, incomplete, foreign or damaged files."""
    path = Path(path)
    with _open(path) as file:
        attrs = _check_file(path, file)
        if not attrs.complete:
            raise IncompleteCache(f"Feature cache {str(path)!r} is incomplete (complete=False): its extraction was "
                                  "interrupted or is still running. Rerun the same `make extract` command to finish "
                                  "it.")
        _check_sizes(path, file, attrs.num_images)
        features = file["features"]
        labels = _metadata(path, file, "labels").astype(np.int64)
        view = _metadata(path, file, "view").astype(np.int64)
        text = {name: _text(path, file, name) for name in ("paths", "split", "label_names")}
        skipped = [(plain(p), plain(r)) for p, r in file["skipped"][()]] if "skipped" in file else []
        stamps = _metadata(path, file, "file_stamp").astype(np.int64)
        shapes = {k: tuple(int(d) for d in v.shape[1:]) for k, v in features.items()}
        cache = Cache(path=path, attrs=attrs, shapes=shapes,
                      labels=labels, label_names=text["label_names"].tolist(), split=text["split"],
                      paths=text["paths"], view=view, skipped=skipped, file_stamps=stamps,
                      dtypes={k: v.dtype for k, v in features.items()}, path_bytes=file["paths"].dtype.itemsize,
                      virtual=any(v.is_virtual for v in features.values()))
    _check_rows(cache)
    return cache


def _check_rows(cache: Cache) -> None:
    """Values no writer of this tool produces: labels outside the label names, views below 0, paths that leave the
    data root, layers other than the recorded ones."""
    path, bad = cache.path, []
    outside = (cache.labels < -1) | (cache.labels >= len(cache.label_names))
    if outside.any():
        bad.append(f"labels {_ranges(np.flatnonzero(outside))} lie outside the {len(cache.label_names)} label names")
    if (cache.view < 0).any():
        bad.append(f"view is negative in rows {_ranges(np.flatnonzero(cache.view < 0))}")
    escaping = escaping_rows(cache.paths.tolist())
    if escaping:
        bad.append(f"paths {_ranges(escaping)} are absolute or leave the data root (e.g. {str(cache.paths[escaping[0]])!r})")
    if sorted(cache.shapes) != sorted(cache.attrs.layers):
        bad.append(f"features holds {sorted(cache.shapes)}, the attribute layers says {cache.attrs.layers}")
    if bad:
        raise DamagedCache(f"{path} is damaged: {'; '.join(bad)}. {fix_hint(path)}")


def is_relative_inside(name: str) -> bool:
    """A `/`-separated relative path that stays below its root (no leading `/`, no `..` part, nothing empty)."""
    parts = name.split("/")
    return ".." not in parts and "" not in parts  # a leading `/`, and the empty name, make an empty part


# What a path that is not `is_relative_inside` shows among paths joined by newlines: an empty name, a leading or
# trailing `/`, an empty part, a `..` alone, first, last or inside
ESCAPES = ("\n\n", "\n/", "/\n", "//", "\n..\n", "\n../", "/..\n", "/../")


def escaping_rows(paths: list[str]) -> list[int]:
    """The rows of `paths` that are not `is_relative_inside`. One scan of them all joined finds whether any is (a
    few substring searches: 0.05 s for 300k paths, against 0.3 s path by path); only then is each row checked."""
    joined = "\n" + "\n".join(paths) + "\n"
    if not any(escape in joined for escape in ESCAPES):
        return []
    return [i for i, p in enumerate(paths) if not is_relative_inside(p)]


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
    `open_cache` refuses (foreign, other schema, reading outside the file, wrong lengths or sizes), except damaged
    rows, which are reported for every dataset."""
    path = Path(path)
    damage, unchecked = [], []
    with _open(path) as file:
        attrs = _check_file(path, file)
        _check_sizes(path, file, attrs.num_images)
        names = [f"features/{k}" for k in file["features"]] + [k for k in PER_ROW + ("label_names",) if k in file]
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
            if found.checksum_rows or found.nonfinite_rows:
                damage.append(found)
    if not damage:
        open_cache(path)  # complete, and every value check
    return Verified(path, attrs.num_images, damage, unchecked)
