"""Tests written against mutmut survivors of features/store.py (`make mutate MODULES=features/store.py`): each asserts
an exact value, name or sentence of the store (file names, chunk sizes, messages, boundaries) that a one-token change
would alter."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from classifiers.testing import separable, write_cache
from features import store
from features.errors import UsageError
from features.schema import (SCHEMA_VERSION, CacheAttrs, DamagedCache, ForeignFile, IncompleteCache, SchemaMismatch,
                             StaleCache, WriteFailed)
from features.store import (Cache, CacheWriter, Damage, Progress, Rows, check_ours, concatenation, copy_rows,
                            discard_partial, escaping_rows, existing_cache, fix_hint, is_relative_inside, open_cache,
                            partial_path, progress_path, read_attrs, read_blocks, rows_per_chunk, verify)

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


def small(path: Path, n: int = 6, **kwargs) -> Path:
    """A complete cache of `n` rows of 4 floats (row i holds i, i+.25, i+.5, i+.75), labels alternating 0/1."""
    X = (np.arange(n, dtype=np.float32)[:, None] + np.array([0, .25, .5, .75], np.float32))
    return write_cache(path, {"x": X}, np.arange(n) % 2, label_names=["a", "b"], **kwargs)


def started(path: Path, n: int = 4, compression: str = "none", label_names: list[str] | None = None,
            layers: dict[str, tuple[int, ...]] | None = None, **attrs) -> CacheWriter:
    """A writer on a new partial file for `n` rows of the layer x (4 floats) unless `layers` says otherwise."""
    layers = {"x": (4,)} if layers is None else layers
    meta = CacheAttrs.example(layers=list(layers), compression=compression, num_candidates=n, **attrs)
    return CacheWriter.create(path, meta, layers, [f"a/img{i}.jpg" for i in range(n)],
                              ["a", "b"] if label_names is None else label_names)


def rows(n: int, first: int = 0) -> list:
    """The arguments of `CacheWriter.write` after the row number, for rows first..first+n-1 of the layer x."""
    X = np.arange(first, first + n, dtype=np.float32)[:, None] * np.ones(4, np.float32)
    return [[X], [f"a/img{i}.jpg" for i in range(first, first + n)], [i % 2 for i in range(first, first + n)],
            ["train"] * n, [0] * n, [(100 + i, 1000 + i) for i in range(first, first + n)]]


# --- names, hints, small helpers -------------------------------------------------------------------------------------

def test_cache_dir_is_the_environment_variable_else_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """$FEATURE_CACHE_DIR when set and not empty, else `cache`."""
    monkeypatch.setenv("FEATURE_CACHE_DIR", "/x/y")
    assert store.cache_dir() == Path("/x/y")
    monkeypatch.setenv("FEATURE_CACHE_DIR", "")
    assert store.cache_dir() == Path("cache")
    monkeypatch.delenv("FEATURE_CACHE_DIR")
    assert store.cache_dir() == Path("cache")


def refused_on_open(path: Path) -> str:
    """The one-line refusal of opening the damaged cache `path`."""
    with pytest.raises(DamagedCache) as err:
        open_cache(path)
    return str(err.value)


def test_utc_now_is_iso_seconds_in_utc() -> None:
    """Seconds precision, with the UTC offset written out."""
    assert re.fullmatch(ISO_UTC, store.utc_now())


@pytest.mark.parametrize("shape,dtype,expected", [
    ((64, 64, 16), "float32", 4),  # 256 KiB rows: 4 in 1 MiB
    ((512,), "float32", 512),
    ((256,), "float32", 1024),  # exactly the row cap
    ((128,), "float32", 1024),  # capped
    ((256,), "float16", 1024),
    ((1 << 19,), "float32", 1),  # a row over 1 MiB: one a chunk
    ((0,), "float32", 1024),  # an empty row counts as one byte
])
def test_rows_per_chunk(shape: tuple[int, ...], dtype: str, expected: int) -> None:
    """About 1 MiB a chunk, at least 1 and at most 1024 rows."""
    assert rows_per_chunk(shape, dtype) == expected


def test_the_names_beside_a_cache() -> None:
    """The partial file, its progress record and the log of skipped files are hidden names beside the target."""
    path = Path("/d/c.h5")
    assert partial_path(path) == Path("/d/.c.h5.partial")
    assert progress_path(path) == Path("/d/.c.h5.partial.progress.json")
    assert Progress.log_path(path) == Path("/d/.c.h5.partial.skipped.jsonl")


def test_discard_partial_removes_the_partial_file_its_record_and_log_only(tmp_path: Path) -> None:
    """The three files of an interrupted write go, the target stays; nothing there is no error."""
    path = tmp_path / "c.h5"
    discard_partial(path)  # none of them exist
    for p in (path, partial_path(path), progress_path(path), Progress.log_path(path)):
        p.write_text("x")
    discard_partial(path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


def test_fix_hint_is_the_rebuild_command() -> None:
    """The fix every damage refusal ends with, word for word."""
    assert fix_hint(Path("out/c.h5")) == (
        "Rebuild it: rerun the `python -m pipeline extract` that made it (its flags are in the file's config_json "
        "attribute) with --out out/c.h5 --overwrite (make extract ... OVERWRITE=1).")


# --- the progress record and the log of skipped files ----------------------------------------------------------------

def test_progress_save_writes_the_two_counters_only(tmp_path: Path) -> None:
    """The record is exactly {"rows_written", "files_done"}; the skipped files are not in it; no temporary file
    stays."""
    path = tmp_path / "c.h5"
    Progress(rows_written=3, files_done=5, skipped=[["a", "b"]]).save(path)
    assert progress_path(path).read_text() == '{"rows_written": 3, "files_done": 5}'
    assert [p.name for p in tmp_path.iterdir()] == [progress_path(path).name]


def test_progress_save_writes_through_a_hidden_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The record is written to `.X.h5.partial.progress.tmp`, then renamed over the record."""
    path, moves = tmp_path / "c.h5", []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((Path(a).name, Path(b).name)), real(a, b)))
    Progress(rows_written=1, files_done=1).save(path)
    Progress(skipped=[["a", "b"]]).start_log(path)
    assert moves == [(".c.h5.partial.progress.tmp", ".c.h5.partial.progress.json"),
                     (".c.h5.partial.skipped.tmp", ".c.h5.partial.skipped.jsonl")]


def test_start_log_writes_every_skipped_file_with_index_minus_one(tmp_path: Path) -> None:
    """One JSON line `[-1, path, reason]` per skipped file, in order; then read back by `load`."""
    path = tmp_path / "c.h5"
    Progress(rows_written=0, files_done=2, skipped=[["x.jpg", "broken"], ["é.png", "too large"]]).start_log(path)
    assert Progress.log_path(path).read_text(encoding="utf-8") == \
        '[-1, "x.jpg", "broken"]\n[-1, "\\u00e9.png", "too large"]\n'
    assert [p.name for p in tmp_path.iterdir()] == [Progress.log_path(path).name]
    Progress(rows_written=0, files_done=2).start_log(path)  # rewritten, not appended
    assert Progress.log_path(path).read_text() == ""


def test_start_log_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the log is rewritten: one sentence naming the log, no temporary file left."""
    path = tmp_path / "c.h5"

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteFailed) as err:
        Progress(skipped=[["x", "y"]]).start_log(path)
    assert str(err.value) == (
        f"the disk is full or a file-size limit was reached (No space left on device) while writing the log of "
        f"skipped files {Progress.log_path(path)}: free space (or raise the limit: ulimit -f) and rerun the same "
        "command.")
    assert list(tmp_path.iterdir()) == []


def test_append_log_appends_index_path_reason_lines(tmp_path: Path) -> None:
    """Each call appends one line per entry (the index as a plain int); no entries: no file."""
    path = tmp_path / "c.h5"
    Progress.append_log(path, [])
    assert not Progress.log_path(path).exists()
    Progress.append_log(path, [(np.int64(3), "a.jpg", "broken")])
    Progress.append_log(path, [(4, "b.jpg", "empty"), (7, "c.jpg", "huge")])
    assert Progress.log_path(path).read_text() == \
        '[3, "a.jpg", "broken"]\n[4, "b.jpg", "empty"]\n[7, "c.jpg", "huge"]\n'


def test_append_log_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """An I/O error that is no full disk names the log and says to check the disk."""
    path = tmp_path / "c.h5"
    Progress.log_path(path).mkdir()
    with pytest.raises(WriteFailed) as err:
        Progress.append_log(path, [(0, "a", "b")])
    assert str(err.value) == (f"writing the log of skipped files {Progress.log_path(path)} failed (Is a directory): "
                              "check the disk, then rerun the same command.")


def test_load_counts_only_logged_files_before_files_done(tmp_path: Path) -> None:
    """Entries at or past `files_done` (appended before a kill, not yet recorded) are dropped, and so is everything
    after the first of them."""
    path = tmp_path / "c.h5"
    Progress(rows_written=4, files_done=5).save(path)
    Progress.append_log(path, [(-1, "d.txt", "not an image"), (2, "b.jpg", "broken"), (4, "c.jpg", "x"),
                               (5, "e.jpg", "late"), (3, "f.jpg", "after a late one")])
    assert Progress.load(path) == Progress(rows_written=4, files_done=5,
                                           skipped=[["d.txt", "not an image"], ["b.jpg", "broken"], ["c.jpg", "x"]])


def test_load_stops_at_a_line_cut_short(tmp_path: Path) -> None:
    """A line cut by a kill ends the log: what follows it is not read."""
    path = tmp_path / "c.h5"
    Progress(rows_written=1, files_done=9).save(path)
    Progress.log_path(path).write_text('[1, "a.jpg", "r"]\n[2, "b.j\n[3, "c.jpg", "r"]\n')
    assert Progress.load(path).skipped == [["a.jpg", "r"]]
    Progress.log_path(path).write_text('[1, "a.jpg", "r"]\n[2, "b.jpg"]\n[3, "c.jpg", "r"]\n')  # two values
    assert Progress.load(path).skipped == [["a.jpg", "r"]]
    Progress.log_path(path).write_text('[1, "a.jpg", "r"]\n7\n[3, "c.jpg", "r"]\n')  # not a list
    assert Progress.load(path).skipped == [["a.jpg", "r"]]


def test_load_reads_an_older_record_with_its_own_skipped_list(tmp_path: Path) -> None:
    """An older record holding `skipped` itself keeps those entries, before the logged ones."""
    path = tmp_path / "c.h5"
    progress_path(path).write_text(json.dumps({"rows_written": 2, "files_done": 3, "skipped": [["old", "why"]]}))
    Progress.append_log(path, [(1, "new", "because")])
    assert Progress.load(path) == Progress(rows_written=2, files_done=3, skipped=[["old", "why"], ["new", "because"]])


@pytest.mark.parametrize("record", [None, "{not json", '{"rows_written": 1, "files_done": 2, "other": 3}', "[1, 2]"])
def test_load_without_a_readable_record_is_none(tmp_path: Path, record: str | None) -> None:
    """No record, unparsable JSON, unknown keys or another shape: no progress to resume from."""
    path = tmp_path / "c.h5"
    if record is not None:
        progress_path(path).write_text(record)
    assert Progress.load(path) is None


# --- fixed-length strings and reading attributes ---------------------------------------------------------------------

def test_fixed_utf8_is_as_wide_as_the_longest_encoded_value() -> None:
    """Width in UTF-8 bytes, at least 1, or the width asked for."""
    values = store._fixed_utf8(["a", "héllo"])
    assert values.dtype.itemsize == 6 and [v.decode() for v in values] == ["a", "héllo"]
    assert store._fixed_utf8([]).dtype.itemsize == 1
    assert store._fixed_utf8([""]).dtype.itemsize == 1
    assert store._fixed_utf8(["ab"], 5).dtype.itemsize == 5
    assert store._fixed_utf8(["é", "a"], 4).dtype.itemsize == 4  # encoded one by one (not ASCII), as wide as asked
    assert h5py.check_string_dtype(values.dtype).encoding == "utf-8"


def test_read_attrs_of_caches_partial_files_and_others(tmp_path: Path) -> None:
    """The attributes of a cache or partial file of this schema; None for anything else."""
    path = small(tmp_path / "c.h5")
    assert read_attrs(path).num_images == 6
    writer = started(tmp_path / "p.h5")
    writer.close()
    assert read_attrs(partial_path(tmp_path / "p.h5")).complete is False
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION - 1
    assert read_attrs(path) is None
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["image_size"] = "big"
    assert read_attrs(path) is None
    (tmp_path / "t.txt").write_text("text")
    assert read_attrs(tmp_path / "t.txt") is None
    assert read_attrs(tmp_path / "missing.h5") is None


def refusal(path: Path, why: str) -> str:
    """`check_ours`'s sentence for a file at `path` that is not this tool's cache, because `why`."""
    return (f"{path} exists and is not a feature cache of this tool ({why}); it is never replaced, --overwrite "
            "included. Move it away or choose another output path.")


def test_check_ours_accepts_nothing_or_a_cache_and_names_what_else_is_there(tmp_path: Path) -> None:
    """False for nothing, True for a cache; a link, a folder, a non-HDF5 file, an unreadable HDF5 file and HDF5
    without the schema marker are each refused in their own words."""
    assert check_ours(tmp_path / "none.h5") is False
    assert check_ours(small(tmp_path / "c.h5")) is True
    cases = {}
    (tmp_path / "link.h5").symlink_to(tmp_path / "c.h5")
    cases["link.h5"] = "a link"
    (tmp_path / "dangling.h5").symlink_to(tmp_path / "nowhere.h5")
    cases["dangling.h5"] = "a link"
    (tmp_path / "dir.h5").mkdir()
    cases["dir.h5"] = "not a file"
    (tmp_path / "t.h5").write_text("hello")
    cases["t.h5"] = "not an HDF5 file"
    head = (tmp_path / "c.h5").read_bytes()[:800]
    (tmp_path / "cut.h5").write_bytes(head)
    cases["cut.h5"] = "an HDF5 file that cannot be read"
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_group("features")
    cases["plain.h5"] = "HDF5 without the schema_version attribute and features group"
    with h5py.File(tmp_path / "soft.h5", "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.create_group("real")
        f["features"] = h5py.SoftLink("/real")
    cases["soft.h5"] = "HDF5 without the schema_version attribute and features group"
    with h5py.File(tmp_path / "nofeatures.h5", "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
    cases["nofeatures.h5"] = "HDF5 without the schema_version attribute and features group"
    for name, why in cases.items():
        with pytest.raises(ForeignFile) as err:
            check_ours(tmp_path / name)
        assert str(err.value) == refusal(tmp_path / name, why), name


def test_existing_cache_of_another_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    """Nothing: None; a cache: its attributes; another schema version: one sentence with the fix."""
    path = small(tmp_path / "c.h5")
    assert existing_cache(tmp_path / "none.h5") is None
    assert existing_cache(path).num_images == 6
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(SchemaMismatch) as err:
        existing_cache(path)
    assert str(err.value) == (f"{path} has schema_version=1; this version reads schema {SCHEMA_VERSION}. "
                              "Re-extract it: the same `make extract` with OVERWRITE=1.")


# --- the writer ------------------------------------------------------------------------------------------------------

def test_create_lays_out_every_dataset(tmp_path: Path) -> None:
    """Shapes, chunks, types, checksums and attributes of a new uncompressed partial file, before any row; the
    target's folder is created."""
    path = tmp_path / "sub" / "dir" / "c.h5"
    writer = started(path, n=5000, layers={"x": (4,), "m": (1024,)})
    writer.close()
    assert not path.exists()
    with h5py.File(partial_path(path)) as f:
        assert set(f) == {"features", "paths", "split", "labels", "view", "file_stamp", "label_names"}
        x, m = f["features/x"], f["features/m"]
        assert (x.shape, x.chunks, x.maxshape, x.dtype) == ((5000, 4), (1024, 4), (None, 4), np.float32)
        assert (m.shape, m.chunks) == ((5000, 1024), (256, 1024))
        assert x.attrs["layer"] == "x" and x.attrs["shape"].tolist() == [4]
        assert m.attrs["layer"] == "m" and m.attrs["shape"].tolist() == [1024]
        assert (f["paths"].chunks, f["paths"].dtype.itemsize, f["paths"].maxshape) == ((4096,), 13, (None,))
        assert (f["split"].chunks, f["split"].dtype.itemsize) == ((4096,), 5)
        assert (f["labels"].dtype, f["view"].dtype, f["file_stamp"].dtype) == (np.int32, np.int16, np.int64)
        assert (f["file_stamp"].shape, f["file_stamp"].chunks) == ((5000, 2), (4096, 2))
        assert (f["label_names"].chunks, f["label_names"].maxshape) == ((2,), (None,))
        assert [v.decode() for v in f["label_names"][()]] == ["a", "b"]
        for name in ("features/x", "features/m", "paths", "split", "labels", "view", "file_stamp", "label_names"):
            assert f[name].fletcher32 and f[name].compression is None, name
        plist = x.id.get_create_plist()
        assert plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
        assert plist.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
        attrs = CacheAttrs.parse(f.attrs, "p")
        assert (attrs.schema_version, attrs.complete, attrs.generation) == (SCHEMA_VERSION, False, "")
        assert re.fullmatch(ISO_UTC, attrs.created) and attrs.completed == ""


def test_create_chunks_small_caches_by_their_rows_and_compresses_with_lzf(tmp_path: Path) -> None:
    """A cache of 3 rows has chunks of 3 rows; lzf compresses every per-row dataset; an empty label list still gets
    a one-row chunk."""
    writer = started(tmp_path / "c.h5", n=3, compression="lzf", label_names=[])
    writer.close()
    with h5py.File(partial_path(tmp_path / "c.h5")) as f:
        assert f["features/x"].chunks == (3, 4) and f["paths"].chunks == (3,)
        for name in ("features/x", "paths", "split", "labels", "view", "file_stamp"):
            assert f[name].compression == "lzf" and f[name].fletcher32, name
        assert f["features/x"].id.get_create_plist().get_alloc_time() != h5py.h5d.ALLOC_TIME_EARLY
        assert f["label_names"].chunks == (1,)


def test_create_without_layers_still_has_the_features_group(tmp_path: Path) -> None:
    """A virtual merge creates its file without layers: the features group is there for the links."""
    writer = started(tmp_path / "c.h5", n=2, layers={})
    writer.close()
    with h5py.File(partial_path(tmp_path / "c.h5")) as f:
        assert set(f) == {"features", "paths", "split", "labels", "view", "file_stamp", "label_names"}
        assert isinstance(f["features"], h5py.Group) and len(f["features"]) == 0


def test_create_forgets_an_earlier_partial_write_and_releases_its_lock_on_close(tmp_path: Path) -> None:
    """An earlier partial file, record and log are discarded; after close another writer may start."""
    path = tmp_path / "c.h5"
    for p in (progress_path(path), Progress.log_path(path)):
        p.write_text("old")
    started(path).close()
    assert not progress_path(path).exists() and not Progress.log_path(path).exists()
    started(path).close()  # the lock was released
    CacheWriter.reopen(path).close()
    started(path).close()


def test_reopen_without_the_partial_file_is_one_line_and_releases_the_lock(tmp_path: Path) -> None:
    """A partial file gone between the check and the open: one sentence, and the lock is not kept."""
    path = tmp_path / "c.h5"
    with pytest.raises(UsageError) as err:
        CacheWriter.reopen(path)
    assert str(err.value).startswith(f"the half-written {partial_path(path)} changed or vanished while this run "
                                     "started (")
    assert str(err.value).endswith("); run the same command again.")
    started(path).close()  # not refused as "being written by another run"


def test_reopen_of_a_partial_file_with_damaged_attributes_refuses_and_releases_it(tmp_path: Path) -> None:
    """Damaged attributes refuse the resume; the file and the lock are released for the next try."""
    path = tmp_path / "c.h5"
    started(path).close()
    with h5py.File(partial_path(path), "r+") as f:
        f.attrs["layers"] = 5
    for _ in range(2):  # the second try is not refused by a lock the first one kept
        with pytest.raises(DamagedCache, match="root attribute 'layers' is 5"):
            CacheWriter.reopen(path)
    with h5py.File(partial_path(path), "r+") as f:  # the file was closed: it opens for writing
        f.attrs["layers"] = ["x"]


def test_reopen_continues_with_the_recorded_layers(tmp_path: Path) -> None:
    """The layers come from the partial file's attributes, in their recorded order."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4, layers={"b": (4,), "a": (4,)})
    writer.close()
    writer = CacheWriter.reopen(path)
    try:
        assert writer.layers == ["b", "a"] and writer.path == path
    finally:
        writer.close()


def test_written_rows_read_back_exactly(tmp_path: Path) -> None:
    """Every per-row dataset holds what `write` was given, at the rows given."""
    path = tmp_path / "c.h5"
    writer = started(path, n=6)
    writer.write(3, *rows(3, first=3))
    writer.write(0, *rows(3))
    writer.finalize(Progress(rows_written=6, files_done=6))
    cache = open_cache(path)
    assert cache.read("x")[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert cache.paths.tolist() == [f"a/img{i}.jpg" for i in range(6)]
    assert cache.labels.tolist() == [0, 1, 0, 1, 0, 1] and cache.split.tolist() == ["train"] * 6
    assert cache.file_stamps.tolist() == [[100 + i, 1000 + i] for i in range(6)]
    assert cache.view.tolist() == [0] * 6


def test_finalize_trims_records_and_publishes(tmp_path: Path) -> None:
    """Fewer rows than planned are trimmed; the skipped files are recorded; the file is complete under a new
    generation, `created` as given; the partial file and its record are gone."""
    path = tmp_path / "c.h5"
    writer = started(path, n=6)
    writer.write(0, *rows(4))
    Progress(rows_written=4, files_done=6).save(path)
    writer.finalize(Progress(rows_written=4, files_done=6, skipped=[["a/x.jpg", "broken"], ["a/y.jpg", "huge"]]),
                    created="2020-01-01T00:00:00+00:00")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.h5.lock", "c.h5"]
    with h5py.File(path) as f:
        for name in ("features/x", "paths", "split", "labels", "view", "file_stamp"):
            assert f[name].shape[0] == 4, name
        assert [(p.decode(), r.decode()) for p, r in f["skipped"][()]] == [("a/x.jpg", "broken"), ("a/y.jpg", "huge")]
        assert f["skipped"].dtype.names == ("path", "reason")
        attrs = CacheAttrs.parse(f.attrs, "c")
    assert attrs.complete is True and attrs.num_images == 4
    assert re.fullmatch(r"[0-9a-f]{32}", attrs.generation)
    assert attrs.created == "2020-01-01T00:00:00+00:00" and re.fullmatch(ISO_UTC, attrs.completed)
    assert open_cache(path).skipped == [("a/x.jpg", "broken"), ("a/y.jpg", "huge")]


def test_finalize_keeps_the_created_time_of_the_partial_file_by_default(tmp_path: Path) -> None:
    """Without `created`, the time the partial file was started stays; a generation is given."""
    path = tmp_path / "c.h5"
    writer = started(path, n=2)
    created = read_attrs(partial_path(path)).created
    writer.write(0, *rows(2))
    writer.finalize(Progress(rows_written=2, files_done=2))
    assert read_attrs(path).created == created and read_attrs(path).generation != ""


def test_finalize_of_a_reopened_file_replaces_its_skipped_list(tmp_path: Path) -> None:
    """A partial file that already holds a `skipped` dataset (finalize failed after writing it) gets the new one."""
    path = tmp_path / "c.h5"
    writer = started(path, n=2)
    writer.write(0, *rows(2))
    writer.file.create_dataset("skipped", data=np.array([1, 2, 3]))
    writer.finalize(Progress(rows_written=2, files_done=3, skipped=[["z", "r"]]))
    assert open_cache(path).skipped == [("z", "r")]


def test_finalize_without_rows_publishes_nothing_and_keeps_an_earlier_cache(tmp_path: Path) -> None:
    """No rows: the partial file and its record go, the earlier cache stays, the lock is released."""
    path = small(tmp_path / "c.h5")
    writer = started(path, n=3)
    Progress(rows_written=0, files_done=3).save(path)
    writer.finalize(Progress(rows_written=0, files_done=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.h5.lock", "c.h5"]
    assert open_cache(path).attrs.num_images == 6
    started(path).close()  # the lock was released


def test_finalize_growth_bounds_skipped_files_and_attributes(tmp_path: Path) -> None:
    """Twice the skipped files' bytes (64 each besides their text), three times every attribute's, plus 4096."""
    writer = started(tmp_path / "c.h5", n=2)
    try:
        attrs = sum(len(str(store.plain(v)).encode()) + 64 for v in writer.file.attrs.values())
        assert writer._finalize_growth(Progress()) == 3 * attrs + 4096
        skipped = Progress(skipped=[["é", "r"], ["ab", "why"]])
        assert writer._finalize_growth(skipped) == 2 * ((2 + 1 + 64) + (2 + 3 + 64)) + 3 * attrs + 4096
    finally:
        writer.close()


# --- room on the disk ------------------------------------------------------------------------------------------------

@pytest.fixture
def file_limit(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the soft file-size limit `_no_room` reads (resource.getrlimit; no hard limit), without touching the
    process's."""
    def set_limit(limit: int) -> None:
        real = resource.getrlimit
        monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY)
                            if which == resource.RLIMIT_FSIZE else real(which))
    return set_limit


def test_no_room_under_a_file_size_limit(file_limit: Callable[[int], None], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """Exactly up to the limit is room; one byte more is not."""
    file_limit(1000)
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 1 << 40)
    assert store._no_room(tmp_path, 600, 400) is None
    assert store._no_room(tmp_path, 600, 401) == \
        "the file-size limit is 1000 bytes; the file has 600 and may need 401 more"


def test_no_room_on_a_full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Exactly the free space is room; more is not; needing nothing always fits."""
    seen = []
    monkeypatch.setattr(store, "_free_bytes", lambda folder: (seen.append(folder), 100)[1])
    assert store._no_room(tmp_path, 10**9, 100) is None
    assert store._no_room(tmp_path, 0, 101) == "100 bytes are free on its disk; it may need 101"
    assert seen == [tmp_path, tmp_path]
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 0)
    assert store._no_room(tmp_path, 5, 0) is None


def test_allocated_bytes_of_an_uncompressed_cache() -> None:
    """Rows times (features + path + split 5 + label 4 + view 2 + stamp 16)."""
    assert store._allocated_bytes(3, {"a": (2, 3), "b": (4,)}, "float16", 10) == 3 * (10 * 2 + 10 + 5 + 4 + 2 + 16)
    assert store._allocated_bytes(0, {"a": (2,)}, "float32", 10) == 0


def test_growth_counts_every_touched_chunk_of_a_compressed_dataset(tmp_path: Path) -> None:
    """Each touched chunk anew, uncompressed, with its 4-byte checksum; none for early-allocated or contiguous data
    or no rows."""
    with h5py.File(tmp_path / "g.h5", "w") as f:
        lzf = f.create_dataset("lzf", shape=(20, 8), dtype="float32", chunks=(4, 8), compression="lzf",
                               fletcher32=True)
        chunk = 4 * 8 * 4 + 4
        assert store._growth(lzf, 2, 5) == 2 * chunk  # rows 2-6: chunks 0 and 1
        assert store._growth(lzf, 3, 1) == chunk
        assert store._growth(lzf, 3, 2) == 2 * chunk
        assert store._growth(lzf, 4, 4) == chunk
        assert store._growth(lzf, 0, 20) == 5 * chunk
        assert store._growth(lzf, 0, 0) == 0
        assert store._growth(lzf, 3, 0) == 0
        flat = f.create_dataset("flat", shape=(20, 8), dtype="float32")
        assert store._growth(flat, 0, 5) == 0
        early = f.create_dataset("early", shape=(20, 8), dtype="float32", chunks=(4, 8), dcpl=store._dcpl_early())
        assert store._growth(early, 0, 5) == 0


def test_free_bytes_is_what_an_unprivileged_writer_may_use(tmp_path: Path) -> None:
    """Available blocks times the fragment size; a folder that cannot be asked reads as unlimited."""
    st = os.statvfs(tmp_path)
    assert store._free_bytes(tmp_path) == st.f_bavail * st.f_frsize
    assert store._free_bytes(tmp_path / "missing" / "dir") == 1 << 62


def test_file_size_limit_is_lifted_to_the_hard_one_and_restored() -> None:
    """Inside the block the soft limit is the hard one; after it, the soft limit is back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    lowered = 1 << 40 if hard == resource.RLIM_INFINITY else hard // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (lowered, hard))
    try:
        with store._FileSizeLimitLifted():
            assert resource.getrlimit(resource.RLIMIT_FSIZE) == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == (lowered, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_size_limit_that_cannot_be_raised_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """When raising fails, nothing is restored on the way out (only the one failed call)."""
    calls = []

    def refuse(which, limits):
        calls.append(limits)
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    with store._FileSizeLimitLifted():
        pass
    assert len(calls) == 1  # only the attempt to raise it: nothing to restore


def test_a_write_is_refused_when_the_disk_has_no_room_for_its_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """An lzf cache's write may add every touched chunk plus room for index nodes: refused in one line before it
    reaches HDF5, naming the rows, and resumable from the progress record. An uncompressed cache rewrites chunks in
    place: it needs no room at all."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4, compression="lzf")
    try:
        Progress(rows_written=0, files_done=0).save(path)
        with h5py.File(partial_path(path), "r") as f:
            growth = sum(store._growth(f[name], 0, 2) for name in ("features/x", *store.PER_ROW))
        monkeypatch.setattr(store, "_free_bytes", lambda folder: 100)
        with pytest.raises(WriteFailed) as err:
            writer.write(0, *rows(2))
        need = growth + store.ROOM_MARGIN
        assert str(err.value) == (
            f"the disk is full or a file-size limit was reached (100 bytes are free on its disk; it may need {need}) "
            f"while writing rows 0-1 of {partial_path(path)}: free space (or raise the limit: ulimit -f) and rerun "
            "the same command; it resumes from row 0.")
        monkeypatch.setattr(store, "_free_bytes", lambda folder: need)
        writer.write(0, *rows(2))
    finally:
        writer.close()
    writer = started(tmp_path / "u.h5", n=4)
    try:
        monkeypatch.setattr(store, "_free_bytes", lambda folder: 0)
        writer.write(0, *rows(4))
    finally:
        writer.close()


def test_check_room_counts_the_file_as_large_as_the_disk_or_hdf5_says(tmp_path: Path, file_limit: Callable[[int], None],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The size checked against a file-size limit is the larger of HDF5's idea and the file on disk."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4, compression="lzf")
    try:
        size = max(writer.file.id.get_filesize(), partial_path(path).stat().st_size)
        file_limit(size + 10 + store.ROOM_MARGIN)
        monkeypatch.setattr(store, "_free_bytes", lambda folder: 1 << 40)
        writer._check_room(10, "here")
        with pytest.raises(WriteFailed, match=rf"\(the file-size limit is {size + 10 + store.ROOM_MARGIN} bytes; the "
                                              rf"file has {size} and may need {11 + store.ROOM_MARGIN} more\) while "
                                              "writing here: "):
            writer._check_room(11, "here")
    finally:
        monkeypatch.undo()
        writer.close()


def test_a_write_that_fails_without_an_io_error_raises_that_error(tmp_path: Path) -> None:
    """A programming error (rows of the wrong shape) is raised as it is, not as a full disk; the writer is stopped
    and the partial file stays."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    args = rows(2)
    args[0] = [np.zeros((2, 5), np.float32)]
    with pytest.raises((TypeError, ValueError)) as err:
        writer.write(0, *args)
    assert not isinstance(err.value, WriteFailed)
    assert not writer.file.id.valid
    writer.close()
    assert partial_path(path).exists()


# --- errors ----------------------------------------------------------------------------------------------------------

def test_errno_of_an_error() -> None:
    """The OSError's own errno, else the one HDF5 quotes in its message, else None."""
    assert store._errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert store._errno(OSError("no errno, errno = 5 in text")) == 5
    assert store._errno(ValueError("file write failed: errno = 28, error message = 'No space'")) == 28
    assert store._errno(ValueError("nothing")) is None
    assert store._errno(OSError(0, "zero, errno = 27")) == 27


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_write_failed_for_a_full_disk_quota_or_size_limit(tmp_path: Path, code: int) -> None:
    """Each reads as a full disk, with the system's words for it, and resumes from the recorded row."""
    path = tmp_path / "c.h5"
    Progress(rows_written=12, files_done=13).save(path)
    err = store._write_failed(OSError(code, "x"), "rows 12-15 of p", path)
    assert isinstance(err, WriteFailed)
    assert str(err) == (f"the disk is full or a file-size limit was reached ({os.strerror(code)}) while writing "
                        "rows 12-15 of p: free space (or raise the limit: ulimit -f) and rerun the same command; it "
                        "resumes from row 12.")


def test_write_failed_for_other_errors(tmp_path: Path) -> None:
    """Another errno: its words and 'check the disk'; none: the error's text, whitespace collapsed, at most 300
    characters; no record: no resume clause; a removed partial file: the rerun starts from the beginning."""
    path = tmp_path / "c.h5"
    assert str(store._write_failed(OSError(errno.EIO, "x"), "W", path)) == \
        "writing W failed (Input/output error): check the disk, then rerun the same command."
    long = "a  b\n c " + "d" * 400
    assert str(store._write_failed(RuntimeError(long), "W", path)) == \
        f"writing W failed ({('a b c ' + 'd' * 400)[:300]}): check the disk, then rerun the same command."
    Progress(rows_written=8, files_done=8).save(path)
    assert str(store._write_failed(OSError(errno.EIO, "x"), "W", path, kept=False)) == (
        "writing W failed (Input/output error): check the disk, then rerun the same command; the half-written file "
        "could not be read back and was removed, so the rerun starts from the beginning.")
    assert str(store._write_failed("1 bytes are free", "W", path)) == (
        "the disk is full or a file-size limit was reached (1 bytes are free) while writing W: free space (or raise "
        "the limit: ulimit -f) and rerun the same command; it resumes from row 8.")


@pytest.mark.parametrize("given,expected", [
    ([3, 4, 5, 9], "3-5, 9"),
    ([9, 3, 5, 4, 3], "3-5, 9"),
    ([], ""),
    ([7], "7"),
    ([0, 1], "0-1"),
    (list(range(0, 16, 2)), "0, 2, 4, 6, 8, 10, 12, 14"),
    (list(range(0, 18, 2)), "0, 2, 4, 6, 8, 10, 12, 14 and 1 more ranges"),
    (list(range(0, 40, 2)), "0, 2, 4, 6, 8, 10, 12, 14 and 12 more ranges"),
    (np.array([4.0, 3.0, 9.0]), "3-4, 9"),  # row numbers are written as integers, whatever the array's type
])
def test_ranges(given: list[int], expected: str) -> None:
    """Sorted, unique, consecutive rows joined; at most 8 ranges, then a count."""
    assert store._ranges(given) == expected


def test_nonfinite_rows_sum_in_float64() -> None:
    """Rows with NaN or inf, found without a float16 sum overflowing for large finite values."""
    block = np.full((3, 4), 65504, np.float16)
    assert store._nonfinite_rows(block).tolist() == []
    block[1, 2], block[2, 0] = np.nan, -np.inf
    assert store._nonfinite_rows(block).tolist() == [1, 2]


# --- reading ---------------------------------------------------------------------------------------------------------

def damaged(tmp_path: Path) -> Path:
    """A cache of 40 rows of 64x64x16 float32 (4 rows a chunk) whose chunk of rows 8-11 fails its checksum."""
    from tests.test_store import _maps, _overwrite_rows

    X, y = _maps()
    path = write_cache(tmp_path / "d.h5", {"map": X}, y)
    _overwrite_rows(path, "map", 9, bytes(X[0].nbytes))
    return path


def test_scan_block_names_the_damaged_rows_within_the_range(tmp_path: Path) -> None:
    """Chunk by chunk from the chunk holding `start`, reporting only rows in [start, stop)."""
    path = damaged(tmp_path)
    with h5py.File(path) as f:
        dset = f["features/map"]
        assert store._scan_block(dset, 0, 40) == [8, 9, 10, 11]
        assert store._scan_block(dset, 9, 11) == [9, 10]
        assert store._scan_block(dset, 10, 20) == [10, 11]
        assert store._scan_block(dset, 12, 40) == []
        with pytest.raises(DamagedCache) as err:
            store._read(path, dset, 6, 10)
    assert str(err.value) == (f"{path} is damaged: rows 8-9 of features/map fail their checksum (OSError from HDF5). "
                              f"{fix_hint(path)}")


def test_scan_block_of_contiguous_data_steps_by_chunk_sized_blocks(tmp_path: Path) -> None:
    """Data without chunks (and without checksums) is scanned without error and found whole."""
    with h5py.File(tmp_path / "c.h5", "w") as f:
        dset = f.create_dataset("x", data=np.zeros((3000, 4), np.float32))
        assert store._scan_block(dset, 5, 2500) == []


def test_verify_reports_damage_per_dataset_and_checks_nothing_more(tmp_path: Path) -> None:
    """Damaged rows are reported (not raised) with the row count; a damaged cache is not then opened."""
    path = damaged(tmp_path)
    found = verify(path, block_bytes=1 << 20)
    assert found.path == path and found.rows == 40 and found.unchecked == []
    assert [d.line() for d in found.damage] == ["features/map: rows 8-11 fail their checksum"]


def test_verify_names_datasets_without_checksums_and_nonfinite_feature_rows(tmp_path: Path) -> None:
    """Datasets written without fletcher32 are listed as unchecked; NaN is looked for in features only."""
    path = small(tmp_path / "c.h5", n=6)
    with h5py.File(path, "r+") as f:
        labels = f["labels"][()]
        del f["labels"]
        f.create_dataset("labels", data=labels)
        f["features/x"][4, 1] = np.nan
    found = verify(path, block_bytes=16)  # one row a block
    assert found.unchecked == ["labels"]
    assert [d.line() for d in found.damage] == ["features/x: rows 4 hold NaN or inf"]
    assert found.damage[0] == Damage("features/x", [], [4])


def test_verify_opens_a_whole_cache_after_reading_it(tmp_path: Path) -> None:
    """No damage: every check of open_cache is made too (here: a label outside the label names)."""
    path = small(tmp_path / "c.h5")
    assert verify(path).damage == [] and verify(path).rows == 6
    with h5py.File(path, "r+") as f:
        f["labels"][2] = 5
    with pytest.raises(DamagedCache, match="labels 2 lie outside the 2 label names"):
        verify(path)


def test_damage_line_joins_both_findings() -> None:
    """Checksum rows, then NaN rows, joined by '; ', each part only when it has rows."""
    assert Damage("features/x", [1, 2, 3], [7]).line() == \
        "features/x: rows 1-3 fail their checksum; rows 7 hold NaN or inf"
    assert Damage("labels", [0]).line() == "labels: rows 0 fail their checksum"


def test_open_cache_of_nothing_of_a_partial_file_and_of_a_foreign_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing (with the cache folder to look in), still being written, not HDF5: one sentence each."""
    monkeypatch.setenv("FEATURE_CACHE_DIR", "/caches")
    path = tmp_path / "c.h5"
    with pytest.raises(FileNotFoundError) as err:
        open_cache(path)
    assert str(err.value) == (f"Feature cache {str(path)!r} does not exist. Create it with `make extract`, or pass "
                              "FEATURES=<file.h5> of an existing cache (see `ls /caches/`).")
    started(path).close()
    with pytest.raises(IncompleteCache) as err:
        open_cache(path)
    assert str(err.value) == (f"Feature cache {str(path)!r} is incomplete: its extraction was interrupted or is still "
                              "running (.c.h5.partial beside it). Rerun the same `make extract` command to finish it.")
    path.write_text("text")
    with pytest.raises(ForeignFile, match=rf"^{re.escape(repr(str(path)))} is not a readable HDF5 feature cache \("):
        open_cache(path)


def test_open_cache_of_an_incomplete_file_at_the_target(tmp_path: Path) -> None:
    """A file at the target marked complete=False is refused with the rerun to finish it."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(IncompleteCache) as err:
        open_cache(path)
    assert str(err.value) == (f"Feature cache {str(path)!r} is incomplete (complete=False): its extraction was "
                              "interrupted or is still running. Rerun the same `make extract` command to finish it.")


def test_check_file_refusals(tmp_path: Path) -> None:
    """No features group or no schema marker; another schema version; data outside the file."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 7
    with pytest.raises(SchemaMismatch) as err:
        open_cache(path)
    assert str(err.value) == (f"{str(path)!r} has schema_version=7; this version reads schema {SCHEMA_VERSION}. "
                              "Re-extract it: the same `make extract` with OVERWRITE=1.")
    with h5py.File(path, "r+") as f:
        del f.attrs["schema_version"]
    nomarker = (f"{str(path)!r} is not a feature cache: it lacks the 'features' group or the 'schema_version' "
                "attribute (see docs/hdf5-schema.md).")
    with pytest.raises(ForeignFile) as err:
        open_cache(path)
    assert str(err.value) == nomarker
    other = small(tmp_path / "o.h5")
    with h5py.File(other, "r+") as f:
        del f["features"]
    with pytest.raises(ForeignFile) as err:
        open_cache(other)
    assert str(err.value) == nomarker.replace(str(path), str(other))


def test_outside_reads_are_named_each(tmp_path: Path) -> None:
    """Soft and external links, external storage: each named; at most three in the sentence."""
    path = small(tmp_path / "c.h5")
    (tmp_path / "raw.bin").write_bytes(bytes(64))
    with h5py.File(path, "r+") as f:
        f["soft"] = h5py.SoftLink("/labels")
        f["ext"] = h5py.ExternalLink("other.h5", "/x")
        f.create_dataset("raw", shape=(4,), dtype="int32", external=[(str(tmp_path / "raw.bin"), 0, 16)])
        f.create_group("g")["soft2"] = h5py.SoftLink("/labels")
    with h5py.File(path) as f:
        found = store._outside_reads(path, f)
    assert sorted(found) == ["ext is a ExternalLink", "g/soft2 is a SoftLink", "raw keeps its data in an external file",
                             "soft is a SoftLink"]
    with pytest.raises(ForeignFile) as err:
        open_cache(path)
    assert str(err.value).startswith(f"{str(path)!r} reads data from outside its own file (")
    assert str(err.value).count(";") == 2 + 1  # three phrases and the sentence after them
    assert str(err.value).endswith("); this tool never writes such a file and does not read it. Re-extract the cache "
                                   "from its images.")


def test_links_walks_groups_depth_first_without_following_links(tmp_path: Path) -> None:
    """Every member, depth first, each link as it is: a soft link to a group is not entered."""
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f.create_group("a/b").create_dataset("c", data=[1])
        f["a/s"] = h5py.SoftLink("/a/b")
        found = [(name, type(link).__name__) for name, link in store._links(f)]
    assert found == [("a", "HardLink"), ("a/b", "HardLink"), ("a/b/c", "HardLink"), ("a/s", "SoftLink")]


def virtual_merge(tmp_path: Path) -> Path:
    """Two shards beside a virtual merge of them (`merge --virtual`)."""
    from pipeline.merge import merge

    X, y = separable(4, 2, 3)
    for i in range(2):
        write_cache(tmp_path / f"v.shard{i}-of-2.h5", {"vec": X[i::2]}, y[i::2], shard=f"{i}/2", num_candidates=8)
    return merge(tmp_path / "v.h5", virtual=True).path


def test_virtual_problems_are_named(tmp_path: Path) -> None:
    """A source not pinned by the merge, a missing shard, a replaced shard: each in its words."""
    path = virtual_merge(tmp_path)
    with h5py.File(path) as f:
        dset = f["features/vec"]
        assert store._virtual_problems(path, "features/vec", dset) == []
        assert store._virtual_problems(path, "labels", dset) == [
            f"labels is virtual over {s!r}, not a cache beside it that a merge linked"
            for s in sorted({s.file_name for s in dset.virtual_sources()})] or len(
            store._virtual_problems(path, "labels", dset)) == 2
    shard0 = tmp_path / "v.shard0-of-2.h5"
    os.rename(shard0, tmp_path / "away.h5")
    with h5py.File(path) as f:
        assert store._virtual_problems(path, "features/vec", f["features/vec"]) == [
            "features/vec reads the shard 'v.shard0-of-2.h5', which is missing beside it"]
    os.rename(tmp_path / "away.h5", shard0)
    with h5py.File(shard0, "r+") as f:
        f.attrs["generation"] = "other"
    with h5py.File(path) as f:
        assert store._virtual_problems(path, "features/vec", f["features/vec"]) == [
            "features/vec reads the shard 'v.shard0-of-2.h5', which was replaced or damaged since the merge"]
    with h5py.File(path, "r+") as f:
        f["features/vec"].attrs[store.SOURCE_GENERATIONS] = ["v.shard1-of-2.h5:x"]
    with h5py.File(path) as f:
        assert sorted(store._virtual_problems(path, "features/vec", f["features/vec"])) == [
            "features/vec is virtual over 'v.shard0-of-2.h5', not a cache beside it that a merge linked",
            "features/vec reads the shard 'v.shard1-of-2.h5', which was replaced or damaged since the merge"]


def test_a_virtual_merge_with_an_unreadable_shard_is_one_line(tmp_path: Path) -> None:
    """Rows of a shard that cannot be read come back as NaN: refused naming the rows and the fix."""
    path = virtual_merge(tmp_path)
    cache = open_cache(path)
    os.rename(tmp_path / "v.shard1-of-2.h5", tmp_path / "away.h5")
    with pytest.raises(DamagedCache) as err:
        list(read_blocks(path, "vec", np.arange(8), 8))
    assert str(err.value) == (
        f"{path}: rows 4-7 of features/vec could not be read from its shard files beside it (missing, unreadable, or "
        "more shards than the open-file limit allows). Raise the limit (ulimit -n), or merge again without "
        "--virtual (an updated cache: rerun its extraction with --overwrite).")
    assert cache.shapes == {"vec": (3,)} and cache.dtypes == {"vec": np.dtype("float32")}


def test_link_features_refuses_sources_in_another_folder(tmp_path: Path) -> None:
    """A virtual merge links only caches beside its own file: one sentence with both ways out."""
    X, y = separable(2, 2, 3)
    source = open_cache(write_cache(tmp_path / "a" / "s.h5", {"vec": X}, y))
    writer = started(tmp_path / "b" / "m.h5", n=4, layers={})
    try:
        with pytest.raises(UsageError) as err:
            writer.link_features(*concatenation([source]), {"vec": (3,)}, {"vec": np.dtype("float32")})
    finally:
        writer.close()
    assert str(err.value) == (f"a virtual merge links caches in its own folder only; {source.path} is not beside "
                              f"{tmp_path / 'b' / 'm.h5'}. Merge without --virtual (a copy), or write --out beside the "
                              "shards.")


def test_check_sizes_names_a_dataset_declaring_more_than_it_stores(tmp_path: Path) -> None:
    """An uncompressed dataset must store every byte it declares; lzf may store 100 times less, not fewer."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.create_dataset("extra", shape=(1000,), dtype="float32", chunks=(100,))
        f["extra"][:100] = 1
    assert refused_on_open(path) == f"{path}: extra declares 4000 bytes of data but stores 400. {fix_hint(path)}"
    with h5py.File(path, "r+") as f:
        del f["extra"]
        f.create_dataset("extra", data=np.zeros(1000, np.float32), chunks=(1000,), compression="lzf")
        stored = f["extra"].id.get_storage_size()
    assert stored * 100 >= 4000
    open_cache(path)
    with h5py.File(path, "r+") as f:
        del f["extra"]
        f.create_dataset("extra", shape=(1000 * 100 * 100,), dtype="float32", chunks=(1000,), compression="lzf")
        f["extra"][:1000] = 0
        stored = f["extra"].id.get_storage_size()
    assert refused_on_open(path) == f"{path}: extra declares {4 * 10**7} bytes of data but stores {stored}. {fix_hint(path)}"


def test_check_sizes_refuses_a_scalar_per_row_dataset(tmp_path: Path) -> None:
    """A per-row dataset without a row dimension is refused like a short one."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        del f["view"]
        f.create_dataset("view", data=0)
    assert refused_on_open(path) == f"{path}: view has shape (), expected 6 rows (num_images). {fix_hint(path)}"


def test_check_rows_names_every_problem_in_one_sentence(tmp_path: Path) -> None:
    """Labels outside the names (-1 is fine), negative views, escaping paths and other layers, joined."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["labels"][0] = -2
        f["labels"][1] = -1  # unlabelled: fine
        f["labels"][3] = 2
        f["view"][4] = -1
        f["paths"][5] = b"/abs.jpg"
        f.attrs["layers"] = ["y"]
    assert refused_on_open(path) == (
        f"{path} is damaged: labels 0, 3 lie outside the 2 label names; view is negative in rows 4; paths 5 are "
        "absolute or leave the data root (e.g. '/abs.jpg'); features holds ['x'], the attribute layers says ['y']. "
        f"{fix_hint(path)}")


@pytest.mark.parametrize("name,inside", [("a/b.jpg", True), ("b.jpg", True), ("..a/b", True), ("", False),
                                         ("/a", False), ("a/../b", False), ("..", False), ("a//b", False),
                                         ("a/", False)])
def test_is_relative_inside(name: str, inside: bool) -> None:
    """Relative, `/`-separated, no `..` part, no empty part; a name starting with `..` is fine."""
    assert is_relative_inside(name) is inside


@pytest.mark.parametrize("bad", ["", "/a", "a/", "a//b", "..", "../a", "a/..", "a/../b"])
def test_escaping_rows_finds_each_kind_of_escape_wherever_it_lies(bad: str) -> None:
    """Each kind of path that is not `is_relative_inside`, first, inside or last among good ones (names starting or
    ending in dots included), is found at its row; good paths alone give none."""
    good = ["a/b.jpg", "..a/b", "c/d..", "e.f/g"]
    assert escaping_rows(good) == []
    for at in range(len(good) + 1):
        assert escaping_rows([*good[:at], bad, *good[at:]]) == [at]


def test_open_cache_reads_the_metadata_as_written(tmp_path: Path) -> None:
    """Labels, views and stamps as int64, texts as str, the layer shapes, dtypes and path width."""
    path = tmp_path / "c.h5"
    writer = started(path, n=3, layers={"x": (4,), "m": (2, 3)})
    writer.write(0, [np.ones((3, 4), np.float32), np.ones((3, 2, 3), np.float32)], ["a/1", "b/é", "c/3"], [0, 1, 1],
                 ["val", "", "train"], [0, 2, 0], [(1, 2), (3, 4), (-1, -1)])
    writer.finalize(Progress(rows_written=3, files_done=3))
    cache = open_cache(path)
    assert cache.labels.dtype == np.int64 and cache.view.dtype == np.int64 and cache.file_stamps.dtype == np.int64
    assert cache.view.tolist() == [0, 2, 0] and cache.file_stamps.tolist() == [[1, 2], [3, 4], [-1, -1]]
    assert cache.paths.tolist() == ["a/1", "b/é", "c/3"] and cache.split.tolist() == ["val", "", "train"]
    assert cache.label_names == ["a", "b"] and cache.skipped == []
    assert cache.shapes == {"x": (4,), "m": (2, 3)} and cache.layers == ["m", "x"]  # HDF5 lists them by name
    assert cache.dtypes == {"x": np.dtype("float32"), "m": np.dtype("float32")}
    assert cache.path_bytes == 10  # the width planned at create (a/img0.jpg), not the longest path written
    assert cache.name == "c" and cache.augment == ""


def test_text_of_variable_length_strings(tmp_path: Path) -> None:
    """Variable-length string datasets (another writer's) read as str too."""
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("v", data=["a", "é"], dtype=h5py.string_dtype())
        f.create_dataset("s", data=np.array([b"x", b"\xff"]))
        assert store._text(tmp_path / "t.h5", f, "v").tolist() == ["a", "é"]
        assert store._text(tmp_path / "t.h5", f, "s").tolist() == ["x", "\\xff"]
        f.create_dataset("scalar", data=5)
        assert store._metadata(tmp_path / "t.h5", f, "scalar") == 5


# --- the Cache object ------------------------------------------------------------------------------------------------

def bare(paths: list[str], view: list[int], stamps: list[tuple[int, int]] | None = None, data_root: str = "/",
         **attrs) -> Cache:
    """A Cache of `paths` and `view` (labels alternate 0/1, split train) built without a file."""
    n = len(paths)
    return Cache(path=Path("/c/x.h5"), attrs=CacheAttrs.example(data_root=data_root, **attrs), shapes={"x": (2,)},
                 labels=np.arange(n) % 2, label_names=["a", "b"], split=np.array(["train"] * n), paths=np.array(paths),
                 view=np.array(view), file_stamps=np.array(stamps or [(-1, -1)] * n), dtypes={"x": np.dtype("f4")})


def test_images_group_the_views_of_one_path() -> None:
    """Rows with the same path share an image id, numbered in path order."""
    cache = bare(["b", "a", "b", "c"], [0, 0, 1, 0])
    assert cache.images.tolist() == [1, 0, 1, 2]


def test_data_id_hashes_the_clean_rows_sorted_by_path() -> None:
    """sha256 over 'path\\0label\\0split\\n' of the clean rows in path order, first 16 hex digits; augmented rows
    do not count."""
    cache = bare(["b", "a", "b", "c"], [0, 0, 1, 0])
    text = "a\x001\x00train\nb\x000\x00train\nc\x001\x00train\n"
    assert cache.data_id == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_augment_names_policy_and_views() -> None:
    """'<policy>×<K>' with augmented views, '' without."""
    assert bare(["a"], [0], augment=2, augment_policy="light").augment == "light×2"
    assert bare(["a"], [0], augment=0, augment_policy="light").augment == ""


def test_backbone_block_rows_and_name() -> None:
    """The backbone label, the file stem as name, the layers, and rows per block of bytes."""
    cache = bare(["a"], [0], backbone="models/net.keras")
    assert (cache.backbone, cache.name, cache.layers) == ("net", "x", ["x"])
    assert cache.block_rows("x", 80) == 10 and cache.block_rows("x", 7) == 1
    assert cache.block_rows("x") == store.COPY_BLOCK_BYTES // 8 == 1 << 20
    assert cache.block_rows("x", 87) == 10 and type(cache.block_rows("x", 87)) is int


def test_image_file_is_only_the_very_file_that_was_extracted(tmp_path: Path) -> None:
    """A regular file under an absolute data root with the recorded size and mtime; nothing else."""
    image = tmp_path / "a" / "x.jpg"
    image.parent.mkdir()
    image.write_bytes(b"12345")
    st = image.stat()
    (tmp_path / "a" / "d.jpg").mkdir()
    dst = os.stat(tmp_path / "a" / "d.jpg")
    cache = bare(["a/x.jpg", "a/y.jpg", "a/d.jpg", "a/z.jpg"], [0, 0, 0, 0],
                 [(5, st.st_mtime_ns), (-1, 0), (dst.st_size, dst.st_mtime_ns), (5, 1)], data_root=str(tmp_path))
    assert cache._stamps["a/x.jpg"] == (5, st.st_mtime_ns)
    assert cache.image_file("a/x.jpg") == image
    assert cache.image_file("a/y.jpg") is None  # unknown stamp
    assert cache.image_file("a/d.jpg") is None  # not a regular file
    assert cache.image_file("a/z.jpg") is None  # another mtime
    assert cache.image_file("a/none.jpg") is None  # not a row
    assert bare(["a/x.jpg"], [0], [(5, st.st_mtime_ns)], data_root="rel").image_file("a/x.jpg") is None
    assert bare(["x.jpg"], [0], [(5, 1)], data_root="/").image_file("x.jpg") is None  # the root folder
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    image.write_bytes(b"123456")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.image_file("a/x.jpg") is None  # another size
    image.unlink()
    assert cache.image_file("a/x.jpg") is None


def test_read_returns_rows_in_the_order_given(tmp_path: Path) -> None:
    """Rows come back in the order asked (repeats included), in the layer's stored dtype."""
    cache = open_cache(small(tmp_path / "c.h5", n=10))
    assert cache.read("x", [7, 2, 9, 2], block_rows=3)[:, 0].tolist() == [7, 2, 9, 2]
    assert cache.read("x")[:, 0].tolist() == list(range(10))
    assert cache.read("x", np.array([5]))[:, 1].tolist() == [5.25]
    assert cache.read("x").dtype == np.float32
    half = open_cache(small(tmp_path / "h.h5", n=3, dtype="float16"))
    assert half.read("x", [2]).dtype == np.float16 and half.read("x", [2]).tolist() == [[2, 2.25, 2.5, 2.75]]


def test_read_blocks_groups_file_rows_by_block_in_file_order_or_shuffled(tmp_path: Path) -> None:
    """Blocks of `block_rows` aligned file rows; positions index into `rows`; `rng` permutes the blocks."""
    path = small(tmp_path / "c.h5", n=10)
    got = [(p.tolist(), b[:, 0].tolist()) for p, b in read_blocks(path, "x", np.array([9, 0, 4, 3, 5]), 3)]
    assert got == [([1], [0]), ([3, 2, 4], [3, 4, 5]), ([0], [9])]
    shuffled = [p.tolist() for p, _ in read_blocks(path, "x", np.arange(10), 2, np.random.default_rng(0))]
    order = np.random.default_rng(0).permutation(5).tolist()
    assert shuffled == [[2 * i, 2 * i + 1] for i in order]
    floats = [(p.tolist(), b[:, 0].tolist()) for p, b in read_blocks(path, "x", np.array([9.0, 0.0, 4.0]), 3)]
    assert floats == [([1], [0]), ([2], [4]), ([0], [9])]  # row numbers given as floats are read as rows
    assert list(read_blocks(path, "x", np.array([], np.int64), 4)) == []


def test_read_blocks_refuses_a_replaced_file_and_names_nan_rows(tmp_path: Path) -> None:
    """A changed generation is refused as stale; NaN or inf is named by row with the fix."""
    path = small(tmp_path / "c.h5", n=10)
    cache = open_cache(path)
    assert len(list(cache.blocks("x", np.arange(10), 4))) == 3
    assert len(list(read_blocks(path, "x", np.arange(10), 4, generation=None))) == 3
    with h5py.File(path, "r+") as f:
        f.attrs["generation"] = "new"
        f["features/x"][3, 0] = np.inf
    with pytest.raises(StaleCache) as err:
        list(cache.blocks("x", np.arange(10), 4))
    assert str(err.value) == (f"{path} was replaced (updated, overwritten or merged) while this command was reading "
                              "it; run the command again.")
    with pytest.raises(DamagedCache) as err:
        list(read_blocks(path, "x", np.array([8, 3, 1]), 4))
    assert str(err.value) == f"{path} holds NaN or inf in rows 3 of features/x. {fix_hint(path)}"


def test_records_and_copy_rows(tmp_path: Path) -> None:
    """`records` yields every per-row dataset in blocks of about `block_bytes`; `copy_rows` writes them from
    `start` and returns the next free row."""
    source = open_cache(small(tmp_path / "s.h5", n=10))
    blocks = list(source.records(np.array([9, 1, 4]), block_bytes=32))  # 16-byte rows: two a block
    assert [len(b.paths) for b in blocks] == [2, 1]
    assert blocks[0] == Rows([blocks[0].features[0]], ["a/img9.jpg", "a/img1.jpg"] if False else
                             source.paths[[9, 1]].tolist(), [1, 1], ["", ""], [0, 0], [[-1, -1], [-1, -1]])
    assert blocks[0].features[0][:, 0].tolist() == [9, 1]
    assert [len(b.paths) for b in source.records(block_bytes=0)] == [1] * 10
    assert [len(b.paths) for b in source.records()] == [10]
    assert [b.paths for b in source.records(np.array([7.0, 2.0]))] == [source.paths[[7, 2]].tolist()]
    writer = started(tmp_path / "t.h5", n=6)
    try:
        assert copy_rows(source, writer, 2, np.array([5, 6, 7])) == 5
        assert copy_rows(source, writer, rows=np.array([0, 1])) == 2
        writer.write(5, *rows(1, first=5))
        writer.finalize(Progress(rows_written=6, files_done=6))
    finally:
        writer.close()
    assert open_cache(tmp_path / "t.h5").read("x")[:, 0].tolist() == [0, 1, 5, 6, 7, 5]


# --- second round: failures inside the writer, boundaries of reading ----------------------------------------------

def corrupt_chunk(path: Path, name: str, row: int = 0) -> None:
    """Flip the first stored byte of the chunk of dataset `name` holding `row`, in the file itself."""
    with h5py.File(path) as f:
        dset = f[name]
        info = dset.id.get_chunk_info_by_coord((row - row % dset.chunks[0],) + (0,) * (dset.ndim - 1))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        byte = raw.read(1)
        raw.seek(info.byte_offset)
        raw.write(bytes([byte[0] ^ 0xFF]))


def test_create_refuses_an_uncompressed_cache_the_file_size_limit_cannot_hold(tmp_path: Path,
                                                                              file_limit: Callable[[int], None],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk is allocated at creation: exactly the bytes it allocates fit, one byte less is refused in one line
    before HDF5 creates anything, and the lock is released."""
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 1 << 40)
    path = tmp_path / "c.h5"
    need = store._allocated_bytes(4, {"x": (4,)}, "float32", store._fixed_utf8([f"a/img{i}.jpg" for i in range(4)])
                                  .dtype.itemsize)
    assert need == 4 * (16 + 10 + 5 + 4 + 2 + 16)
    file_limit(need - 1)
    with pytest.raises(WriteFailed) as err:
        started(path)
    assert str(err.value) == (
        f"the disk is full or a file-size limit was reached (the file-size limit is {need - 1} bytes; the file has 0 "
        f"and may need {need} more) while writing {partial_path(path)}: free space (or raise the limit: ulimit -f) and "
        "rerun the same command.")
    assert not partial_path(path).exists()
    file_limit(need)
    started(path).close()  # fits exactly; and the refused run left no lock behind
    file_limit(1)
    started(tmp_path / "l.h5", compression="lzf").close()  # lzf allocates nothing at creation: not checked


def test_a_close_that_fails_is_recorded_and_never_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When HDF5's close fails, the writer marks it failed and locks the file id, so that neither `close` nor a
    finalizer closes it again; the error of the close itself is raised by `_close_file`."""
    writer = started(tmp_path / "c.h5")
    real_close, calls = writer.file.close, []

    def failing() -> None:
        calls.append(1)
        raise OSError(errno.EIO, "close failed")

    monkeypatch.setattr(writer.file, "close", failing)
    with pytest.raises(OSError, match="close failed"):
        writer._close_file()
    assert writer._close_failed is True and writer.file.id.locked
    writer._close_file()  # not tried again
    writer.close()  # releases the lock only
    assert calls == [1]
    writer.file.id.locked = False
    monkeypatch.undo()
    real_close()
    started(tmp_path / "c.h5").close()


def test_a_failed_rename_keeps_the_complete_partial_file_and_its_record(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename that fails is one sentence; the complete partial file and its record stay."""
    path = tmp_path / "c.h5"
    writer = started(path, n=2)
    writer.write(0, *rows(2))
    Progress(rows_written=2, files_done=2).save(path)
    real = os.replace

    def refuse(a, b):
        if Path(b) == path:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(a, b)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteFailed) as err:
        writer.finalize(Progress(rows_written=2, files_done=2))
    writer.close()
    assert str(err.value) == (f"writing {path} (renaming {partial_path(path).name} to it) failed "
                              f"({os.strerror(errno.EXDEV)}): check the disk, then rerun the same command; it resumes "
                              "from row 2.")
    assert not path.exists() and read_attrs(partial_path(path)).complete is True
    assert Progress.load(path) == Progress(rows_written=2, files_done=2)


class FailingParse:
    """Stands in for CacheAttrs in features.store: `parse` raises an I/O error on the calls numbered in `fail`."""

    def __init__(self, fail: set[int]):
        self.fail, self.calls = fail, 0

    def parse(self, raw, where):
        self.calls += 1
        if self.calls in self.fail:
            raise OSError(errno.EIO, "Input/output error")
        return CacheAttrs.parse(raw, where)

    def example(self, **kw):
        return CacheAttrs.example(**kw)


def test_a_finalize_step_that_fails_keeps_a_readable_partial_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while finalizing stops the writer; the partial file still reads back, so its record is kept and
    the rerun resumes from it."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(4))
    Progress(rows_written=4, files_done=4).save(path)
    monkeypatch.setattr(store, "CacheAttrs", FailingParse({1}))
    with pytest.raises(WriteFailed) as err:
        writer.finalize(Progress(rows_written=4, files_done=4))
    monkeypatch.undo()
    assert str(err.value) == (f"writing the end (skipped files, attributes) of {partial_path(path)} failed "
                              "(Input/output error): check the disk, then rerun the same command; it resumes from row "
                              "4.")
    assert not writer.file.id.valid and not path.exists()
    assert partial_path(path).exists() and Progress.load(path) == Progress(rows_written=4, files_done=4)
    writer.close()
    writer = CacheWriter.reopen(path)
    writer.finalize(Progress(rows_written=4, files_done=4))
    assert open_cache(path).read("x")[:, 0].tolist() == [0, 1, 2, 3]


def test_a_failed_write_whose_partial_file_cannot_be_read_back_starts_afresh(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """When the partial file no longer reads back, it and its record are removed and the rerun starts over."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(2))
    Progress(rows_written=2, files_done=2).save(path)
    monkeypatch.setattr(store, "CacheAttrs", FailingParse({1, 2}))
    with pytest.raises(WriteFailed) as err:
        writer.finalize(Progress(rows_written=2, files_done=2))
    monkeypatch.undo()
    writer.close()
    assert str(err.value) == (f"writing the end (skipped files, attributes) of {partial_path(path)} failed "
                              "(Input/output error): check the disk, then rerun the same command; the half-written "
                              "file could not be read back and was removed, so the rerun starts from the beginning.")
    assert not partial_path(path).exists() and not progress_path(path).exists()


def test_a_failed_write_without_a_record_keeps_the_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Without a progress record there is no resume clause, and the partial file stays."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(2))
    monkeypatch.setattr(store, "CacheAttrs", FailingParse({1, 2}))
    with pytest.raises(WriteFailed) as err:
        writer.finalize(Progress(rows_written=2, files_done=2))
    monkeypatch.undo()
    writer.close()
    assert str(err.value) == (f"writing the end (skipped files, attributes) of {partial_path(path)} failed "
                              "(Input/output error): check the disk, then rerun the same command.")
    assert partial_path(path).exists()


def test_a_failed_write_after_a_failed_close_keeps_the_partial_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A close that failed leaves HDF5 holding the file: it is not reopened to check it, and it is kept."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(2))
    Progress(rows_written=2, files_done=2).save(path)
    writer._close_failed = True
    checked = []
    monkeypatch.setattr(CacheWriter, "_readable", lambda self, a, b: checked.append((a, b)) or False)
    err = writer._fail(OSError(errno.EIO, "x"), "W", 2)
    assert checked == [] and partial_path(path).exists()
    assert str(err) == "writing W failed (Input/output error): check the disk, then rerun the same command; it " \
                       "resumes from row 2."
    writer._close_failed = False
    writer.close()


def test_fail_checks_the_chunks_from_the_recorded_row_to_the_failed_one(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`_fail` reads back from the recorded row to the row after the failed write."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    Progress(rows_written=3, files_done=3).save(path)
    checked = []
    monkeypatch.setattr(CacheWriter, "_readable", lambda self, a, b: checked.append((a, b)) or True)
    writer._fail(OSError(errno.ENOSPC, "x"), "W", 4)
    assert checked == [(3, 4)]
    writer.close()


def test_fail_passes_other_errors_through(tmp_path: Path) -> None:
    """An error with no errno that is no OSError is the caller's bug: returned as it is; an OSError without an errno
    is an I/O error all the same."""
    writer = started(tmp_path / "c.h5")
    bug = KeyError("x")
    assert writer._fail(bug, "W", 1) is bug
    writer.close()
    writer = started(tmp_path / "d.h5")
    quoted = RuntimeError("write failed, errno = 5, error message")
    assert isinstance(writer._fail(quoted, "W", 1), WriteFailed)
    writer.close()
    writer = started(tmp_path / "e.h5")
    bare_os = OSError("no errno")
    assert str(writer._fail(bare_os, "W", 1)) == "writing W failed (no errno): check the disk, then rerun the same " \
                                                 "command."
    writer.close()


def test_readable_reads_back_exactly_the_chunks_from_rows_to_stop(tmp_path: Path) -> None:
    """Chunks (4 rows each here) from the one holding `rows` to the one holding `stop` - 1; a damaged chunk outside
    them does not matter."""
    from tests.test_store import MAP, _maps

    path = tmp_path / "c.h5"
    X, y = _maps(16)
    writer = started(path, n=16, layers={"map": MAP})
    writer.write(0, [X], [f"a/img{i}.jpg" for i in range(16)], y.tolist(), [""] * 16, [0] * 16, [(1, 1)] * 16)
    writer.close()
    corrupt_chunk(partial_path(path), "features/map", 8)  # rows 8-11
    assert writer._readable(0, 8) is True
    assert writer._readable(12, 16) is True
    assert writer._readable(12, 4) is True  # stop before rows: only the chunk of rows, which is fine
    assert writer._readable(9, 10) is False
    assert writer._readable(4, 9) is False
    assert writer._readable(11, 11) is False
    assert writer._readable(0, 100) is False
    corrupt_chunk(partial_path(path), "features/map", 8)  # flipped back
    corrupt_chunk(partial_path(path), "labels", 0)  # the per-row datasets are checked too
    assert writer._readable(0, 1) is False
    corrupt_chunk(partial_path(path), "labels", 0)
    with h5py.File(partial_path(path), "r+") as f:
        f.attrs["image_size"] = "x"
    assert writer._readable(0, 1) is False


def test_abandon_leaves_the_disk_as_the_last_flush_left_it(tmp_path: Path) -> None:
    """What HDF5 still holds after the last flush is written to a scratch file, never to the partial file."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(2))
    before = partial_path(path).read_bytes()
    writer.file.attrs["unflushed"] = "x" * 5000
    writer._abandon()
    assert not writer.file.id.valid
    assert partial_path(path).read_bytes() == before
    writer._abandon()  # already closed: nothing happens
    writer.close()
    assert read_attrs(partial_path(path)) is not None


def test_close_flushes_and_closes_the_file(tmp_path: Path) -> None:
    """`close` writes what HDF5 holds (unlike `_abandon`) and releases the lock."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.file.attrs["late"] = "kept"
    writer.close()
    assert not writer.file.id.valid
    with h5py.File(partial_path(path)) as f:
        assert f.attrs["late"] == "kept"
    writer.close()  # twice is fine
    started(path).close()


def test_a_write_of_rows_of_the_wrong_shape_raises_h5pys_error(tmp_path: Path) -> None:
    """A shape mismatch is h5py's own TypeError, not a disk error."""
    writer = started(tmp_path / "c.h5", n=4)
    args = rows(2)
    args[0] = [np.zeros((2, 5), np.float32)]
    with pytest.raises(TypeError, match="Can't broadcast"):
        writer.write(0, *args)
    writer.close()


def test_write_then_reopen_reads_rows_written_before(tmp_path: Path) -> None:
    """A resumed write continues in the same datasets."""
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(2))
    writer.close()
    writer = CacheWriter.reopen(path)
    writer.write(2, *rows(2, first=2))
    writer.finalize(Progress(rows_written=4, files_done=4))
    assert open_cache(path).read("x")[:, 0].tolist() == [0, 1, 2, 3]


def test_reopen_of_damaged_attributes_names_the_partial_file(tmp_path: Path) -> None:
    """The refusal names the partial file, not the target."""
    path = tmp_path / "c.h5"
    started(path).close()
    with h5py.File(partial_path(path), "r+") as f:
        f.attrs["image_size"] = "x"
    with pytest.raises(DamagedCache) as err:
        CacheWriter.reopen(path)
    assert str(err.value).startswith(f"{partial_path(path)}: root attribute 'image_size' is 'x', expected int. ")


def test_open_cache_names_the_file_of_a_mistyped_attribute(tmp_path: Path) -> None:
    """open_cache names the file quoted, existing_cache names it plain."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["image_size"] = "x"
    with pytest.raises(DamagedCache) as err:
        open_cache(path)
    assert str(err.value).startswith(f"{str(path)!r}: root attribute 'image_size' is 'x', expected int. ")
    with pytest.raises(DamagedCache) as err:
        existing_cache(path)
    assert str(err.value).startswith(f"{path}: root attribute 'image_size' is 'x', expected int. ")


@pytest.mark.parametrize("name", ["labels", "view", "file_stamp", "paths", "split", "label_names"])
def test_damaged_metadata_is_named_with_the_file(tmp_path: Path, name: str) -> None:
    """A checksum failure in any metadata dataset names the file, the rows and the dataset."""
    path = small(tmp_path / "c.h5")
    corrupt_chunk(path, name)
    n = 2 if name == "label_names" else 6
    assert refused_on_open(path) == (f"{path} is damaged: rows 0-{n - 1} of {name} fail their checksum (OSError from HDF5). "
                              f"{fix_hint(path)}")


def test_a_dangling_soft_link_for_features_reads_outside(tmp_path: Path) -> None:
    """A soft link in place of the features group is a read outside the file, not a missing group."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        del f["features"]
        f["features"] = h5py.SoftLink("/nowhere")
    with pytest.raises(ForeignFile) as err:
        open_cache(path)
    assert str(err.value).startswith(f"{str(path)!r} reads data from outside its own file (features is a SoftLink)")


def test_check_sizes_at_half_the_declared_bytes(tmp_path: Path) -> None:
    """Uncompressed data storing half what it declares is refused (no factor for uncompressed data)."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.create_dataset("extra", shape=(1000,), dtype="float32", chunks=(100,))
        f["extra"][:500] = 1
    with pytest.raises(DamagedCache, match="extra declares 4000 bytes of data but stores 2000"):
        open_cache(path)


def test_a_virtual_merge_reads_and_is_checked_past_its_virtual_datasets(tmp_path: Path) -> None:
    """Rows come from the shards in order; the datasets after the virtual ones are size-checked too; the features
    carry their layer, shape and the shards' generations."""
    path = virtual_merge(tmp_path)
    X, y = separable(4, 2, 3)
    cache = open_cache(path)
    assert np.array_equal(cache.read("vec"), np.concatenate([X[0::2], X[1::2]]))
    with h5py.File(path) as f:
        dset = f["features/vec"]
        assert dset.attrs["layer"] == "vec" and dset.attrs["shape"].tolist() == [3]
        assert [v.split(":")[0] for v in plain_list(dset.attrs[store.SOURCE_GENERATIONS])] == \
            ["v.shard0-of-2.h5", "v.shard1-of-2.h5"]
    with h5py.File(path, "r+") as f:
        f.create_dataset("zz", shape=(1000,), dtype="float32", chunks=(100,))
        f["zz"][:100] = 1
    with pytest.raises(DamagedCache, match="zz declares 4000 bytes of data but stores 400"):
        open_cache(path)


def plain_list(values: np.ndarray | list) -> list[str]:
    """Attribute strings as str, whether h5py gives bytes or str."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def test_virtual_sources_with_a_colon_in_their_name(tmp_path: Path) -> None:
    """The generation is after the last colon of `<file>:<generation>`."""
    X, y = separable(2, 2, 3)
    shard = write_cache(tmp_path / "a:b.h5", {"vec": X}, y)
    generation = read_attrs(shard).generation
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        layout = h5py.VirtualLayout(shape=(4, 3), dtype="float32")
        layout[0:4] = h5py.VirtualSource("a:b.h5", "features/vec", shape=(4, 3))
        dset = f.create_virtual_dataset("features/vec", layout, fillvalue=np.nan)
        dset.attrs[store.SOURCE_GENERATIONS] = [f"a:b.h5:{generation}", "no colon"]
    with h5py.File(path) as f:
        assert store._virtual_problems(path, "features/vec", f["features/vec"]) == []


def test_read_blocks_reads_only_the_rows_of_each_block(tmp_path: Path) -> None:
    """A block reads from its first to its last row, not one row more (which could be a damaged chunk)."""
    path = damaged(tmp_path)
    got = np.concatenate([b for _, b in read_blocks(path, "map", np.arange(8), 16)])
    assert got.shape == (8, 64, 64, 16)
    with pytest.raises(DamagedCache) as err:
        list(read_blocks(path, "map", np.arange(9), 16))
    assert str(err.value) == (f"{path} is damaged: rows 8 of features/map fail their checksum (OSError from HDF5). "
                              f"{fix_hint(path)}")


def test_read_blocks_keeps_repeated_rows_in_the_order_given(tmp_path: Path) -> None:
    """Positions of equal rows come in the order they were asked for (a stable sort)."""
    path = small(tmp_path / "c.h5", n=4)
    wanted = np.array([3, 1, 2] * 30 + [0] * 20)
    positions = np.concatenate([p for p, _ in read_blocks(path, "x", wanted, 100)])
    assert positions.tolist() == np.argsort(wanted, kind="stable").tolist()


def test_read_falls_back_to_the_whole_range_when_no_chunk_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails while every chunk reads alone names the whole range."""

    class Unreadable:
        name = "/features/x"

        def __getitem__(self, key):
            raise OSError("checksum")

    monkeypatch.setattr(store, "_scan_block", lambda dset, start, stop: [])
    with pytest.raises(DamagedCache) as err:
        store._read(Path("c.h5"), Unreadable(), 3, 6)
    assert str(err.value).startswith("c.h5 is damaged: rows 3-5 of features/x fail their checksum (OSError from")


def test_scan_block_steps_by_the_datasets_own_chunks(tmp_path: Path) -> None:
    """Chunks of 3 rows: exactly the 3 rows of the damaged chunk."""
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("x", data=np.ones((12, 8), np.float32), chunks=(3, 8), fletcher32=True)
    corrupt_chunk(tmp_path / "s.h5", "x", 3)
    with h5py.File(tmp_path / "s.h5") as f:
        assert store._scan_block(f["x"], 0, 12) == [3, 4, 5]
        assert store._scan_block(f["x"], 4, 12) == [4, 5]


def test_verify_reports_every_damaged_block_and_nan_in_the_first_row(tmp_path: Path) -> None:
    """Damage in two blocks is reported together; NaN in row 0 and the last row are both found."""
    from tests.test_store import _overwrite_rows

    path = damaged(tmp_path)
    _overwrite_rows(path, "map", 21, bytes(64 * 64 * 16 * 4))
    assert [d.line() for d in verify(path, block_bytes=1 << 20).damage] == \
        ["features/map: rows 8-11, 20-23 fail their checksum"]
    nan = small(tmp_path / "n.h5", n=6)
    with h5py.File(nan, "r+") as f:
        f["features/x"][0, 0] = np.nan
        f["features/x"][5, 0] = np.inf
    assert [d.line() for d in verify(nan, block_bytes=32).damage] == ["features/x: rows 0, 5 hold NaN or inf"]


def test_block_rows_and_records_of_empty_rows(tmp_path: Path) -> None:
    """A layer or a selection of no bytes a row counts as one byte a row."""
    cache = bare(["a"], [0])
    cache.shapes["e"], cache.dtypes["e"] = (0,), np.dtype("f4")
    assert cache.block_rows("e", 80) == 80
    source = open_cache(small(tmp_path / "s.h5", n=10))
    assert [len(b.paths) for b in source.records(layers=[], block_bytes=4)] == [4, 4, 2]


def test_image_file_accepts_an_empty_file_and_one_from_before_1970(tmp_path: Path) -> None:
    """Size 0 and a negative mtime are stamps of real files; only size -1 means unknown."""
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    old = tmp_path / "o.jpg"
    old.write_bytes(b"123")
    os.utime(old, ns=(0, -10**9))
    cache = bare(["e.jpg", "o.jpg"], [0, 0], [(0, empty.stat().st_mtime_ns), (3, -10**9)], data_root=str(tmp_path))
    assert cache.image_file("e.jpg") == empty
    assert cache.image_file("o.jpg") == old


def test_image_file_refuses_a_relative_or_filesystem_root_data_root(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A data root that is relative (it would depend on the working folder) or `/` itself is never used."""
    image = tmp_path / "rel" / "x.jpg"
    image.parent.mkdir()
    image.write_bytes(b"12345")
    stamp = (5, image.stat().st_mtime_ns)
    monkeypatch.chdir(tmp_path)
    assert bare(["x.jpg"], [0], [stamp], data_root="rel").image_file("x.jpg") is None
    assert bare(["x.jpg"], [0], [stamp], data_root=str(tmp_path / "rel")).image_file("x.jpg") == image
    under_root = str(image.relative_to("/"))
    assert bare([under_root], [0], [stamp], data_root="/").image_file(under_root) is None


def test_readable_of_a_reopened_virtual_merge_checks_the_rows_after_its_virtual_features(tmp_path: Path) -> None:
    """A reopened virtual merge lists its virtual (unchunked) features among its layers: they are passed over, and
    the per-row datasets after them are still read back."""
    X, y = separable(2, 2, 3)
    shard = open_cache(write_cache(tmp_path / "s.h5", {"vec": X}, y))
    path = tmp_path / "m.h5"
    writer = started(path, n=4, layers={})
    writer.link_features(*concatenation([shard]), {"vec": (3,)}, {"vec": np.dtype("float32")})
    writer.write(0, [], *rows(4)[1:])
    writer.close()
    with h5py.File(partial_path(path), "r+") as f:
        f.attrs["layers"] = ["vec"]
    writer = CacheWriter.reopen(path)
    writer.close()
    assert writer.layers == ["vec"] and writer._readable(0, 4) is True
    corrupt_chunk(partial_path(path), "labels", 0)
    assert writer._readable(0, 4) is False


def virtual_over(path: Path, source: str, pinned: list[str] | None) -> h5py.File:
    """A file whose features/vec is virtual over `source` (4 rows of 3), pinning `pinned` (no attribute: None)."""
    with h5py.File(path, "w") as f:
        layout = h5py.VirtualLayout(shape=(4, 3), dtype="float32")
        layout[0:4] = h5py.VirtualSource(source, "features/vec", shape=(4, 3))
        dset = f.create_virtual_dataset("features/vec", layout, fillvalue=np.nan)
        if pinned is not None:
            dset.attrs[store.SOURCE_GENERATIONS] = pinned
    return h5py.File(path, "r")


@pytest.mark.parametrize("source", ["", ".", ".."])
def test_virtual_sources_that_are_no_sibling_are_refused_even_when_pinned(tmp_path: Path, source: str) -> None:
    """The file itself ('' or '.') or the folder above is never a shard, whatever the attribute pins."""
    with virtual_over(tmp_path / "m.h5", source, [f"{source}:gen"]) as f:
        assert store._virtual_problems(tmp_path / "m.h5", "features/vec", f["features/vec"]) == [
            f"features/vec is virtual over {source!r}, not a cache beside it that a merge linked"]


def test_virtual_sources_without_pinned_generations_are_refused(tmp_path: Path) -> None:
    """A virtual dataset without the generations attribute pins nothing: refused."""
    small(tmp_path / "s.h5")
    with virtual_over(tmp_path / "m.h5", "s.h5", None) as f:
        assert store._virtual_problems(tmp_path / "m.h5", "features/vec", f["features/vec"]) == [
            "features/vec is virtual over 's.h5', not a cache beside it that a merge linked"]


@pytest.mark.parametrize("pinned", ["?", "", "None"])
def test_a_sibling_that_is_no_cache_is_refused_whatever_generation_was_pinned(tmp_path: Path, pinned: str) -> None:
    """A shard replaced by a file that is not a cache has no generation at all: no pinned value matches it."""
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("features/vec", data=np.ones((4, 3), np.float32))
    with virtual_over(tmp_path / "m.h5", "s.h5", [f"s.h5:{pinned}"]) as f:
        assert store._virtual_problems(tmp_path / "m.h5", "features/vec", f["features/vec"]) == [
            "features/vec reads the shard 's.h5', which was replaced or damaged since the merge"]


def test_copy_rows_copies_only_the_writers_layers_by_name(tmp_path: Path) -> None:
    """A writer with fewer layers than the source gets its own layers' rows, whatever the source's order."""
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    source = open_cache(write_cache(tmp_path / "s.h5", {"a": X, "b": -X}, np.arange(6) % 2))
    writer = started(tmp_path / "t.h5", n=6, layers={"b": (2,)})
    try:
        assert copy_rows(source, writer) == 6
        writer.finalize(Progress(rows_written=6, files_done=6))
    finally:
        writer.close()
    assert np.array_equal(open_cache(tmp_path / "t.h5").read("b"), -X)


def test_link_features_places_each_source_after_the_previous_ones(tmp_path: Path) -> None:
    """Three shards of 2, 3 and 1 rows: rows 0-1, 2-4 and 5 of the virtual dataset, in the layer's dtype."""
    sizes, sources = [2, 3, 1], []
    for i, n in enumerate(sizes):
        X = np.full((n, 3), i, np.float16)
        sources.append(open_cache(write_cache(tmp_path / f"s{i}.h5", {"vec": X}, np.arange(n) % 2, dtype="float16")))
    writer = started(tmp_path / "m.h5", n=6, layers={})
    try:
        writer.link_features(*concatenation(sources), {"vec": (3,)}, {"vec": np.dtype("float16")})
    finally:
        writer.close()
    with h5py.File(partial_path(tmp_path / "m.h5")) as f:
        vec = f["features/vec"]
        assert vec.dtype == np.float16 and vec.shape == (6, 3)
        assert vec[:, 0].tolist() == [0, 0, 1, 1, 1, 2]
        assert plain_list(vec.attrs[store.SOURCE_GENERATIONS]) == [f"s{i}.h5:{s.attrs.generation}"
                                                                    for i, s in enumerate(sources)]


def test_a_stale_check_names_the_file_of_damaged_attributes(tmp_path: Path) -> None:
    """Reading blocks re-reads the attributes to compare generations: damaged ones are refused naming the file."""
    path = small(tmp_path / "c.h5")
    cache = open_cache(path)
    with h5py.File(path, "r+") as f:
        f.attrs["image_size"] = "x"
    with pytest.raises(DamagedCache) as err:
        list(cache.blocks("x", np.arange(6), 6))
    assert str(err.value).startswith(f"{path}: root attribute 'image_size' is 'x', expected int. ")


def test_a_progress_record_that_cannot_be_replaced_is_one_line_and_kept(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the record is replaced: one sentence naming the record and the row the rerun resumes
    from; the previous record stays and no temporary file is left."""
    path = tmp_path / "c.h5"
    Progress(rows_written=8, files_done=9).save(path)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteFailed) as err:
        Progress(rows_written=16, files_done=17).save(path)
    monkeypatch.undo()
    assert str(err.value) == (
        f"the disk is full or a file-size limit was reached (No space left on device) while writing the progress "
        f"record {progress_path(path)}: free space (or raise the limit: ulimit -f) and rerun the same command; it "
        "resumes from row 8.")
    assert Progress.load(path) == Progress(rows_written=8, files_done=9)
    assert [p.name for p in tmp_path.iterdir()] == [progress_path(path).name]


def test_verify_names_the_file_it_refuses_and_checks_the_label_names(tmp_path: Path) -> None:
    """verify refuses another schema or a short per-row dataset naming the file, and reads the label names too."""
    path = small(tmp_path / "c.h5")
    corrupt_chunk(path, "label_names")
    assert [d.line() for d in verify(path).damage] == ["label_names: rows 0-1 fail their checksum"]
    short = small(tmp_path / "s.h5")
    with h5py.File(short, "r+") as f:
        f["labels"].resize(5, axis=0)
    with pytest.raises(DamagedCache) as err:
        verify(short)
    assert str(err.value) == f"{short}: labels has shape (5,), expected 6 rows (num_images). {fix_hint(short)}"
    other = small(tmp_path / "o.h5")
    with h5py.File(other, "r+") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(SchemaMismatch) as err:
        verify(other)
    assert str(err.value).startswith(f"{str(other)!r} has schema_version=1; ")


def test_cache_blocks_passes_the_shuffle_on(tmp_path: Path) -> None:
    """`Cache.blocks` with a generator yields the blocks in the order that generator permutes them."""
    cache = open_cache(small(tmp_path / "c.h5", n=10))
    order = np.random.default_rng(0).permutation(5).tolist()
    got = [p.tolist() for p, _ in cache.blocks("x", np.arange(10), 2, np.random.default_rng(0))]
    assert order != sorted(order) and got == [[2 * i, 2 * i + 1] for i in order]


def test_abandon_after_a_failed_close_leaves_the_descriptor_alone(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a close has failed, `_abandon` does nothing: the file's descriptor still leads to the partial file."""
    path = tmp_path / "c.h5"
    writer = started(path)
    real_close = writer.file.close

    def failing() -> None:
        raise OSError(errno.EIO, "close failed")

    monkeypatch.setattr(writer.file, "close", failing)
    with pytest.raises(OSError, match="close failed"):
        writer._close_file()
    fd = writer.file.id.get_vfd_handle()
    writer._abandon()
    assert os.readlink(f"/proc/self/fd/{fd}") == str(partial_path(path))
    writer.close()
    writer.file.id.locked = False
    monkeypatch.undo()
    real_close()


# --- linked caches: parts, their map, and pruning ----------------------------------------------------------------

def test_a_part_is_hidden_beside_its_cache_named_by_generation_without_an_h5_suffix() -> None:
    from features.store import part_path

    assert part_path(Path("d/x.h5"), "ab12") == Path("d/.x.h5.part-ab12")


def linked_cache(tmp_path: Path, runs: list[tuple[int, int, int]]) -> Path:
    """x.h5 of len(rows) rows linked to the caches p0, p1 (4 rows each) by (source, first row, rows) runs."""
    from features.store import Linked

    sources = [open_cache(small(tmp_path / f"p{k}", n=4)) for k in range(2)]
    source = np.concatenate([[k] * n for k, _, n in runs])
    row = np.concatenate([np.arange(r, r + n) for _, r, n in runs])
    meta = CacheAttrs.example(layers=["x"], compression="none", num_candidates=len(source))
    writer = CacheWriter.create(tmp_path / "x.h5", meta, {}, [f"a/img{i}.jpg" for i in range(len(source))], ["a", "b"])
    writer.link_features([Linked(c.path, c.attrs.generation, 4) for c in sources], source, row, {"x": (4,)},
                         {"x": np.dtype("float32")})
    writer.write(0, [], *rows(len(source))[1:])
    writer.finalize(Progress(rows_written=len(source), files_done=len(source)))
    return tmp_path / "x.h5"


def test_link_features_maps_runs_of_rows_and_linked_rows_reads_them_back(tmp_path: Path) -> None:
    from features.store import linked_rows

    path = linked_cache(tmp_path, [(1, 2, 2), (0, 0, 1), (0, 3, 1), (1, 0, 1)])
    cache = open_cache(path)
    p0, p1 = (open_cache(tmp_path / f"p{k}").read("x") for k in range(2))
    np.testing.assert_array_equal(cache.read("x"), np.stack([p1[2], p1[3], p0[0], p0[3], p1[0]]))
    files, source, row = linked_rows(cache)
    assert [f.path.name for f in files] == ["p1", "p0"] and [f.rows for f in files] == [4, 4]
    assert source.tolist() == [0, 0, 1, 1, 0] and row.tolist() == [2, 3, 0, 3, 0]
    with h5py.File(path, "r") as f:
        assert f["features/x"].id.get_create_plist().get_virtual_count() == 4  # one mapping per run


@pytest.mark.parametrize("tamper", ["a source not pinned", "a pin without a colon", "rows left out",
                                    "a row mapped twice", "another dataset", "a plain layer"])
def test_linked_rows_of_a_mapping_it_did_not_write_is_none(tmp_path: Path, tamper: str) -> None:
    """Whatever an update could not map row by row is read through HDF5 instead (the update rewrites)."""
    from features.store import linked_rows

    path = linked_cache(tmp_path, [(0, 0, 2), (1, 0, 2)])
    cache = open_cache(path)
    assert linked_rows(cache) is not None
    p0, p1 = (open_cache(tmp_path / f"p{k}") for k in range(2))
    with h5py.File(path, "r+") as f:
        dset = f["features/x"]
        if tamper in ("a source not pinned", "a pin without a colon"):
            dset.attrs[store.SOURCE_GENERATIONS] = [f"p0:{p0.attrs.generation}"] + (
                ["p1"] if tamper == "a pin without a colon" else [])
        else:
            attrs = dict(dset.attrs)
            del f["features/x"]
            if tamper == "a plain layer":
                f.create_dataset("features/x", data=np.zeros((4, 4), np.float32))
            else:
                layout = h5py.VirtualLayout((4, 4), np.float32)
                name = "features/y" if tamper == "another dataset" else "features/x"
                layout[0:2] = h5py.VirtualSource("p0", name, shape=(4, 4))[0:2]
                if tamper == "a row mapped twice":
                    layout[1:3] = h5py.VirtualSource("p1", "features/x", shape=(4, 4))[0:2]
                f.create_virtual_dataset("features/x", layout, fillvalue=np.nan)
            f["features/x"].attrs.update(attrs)
    assert linked_rows(cache) is None


def test_prune_parts_removes_the_unread_parts_of_this_cache_only(tmp_path: Path) -> None:
    from features.store import part_path, prune_parts

    cache = small(tmp_path / "x.h5")
    read_part = small(part_path(cache, "a1"))
    unread = small(part_path(cache, "b2"))
    foreign = part_path(cache, "c3")
    foreign.write_text("not a cache")
    other = small(part_path(tmp_path / "y.h5", "d4"))
    with h5py.File(cache, "a") as f:
        f["features/x"].attrs[store.SOURCE_GENERATIONS] = [f"{read_part.name}:a1"]
    prune_parts(cache)
    assert read_part.exists() and not unread.exists() and foreign.exists() and other.exists()
    cache.unlink()
    prune_parts(cache)  # nothing there any more: no part is read
    assert not read_part.exists() and foreign.exists()

# --- survivors of the full run ---------------------------------------------------------------------------------------

def test_text_of_an_empty_variable_length_dataset_is_an_empty_str_array(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("v", shape=(0,), dtype=h5py.string_dtype())
        got = store._text(tmp_path / "t.h5", f, "v")
    assert got.dtype.kind == "U" and got.shape == (0,)


def test_a_cache_without_a_skipped_dataset_opens_with_nothing_skipped(tmp_path: Path) -> None:
    """`skipped` is optional (docs/hdf5-schema.md): a cache whose writer recorded none opens, listing none."""
    path = small(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        del f["skipped"]
    assert open_cache(path).skipped == []


def test_a_feature_dataset_with_another_row_count_than_the_cache_is_damaged(tmp_path: Path) -> None:
    path = small(tmp_path / "c.h5", n=6)
    with h5py.File(path, "a") as f:
        f["features/x"].resize(5, axis=0)
    with pytest.raises(DamagedCache, match=r"c\.h5: features/x has shape \(5, 4\), expected 6 rows \(num_images\)"):
        open_cache(path)


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_every_per_row_dataset_grows_is_checksummed_and_chunked_by_rows(tmp_path: Path, compression: str) -> None:
    """One row: chunks of one row; the features' chunks hold rows_per_chunk rows, the metadata's TEXT_ROWS; lzf, or
    every chunk allocated with the file."""
    from features.store import TEXT_ROWS

    for n in (1, 3):
        writer = started(tmp_path / f"c{n}{compression}.h5", n=n, compression=compression)
        f = writer.file
        for name in ["features/x", "paths", "split", "labels", "view", "file_stamp"]:
            ds = f[name]
            rows = store.rows_per_chunk((4,), "float32") if name == "features/x" else TEXT_ROWS
            assert ds.chunks[0] == min(rows, n) and ds.maxshape[0] is None and ds.fletcher32, name
            assert ds.compression == (None if compression == "none" else "lzf"), name
            early = ds.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
            assert early == (compression == "none"), name
        writer.close()


def test_outside_reads_of_links_and_of_virtual_sources_are_all_named(tmp_path: Path) -> None:
    path = virtual_merge(tmp_path)
    with h5py.File(path, "r+") as f:
        f["a_soft"] = h5py.SoftLink("/labels")  # walked before features/: still named after its problems
        f["features/vec"].attrs[store.SOURCE_GENERATIONS] = ["v.shard1-of-2.h5:x"]
    with h5py.File(path) as f:
        found = store._outside_reads(path, f)
    assert sorted(found) == [
        "a_soft is a SoftLink",
        "features/vec is virtual over 'v.shard0-of-2.h5', not a cache beside it that a merge linked",
        "features/vec reads the shard 'v.shard1-of-2.h5', which was replaced or damaged since the merge"]
    with pytest.raises(ForeignFile) as err:
        open_cache(path)
    assert str(err.value) == (f"{str(path)!r} reads data from outside its own file ({'; '.join(found)}); this tool "
                              "never writes such a file and does not read it. Re-extract the cache from its images.")


def test_an_unlabelled_cache_has_no_label_names(tmp_path: Path) -> None:
    writer = started(tmp_path / "c.h5", n=2, label_names=[])
    assert writer.file["label_names"].shape == (0,) and writer.file["label_names"].chunks == (1,)
    writer.close()


def test_create_starts_an_incomplete_file_of_this_schema_whatever_attrs_say(tmp_path: Path) -> None:
    writer = started(tmp_path / "c.h5", schema_version=SCHEMA_VERSION - 1, complete=True, generation="old")
    attrs = CacheAttrs.parse(writer.file.attrs, "partial")
    assert (attrs.schema_version, attrs.complete, attrs.generation) == (SCHEMA_VERSION, False, "")
    writer.close()


class _FullDisk:
    """A dataset whose writes fail as on a full disk (anything else is the real dataset's)."""

    def __init__(self, dset: h5py.Dataset):
        self.dset = dset

    def __setitem__(self, key, value) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.dset, name)


def test_a_write_that_fails_names_its_rows_and_the_row_the_rerun_resumes_from(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.h5"
    writer = started(path, n=8)
    writer.write(0, *rows(4))
    Progress(rows_written=4, files_done=4).save(path)
    real = CacheWriter._uncached
    monkeypatch.setattr(CacheWriter, "_uncached", lambda self, name: _FullDisk(real(self, name)))
    with pytest.raises(WriteFailed) as err:
        writer.write(4, *rows(4, first=4))
    assert str(err.value) == (f"the disk is full or a file-size limit was reached (No space left on device) while "
                              f"writing rows 4-7 of {partial_path(path)}: free space (or raise the limit: ulimit -f) "
                              "and rerun the same command; it resumes from row 4.")
    writer.close()


def test_finalize_without_room_names_what_it_was_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.h5"
    writer = started(path, n=4)
    writer.write(0, *rows(4))
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 0)
    with pytest.raises(WriteFailed, match=rf"while writing the end \(skipped files, attributes\) of "
                                          rf"{re.escape(str(partial_path(path)))}: free space"):
        writer.finalize(Progress(rows_written=4, files_done=4))
    writer.close()


def test_a_cache_says_whether_its_features_are_virtual(tmp_path: Path) -> None:
    assert open_cache(virtual_merge(tmp_path)).virtual is True
    assert open_cache(small(tmp_path / "c.h5")).virtual is False
