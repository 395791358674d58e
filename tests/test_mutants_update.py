"""features/update.py without a backbone: which old rows an update keeps (`reusable_rows`), how the kept and the
computed rows are linked (`link_plan`, `write_linked`) or assembled in the new order and in blocks of whole chunks
(`assemble`), and what the reader of the kept rows checks (`_KeptRows`). Caches are fabricated through the real writer (classifiers.testing.write_cache), so
each test takes milliseconds: these are the tests `make mutate MODULES=features/update.py` runs first."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import features.store
import features.update
from classifiers.testing import write_cache
from features.catalog import Catalog
from features.schema import DamagedCache, StaleCache
from features.store import Cache, CacheWriter, Linked, fix_hint, linked_rows, open_cache, part_path
from features.update import (_KeptRows, _keys, _label_map, assemble, computed_rows, link_plan, max_runs,
                             reusable_rows, update_path, write_linked)

SHAPE = (3, 4)  # a feature row: 12 float32, 48 bytes, two axes (rows are flattened before their sum is checked)
UNKNOWN = (-1, -1)  # the stamp write_cache records for every row


def features_of(n: int, seed: int) -> np.ndarray:
    """n distinct rows of SHAPE, every value different from every other cache's."""
    return (np.arange(n * 12, dtype=np.float32).reshape(n, *SHAPE) + 1000 * seed) / 8


def catalog(
        paths: list[str], labels: list[int], names: list[str], stamps: list[tuple[int, int]] | None = None, splits:
        list[str] | None = None, views: list[int] | None = None) -> Catalog:
    return Catalog(Path("/data"), paths, labels, splits or [""] * len(paths), names, "classes", [],
                   views=views or [], file_stamps=stamps or [UNKNOWN] * len(paths))


def test_update_path_is_hidden_beside_the_cache_without_an_h5_suffix() -> None:
    """The scratch cache of an update: '.<name>.update' in the cache's folder."""
    assert update_path(Path("caches/x.h5")) == Path("caches/.x.h5.update")


def test_keys_name_each_row_by_path_and_view() -> None:
    """_keys maps (path as str, view as int) to the row index."""
    assert _keys(np.array(["a/1.jpg", "a/1.jpg", "b/2.jpg"]), np.array([0, 1, 0], np.int16)) == {
        ("a/1.jpg", 0): 0, ("a/1.jpg", 1): 1, ("b/2.jpg", 0): 2}


def test_label_map_renumbers_old_labels_for_the_new_class_list() -> None:
    """Old index -> new index; a class the new list lacks -> -2; the extra last entry maps unlabelled (-1) to -1."""
    mapped = _label_map(["ants", "bees", "gone"], ["aphids", "ants", "bees"])
    assert mapped.dtype == np.int64 and mapped.tolist() == [1, 2, -2, -1]
    assert mapped[-1] == -1  # indexing the map with label -1 keeps an unlabelled row unlabelled


def test_reusable_rows_keeps_exactly_the_rows_of_unchanged_files(tmp_path: Path) -> None:
    """A row is kept only if its path is there with the same stamp (both size and mtime), split and label name."""
    old_paths = ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg", "a/4.jpg", "b/5.jpg", "gone/6.jpg", "x/7.jpg"]
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": features_of(8, 0)}, [0, 0, 0, 0, 0, 1, 2, -1],
                                 label_names=["a", "b", "gone"], paths=old_paths,
                                 split=["train"] * 7 + ["test"]))
    names = ["Z", "a", "b"]  # a class added first: every kept label is renumbered
    new = catalog(
        ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg", "a/4.jpg", "a/4b.jpg", "b/5.jpg", "gone/6.jpg", "x/7.jpg"],
        [1, 1, 1, 1, 2, 1, 2, -1, -1], names,
        stamps=[(-1, 5), UNKNOWN, (9, -1), UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN],
        splits=["train", "train", "train", "val", "train", "train", "train", "train", "test"])
    # a/0: mtime changed; a/2: size changed; a/3: split changed; a/4: now labelled b; a/4b: new;
    # gone/6: its class is gone (now unlabelled); x/7: unlabelled before and now, kept
    reuse = reusable_rows(old, new)
    assert reuse.dtype == np.int64 and reuse.tolist() == [-1, 1, -1, -1, -1, -1, 5, -1, 7]


def test_reusable_rows_when_nothing_is_found_returns_minus_one_everywhere(tmp_path: Path) -> None:
    """No path of the new folder was in the cache: every candidate is computed."""
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": features_of(2, 0)}, [0, 0], label_names=["a"]))
    assert reusable_rows(old, catalog(["c/1.jpg", "c/2.jpg"], [0, 0], ["c"])).tolist() == [-1, -1]


def test_reusable_rows_of_augmented_caches_match_path_and_view(tmp_path: Path) -> None:
    """With views, a row is named by (path, view); a catalog without views names clean views (view 0); a clean
    cache never lends its clean row to an augmented view."""
    old = open_cache(write_cache(tmp_path / "aug.h5", {"x": features_of(4, 0)}, [0, 0, 0, 0], label_names=["a"],
                                 paths=["a/0.jpg", "a/0.jpg", "a/0.jpg", "a/1.jpg"], view=[0, 1, 2, 0]))
    new = catalog(["a/0.jpg", "a/0.jpg", "a/1.jpg", "a/1.jpg"], [0, 0, 0, 0], ["a"], views=[0, 2, 0, 1])
    assert reusable_rows(old, new).tolist() == [0, 2, 3, -1]
    assert reusable_rows(old, catalog(["a/0.jpg", "a/1.jpg"], [0, 0], ["a"])).tolist() == [0, 3]
    clean = open_cache(write_cache(tmp_path / "clean.h5", {"x": features_of(1, 0)}, [0], label_names=["a"],
                                   paths=["a/0.jpg"]))
    assert reusable_rows(clean, catalog(["a/0.jpg", "a/0.jpg"], [0, 0], ["a"], views=[0, 1])).tolist() == [0, -1]


class Writes:
    """Records (first row, rows) of every CacheWriter.write, then writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []
        write = CacheWriter.write

        def spy(writer, row, features, paths, *rest):
            self.calls.append((row, len(paths)))
            return write(writer, row, features, paths, *rest)

        monkeypatch.setattr(CacheWriter, "write", spy)


def assembled(tmp_path: Path, old: Cache, new: Catalog, delta: Cache | None, skipped: list[list[str]],
              how: str = "rewrite") -> tuple[int, Cache]:
    """The update of `old` to `new`, rewritten into out.h5 (`assemble`), or linked in place of `old`."""
    reuse = reusable_rows(old, new)
    computed = computed_rows(new, reuse, delta)
    if how == "link":
        rows, _ = write_linked(old.path, old.attrs, new, reuse, computed, old, delta, skipped)
        return rows, open_cache(old.path)
    writer = CacheWriter.create(tmp_path / "out.h5", old.attrs, old.shapes, new.paths, new.label_names)
    try:
        rows = assemble(writer, new, reuse, computed, old, delta, skipped)
    finally:
        writer.close()
    return rows, open_cache(tmp_path / "out.h5")


@pytest.mark.parametrize("block_bytes, writes, how", [
    (1, [(0, 2), (2, 2), (4, 2)], "rewrite"),  # less than a row: one chunk (2 rows) a block
    (5 * 48, [(0, 4), (4, 2)], "rewrite"),  # 5 rows' worth: the 2 whole chunks that fit
    (5 * 48, [(0, 3), (3, 3)], "link"),  # linked: the per-row metadata only, a row per 64 bytes: 3 rows a block
    (128, [(0, 2), (2, 2), (4, 2)], "link"),
    (1, [(k, 1) for k in range(6)], "link"),  # at least one row a block
])
def test_assemble_writes_kept_and_computed_rows_in_the_new_order_in_blocks_of_whole_chunks(
         tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int, writes: list[tuple[int, int]],
         how: str) -> None:
    """Kept rows come from the old cache, new or changed ones from the update's own cache, a candidate that could
    not be computed is left out and its entry recorded as skipped; per-row metadata is the catalog's (labels
    renumbered for the new class list); every write covers a whole number of 2-row chunks of about block_bytes."""
    monkeypatch.setattr(features.store, "CHUNK_BYTES", 2 * 48)  # 2 rows a chunk
    monkeypatch.setattr(features.update, "COPY_BLOCK_BYTES", block_bytes)
    X = features_of(6, 0)
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": X}, [0, 0, 0, 0, 1, 1], label_names=["a", "b"],
                                 paths=["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg", "b/4.jpg", "b/5.jpg"]))
    assert old.attrs.num_images == 6
    D = features_of(2, 1)
    delta = open_cache(write_cache(tmp_path / "delta.h5", {"x": D}, [1, 1], label_names=["Z", "a"],
                                   paths=["a/1b.jpg", "a/3.jpg"]))
    new = catalog(["a/0.jpg", "a/1b.jpg", "a/2.jpg", "a/3.jpg", "a/3b.jpg", "b/4.jpg", "b/5.jpg", "c/6.jpg"],
                  [1, 1, 1, 1, 1, 2, 2, 3], ["Z", "a", "b", "c"],
                  stamps=[UNKNOWN, (10, 11), UNKNOWN, (12, 13), (14, 15), UNKNOWN, UNKNOWN, (16, 17)])
    skipped = [["a/3b.jpg", "cannot be decoded"], ["c/6.jpg", "empty file (0 bytes)"]]
    spy = Writes(monkeypatch)
    rows, out = assembled(tmp_path, old, new, delta, skipped, how)
    assert rows == 6 and out.attrs.num_images == 6 and out.attrs.complete and out.virtual == (how == "link")
    assert spy.calls == writes
    assert out.paths.tolist() == ["a/0.jpg", "a/1b.jpg", "a/2.jpg", "a/3.jpg", "b/4.jpg", "b/5.jpg"]
    np.testing.assert_array_equal(out.read("x"), np.stack([X[0], D[0], X[2], D[1], X[4], X[5]]))
    assert out.labels.tolist() == [1, 1, 1, 1, 2, 2] and out.label_names == ["Z", "a", "b", "c"]
    assert out.view.tolist() == [0] * 6 and out.split.tolist() == [""] * 6
    assert out.file_stamps.tolist() == [[-1, -1], [10, 11], [-1, -1], [12, 13], [-1, -1], [-1, -1]]
    assert out.skipped == [tuple(s) for s in skipped]


@pytest.mark.parametrize("how", ["rewrite", "link"])
def test_assemble_with_views_takes_each_computed_view_from_its_own_row(tmp_path: Path, how: str) -> None:
    """An augmented update: a new training image's views are rows of the update's cache named (path, view); every
    view lands in its place with its own features and view number."""
    X = features_of(4, 0)
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": X}, [0, 0, 0, 0], label_names=["a"],
                                 paths=["a/0.jpg", "a/0.jpg", "a/0.jpg", "a/2.jpg"], view=[0, 1, 2, 0]))
    D = features_of(3, 1)
    delta = open_cache(write_cache(tmp_path / "delta.h5", {"x": D}, [0, 0, 0], label_names=["a"],
                                   paths=["a/1.jpg", "a/1.jpg", "a/1.jpg"], view=[0, 1, 2]))
    new = catalog(["a/0.jpg", "a/0.jpg", "a/0.jpg", "a/1.jpg", "a/1.jpg", "a/1.jpg", "a/2.jpg"], [0] * 7, ["a"],
                  views=[0, 1, 2, 0, 1, 2, 0])
    rows, out = assembled(tmp_path, old, new, delta, [], how)
    assert rows == 7 and out.view.tolist() == [0, 1, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(out.read("x"), np.stack([X[0], X[1], X[2], D[0], D[1], D[2], X[3]]))
    assert out.skipped == []


@pytest.mark.parametrize("how", ["rewrite", "link"])
def test_assemble_without_computed_rows_keeps_the_remaining_rows(tmp_path: Path, how: str) -> None:
    """Files only removed: no update cache (delta None); the output is the old rows that remain, in order."""
    X = features_of(4, 0)
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": X}, [0, 0, 1, 1], label_names=["a", "b"]))
    paths = old.paths.tolist()
    rows, out = assembled(tmp_path, old, catalog([paths[0], paths[2], paths[3]], [0, 1, 1], ["a", "b"]), None,
                          [["a/x.txt", "not an image"]], how)
    assert rows == 3 and out.paths.tolist() == [paths[0], paths[2], paths[3]]
    np.testing.assert_array_equal(out.read("x"), X[[0, 2, 3]])
    assert out.view.tolist() == [0, 0, 0] and out.skipped == [("a/x.txt", "not an image")]


@pytest.mark.parametrize("how", ["rewrite", "link"])
def test_assemble_leaves_out_new_files_none_of_which_could_be_used(tmp_path: Path, how: str) -> None:
    """New files were added but none could be computed (no update cache, delta None): the kept rows only."""
    X = features_of(2, 0)
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": X}, [0, 0], label_names=["a"],
                                 paths=["a/0.jpg", "a/2.jpg"]))
    new = catalog(["a/0.jpg", "a/1.jpg", "a/2.jpg"], [0, 0, 0], ["a"], stamps=[UNKNOWN, (3, 4), UNKNOWN])
    rows, out = assembled(tmp_path, old, new, None, [["a/1.jpg", "empty file (0 bytes)"]], how)
    assert rows == 2 and out.paths.tolist() == ["a/0.jpg", "a/2.jpg"]
    np.testing.assert_array_equal(out.read("x"), X)


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Cache, np.ndarray, list]:
    """A 10-row cache, and a record of the calls to the checked reader Cache.read (the fallback of _KeptRows)."""
    X = features_of(10, 0)
    old = open_cache(write_cache(tmp_path / "old.h5", {"x": X}, [0] * 10, label_names=["a"]))
    calls = []
    read = Cache.read

    def spy(cache, layer, rows=None, block_rows=None):
        calls.append(np.asarray(rows).tolist())
        return read(cache, layer, rows, block_rows)

    monkeypatch.setattr(Cache, "read", spy)
    return old, X, calls


@pytest.mark.parametrize("src, dst, n_out, checked", [
    ([2, 3, 5], [0, 2, 3], 4, False),  # ascending, span 4 <= 2 * 4: one read of rows 2-5 and a gather
    ([1, 4], [0, 1], 2, False),  # span 4 == 2 * len(out): still the one read
    ([1, 5], [0, 1], 2, True),  # span 5 > 2 * len(out): the checked reader instead
    ([5, 2], [0, 1], 2, True),  # rows not ascending: the checked reader
    ([2, 3], [1, 0], 2, True),  # places not ascending: the checked reader
    ([7], [1], 3, False),  # one row
])
def test_kept_rows_are_read_into_place_in_one_read_or_through_the_checked_reader(
        kept: tuple[Cache, np.ndarray, list], src: list[int], dst: list[int], n_out: int, checked: bool) -> None:
    """out[dst] = rows src of the old cache, other places untouched; ascending rows spanning at most twice the
    block are one HDF5 read (no Cache.read), anything else goes through Cache.read."""
    old, X, calls = kept
    out = np.full((n_out, *SHAPE), -7.0, np.float32)
    with _KeptRows(old) as rows:
        rows.read_into("x", np.array(src), np.array(dst), out)
    expected = np.full((n_out, *SHAPE), -7.0, np.float32)
    expected[dst] = X[src]
    np.testing.assert_array_equal(out, expected)
    assert calls == ([src] if checked else [])


def test_kept_rows_scratch_buffer_grows_with_the_span(kept: tuple[Cache, np.ndarray, list]) -> None:
    """Two reads through one reader, the second spanning more rows than the first: both land right."""
    old, X, calls = kept
    with _KeptRows(old) as rows:
        small = np.zeros((2, *SHAPE), np.float32)
        rows.read_into("x", np.array([3, 4]), np.array([0, 1]), small)
        large = np.zeros((4, *SHAPE), np.float32)
        rows.read_into("x", np.array([1, 4, 8]), np.array([0, 1, 3]), large)
    np.testing.assert_array_equal(small, X[[3, 4]])
    np.testing.assert_array_equal(large[[0, 1, 3]], X[[1, 4, 8]])
    assert calls == []


def test_a_cache_replaced_since_it_was_opened_is_refused_in_one_line(tmp_path: Path) -> None:
    """The old cache is rewritten (a new generation) between open_cache and the copy: StaleCache, this sentence."""
    path = write_cache(tmp_path / "old.h5", {"x": features_of(3, 0)}, [0, 0, 0], label_names=["a"])
    old = open_cache(path)
    write_cache(path, {"x": features_of(3, 1)}, [0, 0, 0], label_names=["a"])
    with pytest.raises(StaleCache) as err:
        _KeptRows(old).__enter__()
    assert str(err.value) == (f"{path} was replaced (updated, overwritten or merged) while this command was reading "
                              "it; run the command again.")


def test_large_float16_rows_are_not_taken_for_nan(tmp_path: Path) -> None:
    """Rows of float16 near its maximum: their sum overflows float16 but not the float64 sum that is checked."""
    X = np.full((3, *SHAPE), 60000, np.float16)
    old = open_cache(write_cache(tmp_path / "h.h5", {"x": X}, [0, 0, 0], label_names=["a"], dtype="float16"))
    assert old.dtypes["x"] == np.float16
    out = np.zeros((3, *SHAPE), np.float16)
    with _KeptRows(old) as rows:
        rows.read_into("x", np.array([0, 1, 2]), np.array([0, 1, 2]), out)
    np.testing.assert_array_equal(out, X)


def test_a_kept_row_holding_nan_is_refused_naming_the_row(tmp_path: Path) -> None:
    """A NaN in old row 3: DamagedCache from the checked reader, naming row 3 only."""
    X = features_of(6, 0)
    X[3, 1, 2] = np.nan
    path = write_cache(tmp_path / "nan.h5", {"x": X}, [0] * 6, label_names=["a"])
    old = open_cache(path)
    with _KeptRows(old) as rows, pytest.raises(DamagedCache) as err:
        rows.read_into("x", np.array([1, 2, 3, 4]), np.array([0, 1, 2, 3]), np.zeros((4, *SHAPE), np.float32))
    assert str(err.value) == f"{path} holds NaN or inf in rows 3 of features/x. {fix_hint(path)}"


def test_nan_the_checked_reader_does_not_see_is_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last guard: should the checked reader return without raising (it re-reads the rows), a NaN row still
    stops the copy, naming the layer."""
    X = features_of(4, 0)
    X[2, 0, 0] = np.inf
    path = write_cache(tmp_path / "inf.h5", {"x": X}, [0] * 4, label_names=["a"])
    old = open_cache(path)
    seen = []
    monkeypatch.setattr(Cache, "read", lambda cache, layer, rows=None, block_rows=None: seen.append(
        (layer, np.asarray(rows).tolist())))
    with _KeptRows(old) as rows, pytest.raises(DamagedCache) as err:
        rows.read_into("x", np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]), np.zeros((4, *SHAPE), np.float32))
    assert str(err.value) == f"{path} holds NaN or inf in features/x. {fix_hint(path)}"
    assert seen == [("x", [2])]


def test_a_kept_row_whose_chunk_fails_its_checksum_is_refused_naming_the_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes of old row 5 overwritten on disk: the one read fails, and the checked reader names rows 4-5 (the
    2-row chunk that holds row 5)."""
    monkeypatch.setattr(features.store, "CHUNK_BYTES", 2 * 48)
    path = write_cache(tmp_path / "bad.h5", {"x": features_of(8, 0)}, [0] * 8, label_names=["a"])
    with h5py.File(path) as f:
        info = f["features/x"].id.get_chunk_info_by_coord((4, 0, 0))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + 48)
        raw.write(b"\x7f" * 48)
    old = open_cache(path)
    with _KeptRows(old) as rows, pytest.raises(DamagedCache) as err:
        rows.read_into("x", np.array([3, 4, 5, 6]), np.array([0, 1, 2, 3]), np.zeros((4, *SHAPE), np.float32))
    assert str(err.value).startswith(f"{path} is damaged: rows 4-5 of features/x fail their checksum")


def test_a_modification_time_one_nanosecond_later_is_a_change(tmp_path: Path) -> None:
    """Stamps are compared as int64: today's mtimes in ns (~1.7e18) differ by 1 ns where float64 could not tell
    them apart (its step there is 256 ns)."""
    path = write_cache(tmp_path / "old.h5", {"x": features_of(2, 0)}, [0, 0], label_names=["a"],
                       paths=["a/0.jpg", "a/1.jpg"])
    mtime = 1_700_000_000_000_000_000
    with h5py.File(path, "r+") as f:
        f["file_stamp"][:] = np.array([[5, mtime], [5, mtime]], np.int64)
    new = catalog(["a/0.jpg", "a/1.jpg"], [0, 0], ["a"], stamps=[(5, mtime), (5, mtime + 1)])
    assert reusable_rows(open_cache(path), new).tolist() == [0, -1]


def test_a_cache_damaged_since_it_was_opened_is_refused_naming_it(tmp_path: Path) -> None:
    """Its root attributes broken between open_cache and the copy: DamagedCache naming the file."""
    path = write_cache(tmp_path / "old.h5", {"x": features_of(3, 0)}, [0, 0, 0], label_names=["a"])
    old = open_cache(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["backbone"]
    with pytest.raises(DamagedCache) as err:
        _KeptRows(old).__enter__()
    assert str(err.value).startswith(f"{path} lacks the root attribute 'backbone' (str)")


def test_a_failed_read_of_kept_rows_names_only_the_damage_among_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of rows 0-1 and 4-5 damaged; the kept rows 3 and 6 span the second: the checked reader re-reads the
    kept rows and names rows 4-5, not the damage elsewhere in the file."""
    monkeypatch.setattr(features.store, "CHUNK_BYTES", 2 * 48)
    path = write_cache(tmp_path / "bad.h5", {"x": features_of(8, 0)}, [0] * 8, label_names=["a"])
    with h5py.File(path) as f:
        offsets = [f["features/x"].id.get_chunk_info_by_coord((row, 0, 0)).byte_offset for row in (0, 4)]
    with open(path, "r+b") as raw:
        for offset in offsets:
            raw.seek(offset + 48)
            raw.write(b"\x7f" * 48)
    old = open_cache(path)
    with _KeptRows(old) as rows, pytest.raises(DamagedCache) as err:
        rows.read_into("x", np.array([3, 6]), np.array([0, 1]), np.zeros((2, *SHAPE), np.float32))
    assert str(err.value).startswith(f"{path} is damaged: rows 4-5 of features/x fail their checksum")


# ---- linking: link_plan, write_linked ------------------------------------------------------------------------------

def test_link_plan_maps_kept_rows_to_the_old_version_and_computed_ones_to_the_delta(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    old = open_cache(write_cache(tmp_path / "x.h5", {"x": features_of(4, 0)}, [0] * 4, label_names=["a"]))
    delta = open_cache(write_cache(tmp_path / "d.h5", {"x": features_of(2, 1)}, [0] * 2, label_names=["a"]))
    files, source, row = link_plan(old.path, old, delta, np.array([0, -1, 1, 3, -1]), np.array([-1, 1, -1, -1, 0]))
    assert files == [Linked(part_path(old.path, old.attrs.generation), old.attrs.generation, 4),
                     Linked(part_path(old.path, delta.attrs.generation), delta.attrs.generation, 2)]
    assert source.tolist() == [0, 1, 0, 0, 1] and row.tolist() == [0, 1, 1, 3, 0]
    files, source, row = link_plan(old.path, old, delta, np.array([0, 1, 2]), np.array([-1, -1, -1]))
    assert [f.generation for f in files] == [old.attrs.generation] and source.tolist() == [0, 0, 0]  # delta unused
    files, source, row = link_plan(old.path, old, None, np.array([2, 3]), np.array([-1, -1]))
    assert source.tolist() == [0, 0] and row.tolist() == [2, 3]
    monkeypatch.setattr(features.update, "LINKED_FILES", 1)
    assert link_plan(old.path, old, delta, np.array([0, -1]), np.array([-1, 0])) is None  # two files: rewrite
    assert link_plan(old.path, old, delta, np.array([0, 1]), np.array([-1, -1])) is not None
    monkeypatch.setattr(features.update, "max_runs", lambda rows: 2)
    assert link_plan(old.path, old, None, np.array([0, 2]), np.array([-1, -1])) is not None  # 2 runs
    assert link_plan(old.path, old, None, np.array([0, 2, 3, 1]), np.array([-1] * 4)) is None  # 3 runs
    monkeypatch.setattr(features.update, "max_runs", lambda rows: 1 if rows else 0)
    assert link_plan(old.path, old, None, np.array([0, 1, 2, 3]), np.array([-1] * 4)) is not None  # 1 run
    assert link_plan(old.path, old, None, np.array([], np.int64), np.array([], np.int64)) is not None  # none


def test_max_runs_grows_with_the_rows() -> None:
    assert (max_runs(0), max_runs(16), max_runs(17), max_runs(300_000)) == (64, 65, 65, 18_814)


def test_link_plan_of_a_linked_cache_keeps_its_parts_and_of_other_mappings_rewrites(tmp_path: Path) -> None:
    X = features_of(3, 0)
    old = open_cache(write_cache(tmp_path / "x.h5", {"x": X}, [0] * 3, label_names=["a"],
                                 paths=["a/0.jpg", "a/1.jpg", "a/2.jpg"]))
    delta = open_cache(write_cache(tmp_path / "d.h5", {"x": features_of(1, 1)}, [0], label_names=["a"],
                                   paths=["a/0b.jpg"]))
    new = catalog(["a/0.jpg", "a/0b.jpg", "a/1.jpg", "a/2.jpg"], [0] * 4, ["a"], stamps=[UNKNOWN, (1, 2)] + [UNKNOWN] * 2)
    assembled(tmp_path, old, new, delta, [], "link")
    linked = open_cache(tmp_path / "x.h5")
    files, source, row = linked_rows(linked)
    assert [f.path.name for f in files] == [part_path(old.path, g).name for g in (old.attrs.generation,
                                                                                  delta.attrs.generation)]
    assert [f.rows for f in files] == [3, 1] and source.tolist() == [0, 1, 0, 0] and row.tolist() == [0, 0, 1, 2]
    again, source, row = link_plan(linked.path, linked, None, np.array([0, 1, 2, 3]), np.array([-1] * 4))
    assert again == files and source.tolist() == [0, 1, 0, 0] and row.tolist() == [0, 0, 1, 2]  # the parts
    assert linked_rows(open_cache(files[1].path)) is None  # a plain cache maps nothing


def test_write_linked_writes_no_feature_row_and_names_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    X = features_of(3, 0)
    old = open_cache(write_cache(tmp_path / "x.h5", {"x": X}, [0] * 3, label_names=["a"],
                                 paths=["a/0.jpg", "a/1.jpg", "a/2.jpg"]))
    new = catalog(["a/0.jpg", "a/2.jpg"], [0, 0], ["a"])
    features_written = []
    real = CacheWriter.write
    monkeypatch.setattr(CacheWriter, "write", lambda w, row, f, *a: features_written.append(len(f)) or real(w, row, f, *a))
    reuse = reusable_rows(old, new)
    rows, files = write_linked(old.path, old.attrs, new, reuse, computed_rows(new, reuse, None), old, None, [])
    assert rows == 2 and features_written == [0]
    assert [f.path for f in files] == [part_path(old.path, old.attrs.generation)]
    out = open_cache(old.path)
    np.testing.assert_array_equal(out.read("x"), X[[0, 2]])
    assert os.path.samefile(files[0].path, old.path) is False and files[0].path.exists()


def test_write_linked_refuses_a_part_of_another_version_and_leaves_the_cache(tmp_path: Path) -> None:
    old = open_cache(write_cache(tmp_path / "x.h5", {"x": features_of(3, 0)}, [0] * 3, label_names=["a"]))
    other = write_cache(tmp_path / "o.h5", {"x": features_of(3, 1)}, [0] * 3, label_names=["a"])
    os.link(other, part_path(old.path, old.attrs.generation))  # a file under the name of old's version, not it
    new = catalog(old.paths.tolist()[:2], [0, 0], ["a"])
    reuse = reusable_rows(old, new)
    with pytest.raises(StaleCache, match="was replaced .* while this update was planned; run the command again"):
        write_linked(old.path, old.attrs, new, reuse, computed_rows(new, reuse, None), old, None, [])
    assert open_cache(old.path).attrs.generation == old.attrs.generation


def test_write_linked_returns_none_without_hard_links_and_leaves_no_part(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    old = open_cache(write_cache(tmp_path / "x.h5", {"x": features_of(3, 0)}, [0] * 3, label_names=["a"]))
    delta = open_cache(write_cache(tmp_path / "d.h5", {"x": features_of(1, 1)}, [0], label_names=["a"],
                                   paths=["a/9.jpg"]))
    made = []

    def link_once(src, dst):  # the first link works, the second fails: the first is removed again
        if made:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        made.append(dst)
        real_link(src, dst)

    real_link = os.link
    monkeypatch.setattr(os, "link", link_once)
    new = catalog([*old.paths.tolist(), "a/9.jpg"], [0] * 4, ["a"], stamps=[UNKNOWN] * 3 + [(1, 2)])
    reuse = reusable_rows(old, new)
    assert write_linked(old.path, old.attrs, new, reuse, computed_rows(new, reuse, delta), old, delta, []) is None
    assert made and not Path(made[0]).exists() and not open_cache(old.path).virtual


def test_blocks_reuse_one_scratch_and_one_gather_buffer_per_layer_of_its_dtype(tmp_path: Path) -> None:
    """Two blocks per layer: each layer's kept rows are read into one scratch buffer (as long as the longest span,
    at least a block) and gathered into one buffer of a block, both of the layer's dtype, allocated by the first
    block and reused, unmoved, by the next: on a VM first touching memory cost more than the copy itself."""
    X, Y = features_of(10, 0), np.arange(50, dtype=np.float32).reshape(10, 5)
    old = open_cache(write_cache(tmp_path / "two.h5", {"x": X, "y": Y}, [0] * 10, label_names=["a"]))
    with _KeptRows(old) as rows:
        for layer, values in (("x", X), ("y", Y)):
            held = None
            for src in (np.array([0, 1, 3, 4]), np.array([5, 6, 7, 9])):
                out = np.zeros((4, *values.shape[1:]), values.dtype)
                rows.read_into(layer, src, np.arange(4), out)
                np.testing.assert_array_equal(out, values[src])
                scratch, gathered = rows.scratch[layer], rows.scratch[f"{layer} gathered"]
                np.testing.assert_array_equal(gathered, values[src])  # the gather went into the kept buffer
                assert (len(scratch), len(gathered), scratch.dtype, gathered.dtype) == (5, 4, values.dtype,
                                                                                        values.dtype)
                assert held is None or (held[0] is scratch and held[1] is gathered)
                held = scratch, gathered
    assert sorted(rows.scratch) == ["x", "x gathered", "y", "y gathered"]
