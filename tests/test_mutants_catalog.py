"""features/catalog.py, word for word and number for number: the Catalog's own methods (stamps, fingerprint,
subset, shard, views), the helpers of discovery (_shown, _suffix, _file_problem, _split_of, _counted, _image_keys,
_pick_column), the refusals of `discover` and of a labels CSV in their exact sentences, the walk's odd cases, and the
manifest's file format and its refusals. Discovery never opens an image, so the "images" here are a few bytes each:
these are the tests `make mutate MODULES=features/catalog.py` runs first."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

import features.catalog as catalog_module
from features import tars
from features.catalog import (NOT_UTF8, Catalog, _changed, _counted, _file_problem, _from_folders, _image_keys,
                              _pick_column, _shown, _split_of, _stat_chunk, _suffix, _walk_files, discover,
                              manifest_path, manifest_source, read_manifest, write_manifest)
from features.errors import UsageError


def touch(root: Path, *names: str, data: bytes = b"x") -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def small(root: Path = Path("/d"), views: list[int] | None = None, stamps: list | None = None, **kw) -> Catalog:
    """Four candidates: two labelled training images, a validation image, an unlabelled one."""
    values = dict(paths=["a/1.jpg", "a/2.jpg", "b/3.jpg", "x/4.jpg"], labels=[0, 0, 1, -1],
                  splits=["train", "train", "val", ""], label_names=["a", "b"], layout="splits",
                  ignored=[("n.txt", "why")])
    values.update(kw)
    return Catalog(root, views=views or [], file_stamps=stamps if stamps is not None else
                   [(1, 10), (2, 20), (3, 30), (4, 40)], **values)


# ------------------------------------------------------------------------------------------------ Catalog


def test_stamps_are_the_listed_ones_else_each_file_stat_once(tmp_path: Path) -> None:
    """With file_stamps: those. Without: (size, mtime_ns) of each file (a repeated path, a view, has its file's);
    a tar sample has its shard's stamp."""
    assert small().stamps == [(1, 10), (2, 20), (3, 30), (4, 40)]
    touch(tmp_path, "a.jpg", data=b"12345")
    touch(tmp_path, "b.jpg", data=b"1")
    os.utime(tmp_path / "a.jpg", ns=(5, 1_000_000_007))
    cat = Catalog(tmp_path, ["a.jpg", "a.jpg", "b.jpg"], [0, 0, 0], ["", "", ""], ["c"], "classes", [])
    mtime_b = (tmp_path / "b.jpg").stat().st_mtime_ns
    assert cat.stamps == [(5, 1_000_000_007), (5, 1_000_000_007), (1, mtime_b)]
    shard = tars.Shard(tmp_path / "s.tar", "s.tar", os.stat(tmp_path / "a.jpg"))
    member = tars.Member(shard, 512, 9)
    tarred = Catalog(tmp_path, ["s.tar/k.jpg"], [0], [""], ["c"], "tars", [], members={"s.tar/k.jpg": member})
    assert tarred.stamps == [shard.stamp] and tarred.source(0) is member
    assert cat.source(2) == tmp_path / "b.jpg"


def test_fingerprint_is_the_sha256_of_one_line_per_row_and_the_class_names() -> None:
    """'path NUL size NUL mtime NUL label NUL split[ NUL view]' per row (the view only when not 0), then the class
    names joined by NUL."""
    cat = small(views=[0, 2, 0, 0])
    lines = ("a/1.jpg\x001\x0010\x000\x00train\na/2.jpg\x002\x0020\x000\x00train\x002\n"
             "b/3.jpg\x003\x0030\x001\x00val\nx/4.jpg\x004\x0040\x00-1\x00\n")
    assert cat.fingerprint() == hashlib.sha256((lines + "a\x00b").encode()).hexdigest()
    clean = small()  # no views at all: as if every view were 0
    assert clean.fingerprint() == hashlib.sha256(
        (lines.replace("train\x002\n", "train\n") + "a\x00b").encode()).hexdigest()


def test_subset_takes_the_rows_at_the_indices_in_that_order_from_offset_0() -> None:
    """Rows at the indices, in their order, offset 0, stamps and views picked alike (none listed: none)."""
    cat = small(views=[0, 1, 0, 0], offset=5)
    part = cat.subset([2, 0])
    assert (part.paths, part.labels, part.splits, part.views, part.offset, part.file_stamps) == (
        ["b/3.jpg", "a/1.jpg"], [1, 0], ["val", "train"], [0, 0], 0, [(3, 30), (1, 10)])
    assert part.label_names == ["a", "b"] and part.ignored == [("n.txt", "why")]
    unlisted = small(views=[0, 1, 0, 0], stamps=[]).subset([1])
    assert unlisted.file_stamps == [] and unlisted.views == [1]


@pytest.mark.parametrize("index, count, lo, hi", [(0, 3, 0, 1), (1, 3, 1, 2), (2, 3, 2, 4), (0, 1, 0, 4),
                                                  (3, 4, 3, 4)])
def test_shard_is_the_contiguous_block_index_of_count(index: int, count: int, lo: int, hi: int) -> None:
    """Block i of n is rows [len*i//n, len*(i+1)//n); only block 0 keeps the entries left out; offset grows by lo."""
    cat = small(views=[0, 1, 2, 0], offset=10)
    part = cat.shard(index, count)
    assert part.paths == cat.paths[lo:hi] and part.labels == cat.labels[lo:hi] and part.splits == cat.splits[lo:hi]
    assert part.views == cat.views[lo:hi] and part.file_stamps == cat.file_stamps[lo:hi]
    assert part.offset == 10 + lo and part.ignored == (cat.ignored if index == 0 else [])


def test_view_counts_give_k_plus_one_rows_to_training_images_only() -> None:
    """A labelled training image (or any labelled image when there are no splits) k + 1; others 1."""
    cat = small()
    assert cat.view_counts(2) == [3, 3, 1, 1]
    assert cat.view_counts(2, has_splits=False) == [3, 3, 3, 1]
    flat = small(splits=["", "", "", ""])
    assert flat.view_counts(1) == [2, 2, 2, 1] and flat.view_counts(1, has_splits=True) == [1, 1, 1, 1]


def test_with_views_repeats_each_training_image_for_its_views() -> None:
    """Each training image followed by its k views, rows, labels, splits and stamps repeated; k = 0: views 0."""
    cat = small()
    assert cat.with_views(0).views == [0, 0, 0, 0] and cat.with_views(0).paths == cat.paths
    rows = cat.with_views(2)
    assert rows.paths == ["a/1.jpg"] * 3 + ["a/2.jpg"] * 3 + ["b/3.jpg", "x/4.jpg"]
    assert rows.views == [0, 1, 2, 0, 1, 2, 0, 0] and rows.labels == [0, 0, 0, 0, 0, 0, 1, -1]
    assert rows.splits == ["train"] * 6 + ["val", ""]
    assert rows.file_stamps == [(1, 10)] * 3 + [(2, 20)] * 3 + [(3, 30), (4, 40)]
    assert cat.with_views(1, has_splits=False).views == [0, 1, 0, 1, 0, 1, 0]
    assert small(stamps=[]).with_views(1).file_stamps == []


# ------------------------------------------------------------------------------------------------ helpers


def test_shown_escapes_only_bytes_that_are_not_utf8() -> None:
    """A surrogate-escaped byte is shown as \\xNN; valid UTF-8 is left alone."""
    assert _shown("caf\udce9.jpg") == "caf\\xe9.jpg"
    assert _shown("café.jpg") == "café.jpg"


@pytest.mark.parametrize("name, suffix", [("a.JPG", ".jpg"), ("x.tar.gz", ".gz"), (".hidden", ""), ("a.", ""),
                                          ("noext", ""), ("a.b.Png", ".png"), ("x.c", ".c")])
def test_suffix_is_paths_suffix_lower_cased(name: str, suffix: str) -> None:
    """_suffix agrees with Path(name).suffix.lower() on dots, hidden names, trailing dots and 1-letter suffixes."""
    assert _suffix(name) == suffix == Path(name).suffix.lower()


@pytest.mark.parametrize("top, split", [("train", "train"), ("Training", "train"), ("val", "val"),
                                        ("VALIDATION", "val"), ("test_holdout", "test"), ("tests", "test"),
                                        ("ants", ""), ("xtrain", "")])
def test_split_of_a_folder_is_the_split_its_name_starts_with(top: str, split: str) -> None:
    """A folder name starting with train/val/test (any case) names that split; others none."""
    assert _split_of(top) == split


def test_counted_names_the_five_commonest_types() -> None:
    """Total, singular or plural, counts by type (commonest first, then by name), '...' past five types."""
    assert _counted({".txt": 3, "": 1}) == "4 other files (3 .txt, 1 without extension)"
    assert _counted({".txt": 1}) == "1 other file (1 .txt)"
    assert _counted({".b": 2, ".a": 2, ".c": 1, ".d": 1, ".e": 1, ".f": 1, ".g": 0}) == (
        "8 other files (2 .a, 2 .b, 1 .c, 1 .d, 1 .e, ...)")
    assert _counted({".b": 2, ".a": 2, ".c": 1, ".d": 1, ".e": 1}) == "7 other files (2 .a, 2 .b, 1 .c, 1 .d, 1 .e)"


def test_image_keys_are_every_way_a_csv_may_name_an_image() -> None:
    """Relative path and bare name, each with and without extension; a bare name two files share is dropped."""
    assert _image_keys(["a/x.jpg", "b/x.png", "b/y.jpg"]) == {
        "a/x.jpg": "a/x.jpg", "a/x": "a/x.jpg", "b/x.png": "b/x.png", "b/x": "b/x.png", "b/y.jpg": "b/y.jpg",
        "b/y": "b/y.jpg", "x.jpg": "a/x.jpg", "x.png": "b/x.png", "y.jpg": "b/y.jpg", "y": "b/y.jpg"}


def test_pick_column_by_flag_else_by_known_name_never_by_position() -> None:
    """The flag's column, else the first known name (case and spaces ignored); both refusals word for word."""
    assert _pick_column(["A", " Label "], None, ("label",), "label", "l.csv") == " Label "
    assert _pick_column(["file", "path"], None, ("path", "file"), "path", "l.csv") == "path"
    assert _pick_column(["a", "b"], "b", ("path",), "path", "l.csv") == "b"
    with pytest.raises(UsageError) as err:
        _pick_column(["a", "b"], "c", ("path",), "path", "l.csv")
    assert str(err.value) == "labels CSV has no path column 'c'. Columns are: a, b."
    with pytest.raises(UsageError) as err:
        _pick_column(["a", "b"], None, ("label", "class"), "label", "l.csv")
    assert str(err.value) == ("labels CSV 'l.csv' has no recognised label column (its columns: a, b). Expected one "
                              "of: label, class; or name it with --label-column.")


def test_file_problem_says_why_a_file_is_no_candidate_without_opening_it(tmp_path: Path) -> None:
    """Each reason word for word: type, compressed tar, non-UTF-8 name, dangling link, link loop, FIFO, folder, gone."""
    touch(tmp_path, "a.JPG", "n.txt", "noext", "x.tar.gz")
    assert _file_problem(tmp_path / "a.JPG") == ""
    assert _file_problem(tmp_path / "n.txt") == "not an image file type (.txt)"
    assert _file_problem(tmp_path / "noext") == "not an image file type (no extension)"
    assert _file_problem(tmp_path / "x.tar.gz") == tars.COMPRESSED
    assert _file_problem(tmp_path / "caf\udce9.jpg") == NOT_UTF8
    (tmp_path / "gone.jpg").symlink_to("nowhere.jpg")
    assert _file_problem(tmp_path / "gone.jpg") == ("a link to 'nowhere.jpg', which does not exist; skipped. Fix or "
                                                    "remove the link.")
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    assert _file_problem(tmp_path / "loop.jpg") == "cannot be read (Too many levels of symbolic links); skipped"
    os.mkfifo(tmp_path / "pipe.jpg")
    assert _file_problem(tmp_path / "pipe.jpg") == ("a named pipe (FIFO), not a regular file; skipped without opening "
                                                    "it")
    (tmp_path / "dir.jpg").mkdir()
    assert _file_problem(tmp_path / "dir.jpg") == "a special file, not a regular file; skipped without opening it"
    assert _file_problem(tmp_path / "s.tar", frozenset({".tar"})) == ("cannot be read (No such file or directory); "
                                                                     "skipped")


def test_stat_chunk_returns_each_stat_or_its_error_in_order(tmp_path: Path) -> None:
    """One result per path, in order: the stat, or the error in its place."""
    touch(tmp_path, "a.jpg")
    got = _stat_chunk([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg")])
    assert isinstance(got[0], os.stat_result) and isinstance(got[1], FileNotFoundError)
    assert got[2].st_ino == got[0].st_ino == (tmp_path / "a.jpg").stat().st_ino


# ------------------------------------------------------------------------------------------------ the walk


def test_walk_lists_candidates_sorted_with_stamps_and_counts_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stat batches of 2 (STAT_CHUNK): every candidate once, sorted, with its own stamp; hidden entries ignored;
    other files counted by extension; tar shards apart; a compressed tar listed."""
    monkeypatch.setattr(catalog_module, "STAT_CHUNK", 2)
    touch(tmp_path, "b/2.jpg", "a/1.PNG", "a/0.jpg", "c/9.gif", "c/8.bmp", "n.txt", "m.txt", "README",
          ".hidden.jpg", ".git/x.jpg", "s/000.tar", "x.tar.gz")
    os.utime(tmp_path / "a/0.jpg", ns=(1, 123))
    listing = _walk_files(tmp_path, catalog_module.IMAGE_EXTENSIONS | {".tar"})
    assert listing.files == ["a/0.jpg", "a/1.PNG", "b/2.jpg", "c/8.bmp", "c/9.gif"]
    assert listing.apart == ["s/000.tar"]
    assert listing.stamps["a/0.jpg"] == (1, 123) and set(listing.stamps) == {*listing.files, "s/000.tar"}
    assert listing.not_candidates == {".txt": 2, "": 1}
    assert listing.others == [("x.tar.gz", tars.COMPRESSED)]



@pytest.mark.parametrize("per_stat_limit, threads_from", [(0.02, None), (0.001, 1)])
def test_walk_stats_in_its_own_thread_until_a_chunk_waits_then_in_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_stat_limit: float, threads_from: int | None) -> None:
    """Chunks of 4 that each take 10 ms (2.5 ms a stat): under a limit of 20 ms a stat all are stat'ed by the
    walking thread (a local disk); over 1 ms a stat, the chunks after the first are handed to the pool's threads (a
    file system that waits on a server). The listing is the same either way."""
    monkeypatch.setattr(catalog_module, "STAT_CHUNK", 4)
    monkeypatch.setattr(catalog_module, "WAITING_STAT_S", per_stat_limit)
    touch(tmp_path, *[f"a/{i}.jpg" for i in range(9)])
    real, where = catalog_module._stat_chunk, []

    def waiting(paths: list[str]) -> list:
        where.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.01)
        return real(paths)

    monkeypatch.setattr(catalog_module, "_stat_chunk", waiting)
    listing = _walk_files(tmp_path)
    assert where == [threads_from is None or i < threads_from for i in range(3)]
    assert listing.files == [f"a/{i}.jpg" for i in range(9)] and sorted(listing.stamps) == listing.files

def test_walk_lists_odd_entries_with_the_reason(tmp_path: Path) -> None:
    """A link to nowhere, a FIFO, a link loop, a non-UTF-8 file and folder name, a link to a folder already
    catalogued, a link back into DATA: each listed, none a candidate."""
    touch(tmp_path, "a/1.jpg", "b/2.jpg")
    (tmp_path / "a" / "gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "a" / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    (tmp_path / "a" / "link.jpg").symlink_to("1.jpg")  # a link to a regular file: a candidate
    touch(tmp_path, "a/caf\udce9.jpg", "cag/9.jpg")  # cag/ comes after caf\udce9/: still walked
    (tmp_path / "caf\udce9").mkdir()
    (tmp_path / "a" / "up").symlink_to("..")
    (tmp_path / "a" / "b_too").symlink_to("../b")
    touch(tmp_path, "b/inner/3.jpg")
    (tmp_path / "a" / "deep").symlink_to("../b/inner")  # inside DATA, not claimed yet: catalogued at its own place
    listing = _walk_files(tmp_path)
    assert listing.files == ["a/1.jpg", "a/link.jpg", "b/2.jpg", "b/inner/3.jpg", "cag/9.jpg"]
    assert listing.others == sorted([
        ("a/b_too/", f"a link to the folder '{tmp_path / 'b'}', which is already catalogued; skipped"),
        ("a/deep/", "a link back into DATA ('b/inner'), catalogued at its own place; skipped"),
        ("a/caf\\xe9.jpg", NOT_UTF8),
        ("a/gone.jpg", "a link to 'nowhere.jpg', which does not exist; skipped. Fix or remove the link."),
        ("a/loop.jpg", "cannot be read (Too many levels of symbolic links); skipped"),
        ("a/pipe.jpg", "a named pipe (FIFO), not a regular file; skipped without opening it"),
        ("a/up/", f"a link to the folder '{tmp_path}', which is already catalogued; skipped"),
        ("caf\\xe9/", NOT_UTF8)])


def test_walk_relists_a_file_removed_or_replaced_between_the_listing_and_its_stat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stat comes after the listing: a file gone by then is listed as unreadable, one replaced by a FIFO as
    such; neither is a candidate."""
    touch(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    real = catalog_module._stat_chunk

    def meanwhile(paths: list[str]) -> list:
        os.unlink(tmp_path / "b.jpg")
        os.unlink(tmp_path / "c.jpg")
        os.mkfifo(tmp_path / "c.jpg")
        os.unlink(tmp_path / "d.jpg")
        (tmp_path / "d.jpg").mkdir()
        return real(paths)

    monkeypatch.setattr(catalog_module, "_stat_chunk", meanwhile)
    listing = _walk_files(tmp_path)
    assert listing.files == ["a.jpg"] and sorted(listing.stamps) == ["a.jpg"]
    assert listing.others == [("b.jpg", "cannot be read (No such file or directory); skipped"),
                              ("c.jpg", "a named pipe (FIFO), not a regular file; skipped without opening it"),
                              ("d.jpg", "a special file, not a regular file; skipped without opening it")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder whatever its mode")
def test_walk_lists_a_folder_it_cannot_read(tmp_path: Path) -> None:
    """A sub-folder without permissions is listed with the reason and its files left out."""
    touch(tmp_path, "a/1.jpg", "b/2.jpg")
    (tmp_path / "b").chmod(0)
    try:
        listing = _walk_files(tmp_path)
    finally:
        (tmp_path / "b").chmod(stat.S_IRWXU)
    assert listing.files == ["a/1.jpg"]
    assert listing.others == [("b/", "a folder that cannot be read (Permission denied); its files are left out. Fix "
                                     "its permissions (e.g. chmod a+rx) to include them.")]


# ------------------------------------------------------------------------------------------------ layouts


def test_folders_give_classes_splits_or_no_labels() -> None:
    """(a) the first path component is the class; (b) when every top folder names a split, the second is, and an
    image directly in a split folder is unlabelled; no folders: unlabelled."""
    classes = _from_folders(Path("/d"), ["ants/1.jpg", "bees/2.jpg", "top.jpg"], [])
    assert (classes.layout, classes.label_names, classes.labels, classes.splits) == (
        "classes", ["ants", "bees"], [0, 1, -1], ["", "", ""])
    splits = _from_folders(Path("/d"), ["Train/ants/1.jpg", "Train/top.jpg", "val/bees/2.jpg", "val/bees/x/3.jpg",
                                        "test.jpg", "z.jpg"], [("o", "r")])
    assert (splits.layout, splits.label_names, splits.labels, splits.splits, splits.ignored) == (
        "splits", ["ants", "bees"], [0, -1, 1, 1, -1, -1], ["train", "train", "val", "val", "test", ""], [("o", "r")])
    mixed = _from_folders(Path("/d"), ["train/ants/1.jpg", "ants/2.jpg"], [])
    assert (mixed.layout, mixed.label_names, mixed.splits) == ("classes", ["ants", "train"], ["", ""])
    flat = _from_folders(Path("/d"), ["1.jpg", "2.jpg"], [])
    assert (flat.layout, flat.label_names, flat.labels) == ("unlabelled", [], [-1, -1])


def test_discover_records_stamps_and_a_note_counting_other_files(tmp_path: Path) -> None:
    """Each candidate's stamp as listed; other files counted in a note; the labels CSV kept in DATA is not counted."""
    touch(tmp_path, "ants/1.jpg", "ants/1.txt", "bees/2.jpg", "bees/2.txt", "bees/x.json")
    os.utime(tmp_path / "bees/2.jpg", ns=(1, 77))
    cat = discover(tmp_path)
    assert cat.paths == ["ants/1.jpg", "bees/2.jpg"] and cat.file_stamps[1] == (1, 77)
    assert cat.notes == ("left out 3 other files (2 .txt, 1 .json) under DATA: not image files, so no candidates "
                         "(not listed as skipped)",)
    touch(tmp_path, "labels.csv", data=b"path,label\nants/1.jpg,x\nbees/2.jpg,y\n")
    with_csv = discover(tmp_path, str(tmp_path / "labels.csv"))
    assert with_csv.label_names == ["x", "y"] and with_csv.notes == cat.notes  # the CSV beside them: no stray file


def test_discover_refuses_missing_empty_or_file_data_in_one_sentence(tmp_path: Path) -> None:
    """Missing DATA, DATA that is a file, and a folder without images (with what it holds) refused word for word."""
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "nope")
    assert str(err.value) == (f"DATA folder '{tmp_path / 'nope'}' does not exist. Expected a folder of images (class "
                              "sub-folders, split sub-folders, or images plus LABELS=labels.csv), or of .tar shards.")
    touch(tmp_path, "f.txt")
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "f.txt")
    assert str(err.value) == (f"DATA '{tmp_path / 'f.txt'}' is a file, expected a folder of images (or of .tar "
                              "shards, or one .tar).")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "empty")
    extensions = ", ".join(sorted(catalog_module.IMAGE_EXTENSIONS))
    assert str(err.value) == (f"DATA folder '{tmp_path / 'empty'}' holds no images (looked for {extensions}, "
                              "recursively).")
    touch(tmp_path / "empty", "a.txt", "b.txt")
    (tmp_path / "empty" / "gone.jpg").symlink_to("nowhere.jpg")
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "empty")
    assert str(err.value) == (f"DATA folder '{tmp_path / 'empty'}' holds no images (looked for {extensions}, "
                              "recursively). It holds 2 other files (2 .txt). Skipped 1 other entries, e.g. gone.jpg: "
                              "a link to 'nowhere.jpg', which does not exist; skipped. Fix or remove the link.")


def test_a_tar_among_images_is_listed_not_read(tmp_path: Path) -> None:
    """A .tar among image files is listed as left out, with the reason, and not read."""
    touch(tmp_path, "a/1.jpg", "s/000.tar")
    cat = discover(tmp_path)
    assert cat.paths == ["a/1.jpg"] and cat.ignored == [
        ("s/000.tar", "a tar shard among image files: DATA is read as a folder of images, so its samples are left "
                      "out. Point DATA at the shards alone (e.g. 'DATA/*.tar') to extract them")]


def test_a_data_folder_whose_name_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """DATA whose own name is not UTF-8 is refused, the name shown escaped."""
    root = tmp_path / "caf\udce9"
    touch(root, "a/1.jpg")
    with pytest.raises(UsageError) as err:
        discover(root)
    assert str(err.value) == (f"DATA folder '{_shown(str(root))}' has a name that is not valid UTF-8. Expected a UTF-8 "
                              "path; rename the folder, e.g. with `convmv -f latin1 -t utf8 --notest`.")


# ------------------------------------------------------------------------------------------------ labels CSV


def csv_case(tmp_path: Path, text: str) -> tuple[Path, str]:
    touch(tmp_path / "imgs", "a.jpg", "b.jpg", "c.jpg", "d/e.jpg")
    (tmp_path / "l.csv").write_text(text)
    return tmp_path / "imgs", str(tmp_path / "l.csv")


@pytest.mark.parametrize("text, message", [
    ("path\na.jpg\n", "labels CSV '{csv}' needs at least two columns (image path or id, label); found ['path']."),
    ("path,a,b\na.jpg,x,y\n", "labels CSV '{csv}' has no recognised label column (its columns: path, a, b). Expected "
                              "one of: label, class, category, target, y, class_name, labels; or name it with "
                              "--label-column."),
    ("", "labels CSV '{csv}' cannot be read as CSV: No columns to parse from file"),
    ("path,label\nzzz.jpg,cat\nyyy,dog\n", "labels CSV '{csv}': none of its 2 rows names an image under '{root}' "
                                            "(column 'path', e.g. 'zzz.jpg'). Use paths relative to DATA or file "
                                            "names, with or without extension."),
])
def test_a_labels_csv_that_cannot_label_is_refused_in_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    """Too few columns, no label column, an empty file, and no row naming an image: each refused word for word."""
    root, csv = csv_case(tmp_path, text)
    with pytest.raises(UsageError) as err:
        discover(root, csv)
    assert str(err.value) == message.format(csv=csv, root=root)


def test_a_missing_labels_csv_and_one_column_for_both_are_refused(tmp_path: Path) -> None:
    """A CSV that does not exist, and one column given for both path and label, refused word for word."""
    root, csv = csv_case(tmp_path, "path,label\na.jpg,x\n")
    with pytest.raises(UsageError) as err:
        discover(root, str(tmp_path / "none.csv"))
    assert str(err.value) == f"labels CSV '{tmp_path / 'none.csv'}' does not exist."
    with pytest.raises(UsageError) as err:
        discover(root, csv, path_column="path", label_column="path")
    assert str(err.value) == (f"labels CSV '{csv}': path and label column are both 'path'; set --path-column and "
                              "--label-column.")


def test_csv_labels_splits_and_unknown_rows(tmp_path: Path) -> None:
    """Keys trimmed, backslashes and './' normalised; a split column names each row's split; unlisted images are
    unlabelled; an empty label leaves the image unlabelled; unknown rows are listed."""
    root, csv = csv_case(tmp_path, "Image , Label,Split\nq.jpg,cat,train\n a.jpg ,cat, Training\n.\\d\\e,dog,val\n"
                                   "./b,,test\n")
    cat = discover(root, csv)
    assert cat.layout == "csv" and cat.label_names == ["cat", "dog"]
    assert list(zip(cat.paths, cat.labels, cat.splits)) == [("a.jpg", 0, "train"), ("b.jpg", -1, "test"),
                                                            ("c.jpg", -1, ""), ("d/e.jpg", 1, "val")]
    assert cat.ignored == [("q.jpg", "listed in the labels CSV but not found under DATA")]
    assert cat.notes == ()


def test_more_than_five_conflicting_images_are_cut_short(tmp_path: Path) -> None:
    """Conflicts listed for five images, '; ...' from the sixth; a split conflict shows both splits."""
    touch(tmp_path / "imgs", *[f"{i}.jpg" for i in range(7)])
    for n, more in ((6, "; ..."), (5, "")):
        rows = "".join(f"{i}.jpg,cat\n{i},dog\n{i},cat\n" for i in range(n))
        (tmp_path / "l.csv").write_text("path,label\n" + rows)
        with pytest.raises(UsageError) as err:
            discover(tmp_path / "imgs", str(tmp_path / "l.csv"))
        listed = "; ".join(f"{i}.jpg: 'cat', 'dog'" for i in range(5))
        assert str(err.value) == (f"labels CSV '{tmp_path / 'l.csv'}' gives {n} image(s) conflicting labels or splits "
                                  f"({listed}{more}). Keep one row per image.")
    (tmp_path / "l.csv").write_text("path,label,split\n0.jpg,cat,train\n0,cat,val\n")
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "imgs", str(tmp_path / "l.csv"))
    assert str(err.value) == (f"labels CSV '{tmp_path / 'l.csv'}' gives 1 image(s) conflicting labels or splits "
                              "(0.jpg: 'cat' (train), 'cat' (val)). Keep one row per image.")


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_path_and_source() -> None:
    """The manifest's hidden name beside the cache, and the flags a listing records."""
    assert manifest_path(Path("c/x.h5")) == Path("c/.x.h5.manifest.jsonl")
    assert manifest_source("d", "l.csv", "p", "q", 2) == {"data": "d", "labels": "l.csv", "path_column": "p",
                                                          "label_column": "q", "augment": 2}


def test_the_manifest_file_is_a_header_a_fixed_width_index_the_entries_and_the_left_out(tmp_path: Path) -> None:
    """Line 1: the header; then one '<entry offset> <first row>' line per file plus one, zero-padded to the wider of
    the two totals; then one JSON array per file; then the entries left out."""
    cat = small(Path("/d"), notes=("n1",), ignored=[("n.txt", "why"), ("o.txt", "why not")])
    source = manifest_source("/d", None, None, None, 1)
    path = tmp_path / "sub" / "deeper" / "m.jsonl"
    fingerprint = write_manifest(path, cat, source)
    assert fingerprint == cat.with_views(1).fingerprint()
    lines = path.read_bytes().split(b"\n")
    entries = [b'["a/1.jpg",1,10,0,"train"]', b'["a/2.jpg",2,20,0,"train"]', b'["b/3.jpg",3,30,1,"val"]',
               b'["x/4.jpg",4,40,-1,""]']
    assert json.loads(lines[0]) == {
        "format": "feature-cache manifest", "version": 1, "source": source, "root": "/d", "layout": "splits",
        "label_names": ["a", "b"], "notes": ["n1"], "has_splits": True, "files": 4, "rows": 6,
        "fingerprint": fingerprint, "ignored": 2, "index_width": 3}
    offsets = [0, *itertools.accumulate(len(e) + 1 for e in entries)]
    assert offsets[-1] == 102
    assert lines[1:6] == [f"{o:03d} {r:03d}".encode() for o, r in zip(offsets, [0, 2, 4, 5, 6])]
    assert lines[6:10] == entries and lines[10:] == [b'["n.txt", "why"]', b'["o.txt", "why not"]', b""]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.jsonl"]


def test_a_manifest_is_read_back_whole_or_by_shard(tmp_path: Path) -> None:
    """Whole: the listing's rows, stamps and fingerprint; by shard: the listing's shard, stamps included."""
    touch(tmp_path, "train/a/1.jpg", "train/a/2.jpg", "val/b/3.jpg")
    cat = discover(tmp_path)
    source = manifest_source(str(tmp_path), None, None, None, 2)
    fingerprint = write_manifest(tmp_path / "m", cat, source)
    rows = cat.with_views(2)
    whole, found = read_manifest(tmp_path / "m", None, source)
    assert found == fingerprint and whole.paths == rows.paths and whole.views == rows.views
    assert whole.file_stamps == rows.file_stamps and whole.offset == 0 and whole.ignored == []
    for index in range(3):
        part, _ = read_manifest(str(tmp_path / "m"), (index, 3), source)
        expected = rows.shard(index, 3)
        assert (part.paths, part.views, part.labels, part.splits, part.offset, part.file_stamps) == (
            expected.paths, expected.views, expected.labels, expected.splits, expected.offset, expected.file_stamps)


def test_a_manifest_that_cannot_be_read_or_is_of_another_version_or_flags_is_refused(tmp_path: Path) -> None:
    """A missing file, a header of another format or version, and other flags: each refused word for word."""
    again = ("Leave out --manifest to list DATA here, or submit again (`python -m pipeline slurm`), which lists it "
             "anew.")
    with pytest.raises(UsageError) as err:
        read_manifest(tmp_path / "none", None, {})
    assert str(err.value) == (f"manifest '{tmp_path / 'none'}' cannot be read (No such file or directory). Expected "
                              f"the listing of DATA that `python -m pipeline slurm` writes beside the cache. {again}")
    for header in (b"{}\n", b'{"format": "feature-cache manifest", "version": 2}\n', b"[1]\n", b"x\n",
                   b'{"format": "feature-cache manifest", "version": 1}\n'):
        (tmp_path / "m").write_bytes(header)
        with pytest.raises(UsageError) as err:
            read_manifest(tmp_path / "m", None, {})
        assert str(err.value) == (f"'{tmp_path / 'm'}' is not a manifest of this version (expected a header line "
                                  f"with format 'feature-cache manifest', version 1). {again}")
    touch(tmp_path, "d/a/1.jpg")
    write_manifest(tmp_path / "m", discover(tmp_path / "d"), manifest_source("d", None, None, None, 0))
    with pytest.raises(UsageError) as err:
        read_manifest(tmp_path / "m", None, manifest_source("d", None, "path", None, 0))
    assert str(err.value) == (f"manifest '{tmp_path / 'm'}' lists DATA for --path-column None, not 'path': it was "
                              "written for another extraction. Pass the flags it was written for, or leave out "
                              "--manifest to list DATA here.")


def test_a_manifest_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    """A manifest under a file, or over a folder, is refused in one line and no temporary file is left."""
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as err:
        write_manifest(tmp_path / "file" / "m", small(), manifest_source("d", None, None, None, 0))
    assert str(err.value).startswith(f"the manifest '{tmp_path / 'file' / 'm'}' cannot be written (")
    assert str(err.value).endswith("). Expected a writable folder beside the cache; free space or choose another "
                                   "--out.")
    (tmp_path / "adir").mkdir()  # written, then not renamed over a folder: the temporary file is removed
    with pytest.raises(UsageError, match=r"manifest '.*adir' cannot be written \(Is a directory\)"):
        write_manifest(tmp_path / "adir", small(), manifest_source("d", None, None, None, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]
    long = tmp_path / ("m" * 253)  # a name the filesystem takes, whose temporary name (+ .tmp) it does not
    with pytest.raises(UsageError, match=r"cannot be written \(File name too long\)"):
        write_manifest(long, small(), manifest_source("d", None, None, None, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]


def test_files_changed_since_the_manifest_stop_the_task_naming_the_first(tmp_path: Path) -> None:
    """A gone, resized or unreadable file of the task's own part stops it naming the first; other tasks go on."""
    touch(tmp_path, "d/a/1.jpg", "d/a/2.jpg", "d/a/3.jpg")
    source = manifest_source("d", None, None, None, 0)
    write_manifest(tmp_path / "m", discover(tmp_path / "d"), source)
    (tmp_path / "d/a/1.jpg").unlink()
    (tmp_path / "d/a/3.jpg").write_bytes(b"longer")
    with pytest.raises(UsageError) as err:
        read_manifest(tmp_path / "m", None, source)
    assert str(err.value) == str(_changed(tmp_path / "m", "a/1.jpg", "is gone (and 1 more of this shard's files)"))
    assert str(err.value).startswith(f"DATA changed since the manifest '{tmp_path / 'm'}' was written: 'a/1.jpg' is "
                                     "gone (and 1 more of this shard's files). Every task of one job extracts the "
                                     "same listing, so this one stops; submit the job again (`python -m pipeline "
                                     "slurm` with the same flags), which lists DATA anew: shards already written are "
                                     "then updated, recomputing only new or changed files.")
    part, _ = read_manifest(tmp_path / "m", (1, 3), source)  # shard 1 holds 2.jpg only, unchanged
    assert part.paths == ["a/2.jpg"]
    with pytest.raises(UsageError, match=r"'a/3\.jpg' has another size or modification time\. Every task"):
        read_manifest(tmp_path / "m", (2, 3), source)
    (tmp_path / "d/a/2.jpg").unlink()
    (tmp_path / "d/a").rename(tmp_path / "d/b")
    (tmp_path / "d/a").write_bytes(b"")  # a file where the folder was: the listed files cannot be read
    with pytest.raises(UsageError, match=r"'a/2\.jpg' cannot be read \(Not a directory\)\. Every task"):
        read_manifest(tmp_path / "m", (1, 3), source)


# ------------------------------------------------------------------------------------------------ tar shards


def tar(path: Path, names: list[str]) -> Path:
    """A tar of members `names`, each a few bytes (discovery indexes members, it decodes none)."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 3, 1_700_000_000
            archive.addfile(info, io.BytesIO(b"abc"))
    return path


@pytest.mark.parametrize("data", ["shards", "shards/train-000.tar", "shards/*.tar"])
def test_every_way_to_name_shards_keeps_their_indexes_in_the_folder_given(tmp_path: Path, data: str) -> None:
    """A folder of shards, one shard, a pattern: each shard's index is kept in `tar_index` (what spares the next run
    reading its headers), and the catalog is the one without it."""
    tar(tmp_path / "shards" / "train-000.tar", ["k1.jpg", "k1.cls"])
    tar(tmp_path / "shards" / "val-000.tar", ["k2.jpg", "k2.cls"])
    kept = tmp_path / "kept"
    found = discover(str(tmp_path / data), tar_index=kept)
    assert found.paths == discover(str(tmp_path / data)).paths
    assert len(list(kept.glob("*.json"))) == len({p.split("/")[0] for p in found.paths}) >= 1


def test_a_folder_of_shards_lists_its_samples_and_what_lies_beside_them(tmp_path: Path) -> None:
    """Rows are '<shard>/<image member>' sorted; split from the shard's name; of the odd entries beside the shards,
    only what looks like a shard is listed."""
    tar(tmp_path / "train-000.tar", ["k1.jpg", "k1.cls", "k0.png", "k0.cls"])
    tar(tmp_path / "val-000.tar", ["k2.jpg", "k2.cls"])
    for name in ("classes.txt", "train-000.parquet", "train-000_stats.json", "other.parquet"):
        (tmp_path / name).symlink_to("nowhere")
    touch(tmp_path, "old.tar.gz", "notes")
    cat = discover(tmp_path)
    assert cat.layout == "tars" and cat.paths == ["train-000.tar/k0.png", "train-000.tar/k1.jpg", "val-000.tar/k2.jpg"]
    assert cat.splits == ["train", "train", "val"] and cat.label_names == ["abc"] and cat.labels == [0, 0, 0]
    assert cat.ignored == [("old.tar.gz", tars.COMPRESSED)]  # the rest: no candidate type, only counted
    assert cat.stamps[2] == ((tmp_path / "val-000.tar").stat().st_size, (tmp_path / "val-000.tar").stat().st_mtime_ns)


def test_beside_shards_renames_no_image_to_no_tar_shard() -> None:
    """Beside shards, 'not an image' reads 'not a tar shard'; classes.txt and sidecars named after a shard are
    dropped."""
    others = [("a.md", "not an image file type (.md)"), ("classes.txt", "x"), ("s1.parquet", "y"),
              ("s1_stats.json", "z"), ("s2.json", "w"), ("b", "a link to 'c', which does not exist"),
              ("t.v1.parquet", "y"), ("t.v1_stats.json", "z")]
    assert catalog_module._beside_shards(Path("/d"), ["s1.tar", "s2.tar", "t.v1.tar"], others) == [
        ("a.md", "not a tar shard (.md)"), ("b", "a link to 'c', which does not exist")]


def test_shard_splits_come_from_split_folders_only_when_every_shard_folder_names_one(tmp_path: Path) -> None:
    """Shard splits from the name, else from the folder when every shard folder names a split."""
    tar(tmp_path / "d" / "Training" / "000.tar", ["a.jpg"])
    tar(tmp_path / "d" / "val" / "000.tar", ["a.jpg"])
    tar(tmp_path / "d" / "test-001.tar", ["a.jpg"])
    assert discover(tmp_path / "d").splits == ["train", "test", "val"]
    tar(tmp_path / "d" / "misc" / "train-9.tar", ["a.jpg"])
    tar(tmp_path / "d" / "misc" / "x.tar", ["a.jpg"])
    assert discover(tmp_path / "d").splits == ["", "train", "", "test", ""]


def test_shards_without_any_image_are_refused(tmp_path: Path) -> None:
    """Shards whose samples hold no image are refused, naming a skipped entry."""
    tar(tmp_path / "a.tar", ["k.txt", "k.cls"])
    with pytest.raises(UsageError) as err:
        discover(tmp_path)
    types = ", ".join(sorted(tars.IMAGE_TYPES))
    assert str(err.value).startswith(f"the 1 tar shard(s) under '{tmp_path}' hold no sample with an image (looked for "
                                     f"members of type {types}). Skipped 1 entries, e.g. a.tar/k: ")


def test_a_pattern_names_shards_relative_to_the_folder_before_its_first_pattern_character(tmp_path: Path) -> None:
    """Globs and braces name shards under the folder before the pattern; folders, other files and missing names
    are listed."""
    tar(tmp_path / "s" / "a-0.tar", ["k.jpg"])
    tar(tmp_path / "s" / "a-1.tar", ["k.jpg"])
    touch(tmp_path / "s", "a-2.txt")
    (tmp_path / "s" / "a-3.tar").mkdir()
    touch(tmp_path / "s", "a-5")
    cat = discover(f"{tmp_path}/s/a-*")
    assert cat.root == tmp_path / "s" and cat.paths == ["a-0.tar/k.jpg", "a-1.tar/k.jpg"]
    assert cat.ignored == [("a-2.txt", "not a tar shard (.txt); skipped"),
                           ("a-3.tar", "a folder; a pattern selects .tar files"),
                           ("a-5", "not a tar shard (no extension); skipped")]
    braces = discover(f"{tmp_path}/s/a-{{0..1}}.tar")
    assert braces.paths == cat.paths and braces.ignored == []
    missing = discover(f"{tmp_path}/s/a-{{1..4}}.tar")
    assert missing.paths == ["a-1.tar/k.jpg"] and missing.ignored == [
        ("a-2.tar", "named by the pattern, but does not exist; skipped"),
        ("a-3.tar", "a folder; a pattern selects .tar files"),
        ("a-4.tar", "named by the pattern, but does not exist; skipped")]


def test_a_pattern_that_names_no_shard_is_refused_in_one_sentence(tmp_path: Path) -> None:
    """A pattern matching nothing, or no .tar, refused word for word (the example is the last entry)."""
    with pytest.raises(UsageError) as err:
        discover(f"{tmp_path}/s/a-{{7..8}}.tar")
    assert str(err.value) == (f"DATA pattern '{tmp_path}/s/a-{{7..8}}.tar' matches no file (e.g. "
                              f"'{tmp_path}/s/a-7.tar'). Expected a glob or brace pattern naming .tar shards, e.g. "
                              "'shards/*.tar' or 'shards/train-{000000..000099}.tar' (quoted, so that the shell leaves "
                              "it to this tool).")
    with pytest.raises(UsageError, match=r"matches no file \(e\.g\. '.*/s/\*\.tar'\)"):
        discover(f"{tmp_path}/s/*.tar")
    touch(tmp_path / "s", "a.txt", "b.txt")
    (tmp_path / "s" / "d.txt").mkdir()
    with pytest.raises(UsageError) as err:
        discover(f"{tmp_path}/s/*.txt")
    assert str(err.value) == (f"DATA pattern '{tmp_path}/s/*.txt' matches no .tar shard (3 other entries, e.g. d.txt: "
                              "a folder; a pattern selects .tar files). Expected .tar files; for a folder of images, "
                              "give the folder itself.")
    touch(tmp_path, "f")
    with pytest.raises(UsageError) as err:
        discover(f"{tmp_path}/f/{{a,b}}")
    assert str(err.value) == (f"DATA pattern '{tmp_path}/f/{{a,b}}' matches no file (e.g. '{tmp_path}/f/a'). Expected "
                              "a glob or brace pattern naming .tar shards, e.g. 'shards/*.tar' or "
                              "'shards/train-{000000..000099}.tar' (quoted, so that the shell leaves it to this tool).")


def test_one_tar_file_is_read_as_the_pattern_naming_it(tmp_path: Path) -> None:
    """One .tar as DATA: its samples, under its folder, split from its name; a non-UTF-8 name refused."""
    tar(tmp_path / "val-000.tar", ["k.jpg"])
    tar(tmp_path / "train-000.tar", ["k.jpg"])
    cat = discover(tmp_path / "val-000.tar")
    assert (cat.root, cat.paths, cat.splits, cat.ignored) == (tmp_path, ["val-000.tar/k.jpg"], ["val"], [])
    bad = tar(tmp_path / "caf\udce9.tar", ["k.jpg"])
    with pytest.raises(UsageError) as err:
        discover(bad)
    assert str(err.value) == f"DATA '{bad}': {NOT_UTF8}"


def test_a_manifest_gives_the_left_out_entries_to_shard_0_only_and_keeps_the_header(tmp_path: Path) -> None:
    """Left-out entries go to shard 0 only; every shard keeps root, layout, class names and notes."""
    touch(tmp_path, "d/train/a/1.jpg", "d/train/a/2.jpg", "d/val/b/3.jpg", "d/train/n.txt")
    (tmp_path / "d" / "train" / "a" / "gone.jpg").symlink_to("nowhere.jpg")
    cat = discover(tmp_path / "d")
    source = manifest_source("d", None, None, None, 1)
    write_manifest(tmp_path / "m", cat, source)
    first, _ = read_manifest(tmp_path / "m", (0, 2), source)
    second, _ = read_manifest(tmp_path / "m", (1, 2), source)
    assert first.ignored == cat.ignored == [("train/a/gone.jpg", "a link to 'nowhere.jpg', which does not exist; "
                                                                 "skipped. Fix or remove the link.")]
    assert second.ignored == []
    for part in (first, second):
        assert (part.root, part.layout, part.label_names, part.notes) == (cat.root, "splits", ["a", "b"], cat.notes)
    assert first.paths + second.paths == cat.with_views(1).paths
    assert (first.offset, second.offset) == (0, 2) and second.views == [0, 1, 0]


def test_a_tar_manifest_reads_each_sample_from_its_shard_and_checks_the_shard(tmp_path: Path) -> None:
    """Tar entries carry shard, offset and size; read back, each shard is stat'ed once and checked."""
    tar(tmp_path / "d" / "train-0.tar", ["k0.jpg", "k0.cls", "k1.jpg", "k1.cls"])
    tar(tmp_path / "d" / "train-1.tar", ["k2.jpg", "k2.cls"])
    cat = discover(tmp_path / "d")
    source = manifest_source("d", None, None, None, 0)
    write_manifest(tmp_path / "m", cat, source)
    entries = (tmp_path / "m").read_bytes().split(b"\n")[5:8]
    size0 = (tmp_path / "d" / "train-0.tar").stat().st_size
    mtime0 = (tmp_path / "d" / "train-0.tar").stat().st_mtime_ns
    assert json.loads(entries[0]) == ["train-0.tar/k0.jpg", size0, mtime0, 0, "train", "train-0.tar",
                                      cat.members["train-0.tar/k0.jpg"].offset, 3]
    read, _ = read_manifest(tmp_path / "m", None, source)
    for i in range(3):
        a, b = read.source(i), cat.source(i)
        assert (a.shard.name, a.offset, a.size) == (b.shard.name, b.offset, b.size)
    assert read.members["train-0.tar/k0.jpg"].shard is read.members["train-0.tar/k1.jpg"].shard
    assert read.members["train-0.tar/k0.jpg"].shard.path == (tmp_path / "d" / "train-0.tar").absolute()
    assert read.stamps == cat.stamps
    tar(tmp_path / "d" / "train-1.tar", ["k2.jpg", "k2.cls", "k3.jpg"])
    with pytest.raises(UsageError) as err:
        read_manifest(tmp_path / "m", None, source)
    assert str(err.value).startswith(f"DATA changed since the manifest '{tmp_path / 'm'}' was written: 'train-1.tar' "
                                     "has another size or modification time. Every task")
    part, _ = read_manifest(tmp_path / "m", (0, 3), source)  # shard 0 of 3 holds only train-0.tar/k0.jpg
    assert part.paths == ["train-0.tar/k0.jpg"]
    (tmp_path / "d" / "train-1.tar").unlink()
    with pytest.raises(UsageError) as err:
        read_manifest(tmp_path / "m", (2, 3), source)
    assert str(err.value).startswith(f"DATA changed since the manifest '{tmp_path / 'm'}' was written: 'train-1.tar' "
                                     "cannot be read (No such file or directory). Every task")


def test_tar_samples_labelled_by_a_csv_keep_the_splits_of_their_shards(tmp_path: Path) -> None:
    """CSV labels by sample key; splits from the shard names unless the CSV gives one."""
    tar(tmp_path / "d" / "train-0.tar", ["k0.jpg", "k1.jpg"])
    tar(tmp_path / "d" / "val-0.tar", ["k2.jpg"])
    (tmp_path / "l.csv").write_text("key,label\nk0,wasp\nk2,bee\n")
    cat = discover(tmp_path / "d", str(tmp_path / "l.csv"))
    assert (cat.layout, cat.label_names, cat.labels, cat.splits) == ("tars", ["bee", "wasp"], [1, -1, 0],
                                                                     ["train", "train", "val"])
    assert cat.members["val-0.tar/k2.jpg"].shard.name == "val-0.tar"
    (tmp_path / "l.csv").write_text("key,label,split\nk0,wasp,test\nk2,bee,\n")
    assert discover(tmp_path / "d", str(tmp_path / "l.csv")).splits == ["test", "train", ""]  # k1: not in it


def test_walk_names_suffixes_as_path_does_and_keeps_utf8_names(tmp_path: Path) -> None:
    """The suffix is the last dot's (x.y.jpg is a .jpg), never a trailing dot; a shard's suffix in capitals is a
    shard; names and folders in UTF-8 beyond ASCII are candidates like any other."""
    touch(tmp_path, "c/x.y.jpg", "c/trailing.", "c/x.c", "café.jpg", "ünï/1.jpg", "S.TAR")
    listing = _walk_files(tmp_path, catalog_module.IMAGE_EXTENSIONS | {".tar"})
    assert listing.files == ["c/x.y.jpg", "café.jpg", "ünï/1.jpg"] and listing.apart == ["S.TAR"]
    assert listing.not_candidates == {"": 1, ".c": 1} and listing.others == []
    cafe = (tmp_path / "café.jpg").stat()
    assert listing.stamps["café.jpg"] == (cafe.st_size, cafe.st_mtime_ns)  # stat'ed on the walk, not in a batch


def test_walk_lists_folders_it_cannot_list_and_refuses_data_it_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.scandir failing (permissions; simulated, as root reads any folder): a sub-folder is listed and the walk
    goes on; DATA itself is refused in one sentence."""
    touch(tmp_path, "a/1.jpg", "b/2.jpg", "c/3.jpg")
    real = os.scandir

    def scandir(folder):
        if folder in (str(tmp_path / "b"), str(tmp_path / "x")):
            raise PermissionError(13, "Permission denied", folder)
        return real(folder)

    monkeypatch.setattr(catalog_module.os, "scandir", scandir)
    listing = _walk_files(tmp_path)
    assert listing.files == ["a/1.jpg", "c/3.jpg"]
    assert listing.others == [("b/", "a folder that cannot be read (Permission denied); its files are left out. Fix "
                                     "its permissions (e.g. chmod a+rx) to include them.")]
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError) as err:
        _walk_files(tmp_path / "x")
    assert str(err.value) == (f"DATA folder '{tmp_path / 'x'}' cannot be read (Permission denied). Expected a folder "
                              "this user may list; fix its permissions (e.g. chmod a+rx) or choose another DATA.")


def test_a_data_folder_named_like_a_pattern_or_a_shard_is_read_as_a_folder(tmp_path: Path) -> None:
    """A path that exists is a path: '[2020] photos' is no glob, 'imgs.tar/' is a folder of images."""
    touch(tmp_path / "[2020] photos", "a/1.jpg")
    touch(tmp_path / "imgs.tar", "a/1.jpg")
    for data in (tmp_path / "[2020] photos", tmp_path / "imgs.tar"):
        cat = discover(str(data))
        assert (cat.root, cat.layout, cat.paths) == (data, "classes", ["a/1.jpg"])


@pytest.mark.parametrize("form", ["folder", "pattern", "one"])
def test_every_form_of_tar_data_takes_a_labels_csv_with_named_columns(tmp_path: Path, form: str) -> None:
    """A folder of shards, a pattern, one .tar: each passes the labels CSV and its column flags on."""
    tar(tmp_path / "d" / "train-0.tar", ["k0.jpg", "k0.cls", "k1.jpg"])
    (tmp_path / "l.csv").write_text("sample,other,lab\nk0,x,wasp\nk1,y,bee\n")
    data = {"folder": tmp_path / "d", "pattern": f"{tmp_path}/d/*.tar", "one": tmp_path / "d" / "train-0.tar"}[form]
    cat = discover(data, str(tmp_path / "l.csv"), path_column="sample", label_column="lab")
    assert (cat.layout, cat.label_names, cat.labels, cat.notes) == ("tars", ["bee", "wasp"], [1, 0], ())


def test_a_csv_outside_data_leaves_the_csv_files_inside_counted_and_notes_add_up(tmp_path: Path) -> None:
    """Only the labels CSV itself, kept inside DATA, is no stray file; the CSV's own note comes first."""
    touch(tmp_path / "imgs", "img_0.jpg", "img_1.jpg", "other.csv", "n.txt")
    (tmp_path / "imgs" / "gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "labels.csv").write_text("id,breed\nimg_0,beagle\nimg_1,boxer\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "labels.csv"))
    assert cat.notes == (f"labels CSV '{tmp_path / 'labels.csv'}': using column 'breed' as the label (the only column "
                         "besides 'id'); name another with --label-column",
                         "left out 2 other files (1 .csv, 1 .txt) under DATA: not image files, so no candidates (not "
                         "listed as skipped)")
    assert cat.ignored == [("gone.jpg", "a link to 'nowhere.jpg', which does not exist; skipped. Fix or remove the "
                                        "link.")]


def test_csv_values_are_kept_as_text(tmp_path: Path) -> None:
    """Numbers stay strings, and 'NA' or 'null' are class names, not missing values."""
    root, csv = csv_case(tmp_path, "path,label\na.jpg,1\nb.jpg,NA\nc.jpg,null\nd/e.jpg,10\n")
    cat = discover(root, csv)
    assert cat.label_names == ["1", "10", "NA", "null"] and cat.labels == [0, 2, 3, 1]


def test_csv_keys_find_images_by_path_or_name_with_or_without_the_extension(tmp_path: Path) -> None:
    """'a.jpg' names a.jpg even beside a.png; a key whose extension differs finds the image by its stem."""
    touch(tmp_path / "imgs", "a.jpg", "a.png", "c.jpg")
    (tmp_path / "l.csv").write_text("path,label\na.jpg,cat\na.png,dog\nc.png,cow\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "l.csv"))
    assert (cat.paths, cat.labels, cat.label_names) == (["a.jpg", "a.png", "c.jpg"], [0, 2, 1], ["cat", "cow", "dog"])


def test_csv_with_a_split_column_and_one_other_column_takes_that_as_the_label(tmp_path: Path) -> None:
    """A split column does not count as a candidate label column: the one other column is the label."""
    root, csv = csv_case(tmp_path, "id,breed,split\na,beagle,val\nb,boxer,train\n")
    cat = discover(root, csv)
    assert (cat.label_names, cat.labels, cat.splits) == (["beagle", "boxer"], [0, 1, -1, -1], ["val", "train", "", ""])
    assert len(cat.notes) == 1 and "using column 'breed' as the label" in cat.notes[0]


def test_csv_path_column_refusal_and_an_empty_table(tmp_path: Path) -> None:
    """No path column refused word for word; a CSV of a header only names no image."""
    root, csv = csv_case(tmp_path, "a,b,c\nx,y,z\n")
    with pytest.raises(UsageError) as err:
        discover(root, csv)
    assert str(err.value) == (f"labels CSV '{csv}' has no recognised path column (its columns: a, b, c). Expected one "
                              f"of: {', '.join(catalog_module.PATH_COLUMNS)}; or name it with --path-column.")
    (tmp_path / "l.csv").write_text("path,label\n")
    with pytest.raises(UsageError) as err:
        discover(root, csv)
    assert str(err.value) == (f"labels CSV '{csv}': none of its 0 rows names an image under '{root}' (column 'path', "
                              "e.g. ''). Use paths relative to DATA or file names, with or without extension.")


def test_a_manifest_of_another_version_is_refused_though_complete(tmp_path: Path) -> None:
    """A complete manifest saying version 2 is refused."""
    touch(tmp_path, "d/a/1.jpg")
    source = manifest_source("d", None, None, None, 0)
    write_manifest(tmp_path / "m", discover(tmp_path / "d"), source)
    lines = (tmp_path / "m").read_bytes().split(b"\n", 1)
    header = json.loads(lines[0])
    (tmp_path / "m").write_bytes(json.dumps({**header, "version": 2}).encode() + b"\n" + lines[1])
    with pytest.raises(UsageError, match=r"is not a manifest of this version \(expected a header line with format "
                                         r"'feature-cache manifest', version 1\)"):
        read_manifest(tmp_path / "m", None, source)


def test_a_task_without_split_images_keeps_the_whole_sets_splits_for_its_views(tmp_path: Path) -> None:
    """A CSV gives a.jpg the split 'val', b.jpg and c.jpg none: with splits in the set, only 'train' images get views,
    so a task holding b and c alone still gives each one row."""
    root, csv = csv_case(tmp_path, "path,label,split\na.jpg,x,val\nb.jpg,x,\nc.jpg,y,\n")
    cat = discover(root, csv)
    source = manifest_source(str(root), csv, None, None, 1)
    write_manifest(tmp_path / "m", cat, source)
    part, _ = read_manifest(tmp_path / "m", (1, 2), source)
    expected = cat.with_views(1).shard(1, 2)
    assert (part.paths, part.views, part.offset) == (expected.paths, expected.views, expected.offset)
    assert part.paths == ["c.jpg", "d/e.jpg"] and part.views == [0, 0]


def tar_bytes(path: Path, members: dict[str, bytes]) -> Path:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_tar_labels_from_a_class_list_or_txt_members_and_notes(tmp_path: Path) -> None:
    """.cls indices name classes.txt's lines (no note); a .txt member as the label is said in a note; with a labels
    CSV, label members are not read at all (an out-of-range index there is no error)."""
    tar_bytes(tmp_path / "d" / "a.tar", {"k0.jpg": b"x", "k0.cls": b"1", "k1.jpg": b"x", "k1.cls": b"0"})
    (tmp_path / "d" / "classes.txt").write_text("ants\nbees\n")
    cat = discover(tmp_path / "d")
    assert (cat.label_names, cat.labels, cat.notes, cat.ignored) == (["ants", "bees"], [1, 0], (), [])
    tar_bytes(tmp_path / "t" / "a.tar", {"k0.jpg": b"x", "k0.txt": b"wasp\n", "k1.jpg": b"x", "k1.cls": b"7"})
    cat = discover(tmp_path / "t")
    assert cat.label_names == ["7", "wasp"] and cat.labels == [1, 0]
    assert cat.notes == ("tar shards: labels taken from the samples' .txt members (2 classes); a .txt counts as the "
                         "label only in a sample without .cls or .json. Give LABELS=labels.csv to label them "
                         "otherwise",)
    tar_bytes(tmp_path / "c" / "a.tar", {"k0.jpg": b"x", "k0.cls": b"-3"})
    (tmp_path / "l.csv").write_text("key,label\nk0,wasp\n")
    assert discover(tmp_path / "c", str(tmp_path / "l.csv")).label_names == ["wasp"]


def test_shard_folders_give_splits_only_when_all_of_them_name_one(tmp_path: Path) -> None:
    """'val-extra/' names a split, 'misc/' does not: no shard takes its folder's split."""
    tar(tmp_path / "d" / "val-extra" / "0.tar", ["a.jpg"])
    tar(tmp_path / "d" / "misc" / "0.tar", ["a.jpg"])
    assert discover(tmp_path / "d").splits == ["", ""]


def test_a_manifest_whose_row_numbers_are_its_widest_field_is_read_right(tmp_path: Path) -> None:
    """40 views a training image: the row numbers (up to 164) are as wide as the index (3 digits), so no leading
    zero pads them; a task starting at row 123 still finds its rows."""
    touch(tmp_path, "d/a/1.jpg", "d/a/2.jpg", "d/a/3.jpg", "d/a/4.jpg")
    cat = discover(tmp_path / "d")
    source = manifest_source("d", None, None, None, 40)
    write_manifest(tmp_path / "m", cat, source)
    header = json.loads((tmp_path / "m").read_bytes().split(b"\n")[0])
    assert (header["rows"], header["index_width"]) == (164, 3)
    for index in (2, 3):
        part, _ = read_manifest(tmp_path / "m", (index, 4), source)
        expected = cat.with_views(40).shard(index, 4)
        assert (part.paths, part.views, part.offset) == (expected.paths, expected.views, expected.offset)


def test_csv_columns_of_numbers_are_read_as_text(tmp_path: Path) -> None:
    """Numeric ids and labels are text: class names '10' and '9', sorted as text."""
    touch(tmp_path / "imgs", "1.jpg", "2.jpg")
    (tmp_path / "l.csv").write_text("id,label\n1,10\n2,9\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "l.csv"))
    assert (cat.label_names, cat.labels) == (["10", "9"], [0, 1])


def test_image_keys_of_nested_files_are_their_bare_names() -> None:
    """A file two folders deep is named by its full path or its bare name, with or without extension."""
    keys = _image_keys(["a/b/x.jpg"])
    assert keys == {"a/b/x.jpg": "a/b/x.jpg", "a/b/x": "a/b/x.jpg", "x.jpg": "a/b/x.jpg", "x": "a/b/x.jpg"}


def test_tar_refusals_name_the_class_list_and_the_root(tmp_path: Path) -> None:
    """An index past classes.txt names that file; shards with no member at all: no 'Skipped' part; a labels CSV
    naming no sample names the data root."""
    tar_bytes(tmp_path / "d" / "a.tar", {"k0.jpg": b"x", "k0.cls": b"10"})
    (tmp_path / "d" / "classes.txt").write_text("ants\nbees\n")
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "d")
    assert str(err.value).startswith("class index 10 in 'a.tar/k0.cls' is out of range: expected 0..1 (the 2 lines "
                                     "of classes.txt)")
    tar_bytes(tmp_path / "e" / "a.tar", {})
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "e")
    assert str(err.value) == (f"the 1 tar shard(s) under '{tmp_path / 'e'}' hold no sample with an image (looked for "
                              f"members of type {', '.join(sorted(tars.IMAGE_TYPES))}).")
    tar_bytes(tmp_path / "f" / "a.tar", {"k0.jpg": b"x"})
    (tmp_path / "l.csv").write_text("key,label\nzz,wasp\n")
    with pytest.raises(UsageError) as err:
        discover(tmp_path / "f", str(tmp_path / "l.csv"))
    assert f"none of its 1 rows names an image under '{tmp_path / 'f'}'" in str(err.value)


def test_tar_csv_keys_are_sample_keys_and_nested_shards_take_their_own_names_split(tmp_path: Path) -> None:
    """CSV keys are sample keys (a member's folder included); a nested shard's split is from its own name."""
    tar_bytes(tmp_path / "d" / "misc" / "validation" / "000.tar", {"x/k1.jpg": b"x", "k2.jpg": b"x"})
    (tmp_path / "l.csv").write_text("key,label\nx/k1,bee\nk2,ant\n")
    cat = discover(tmp_path / "d", str(tmp_path / "l.csv"))
    assert cat.paths == ["misc/validation/000.tar/k2.jpg", "misc/validation/000.tar/x/k1.jpg"]
    assert (cat.labels, cat.label_names, cat.splits) == ([0, 1], ["ant", "bee"], ["", ""])


def test_identical_csv_rows_with_a_split_collapse(tmp_path: Path) -> None:
    """The same image listed twice with the same label and split is no conflict."""
    root, csv = csv_case(tmp_path, "path,label,split\na.jpg,cat,train\na,cat,train\n")
    cat = discover(root, csv)
    assert (cat.labels[0], cat.splits[0]) == (0, "train")


def test_an_image_the_csv_does_not_list_is_unlabelled_whatever_the_class_names(tmp_path: Path) -> None:
    """Images the CSV does not list (or lists without a label) are unlabelled."""
    root, csv = csv_case(tmp_path, "path,label\na.jpg,XXXX\nb.jpg,\n")
    cat = discover(root, csv)
    assert cat.label_names == ["XXXX"] and cat.labels == [0, -1, -1, -1]


def test_a_labels_file_kept_in_data_as_a_compressed_tar_is_not_listed_as_skipped(tmp_path: Path) -> None:
    """pandas reads a CSV from a .tar.gz; kept beside the images, that file is the labels, not a left-out shard."""
    import tarfile

    touch(tmp_path / "imgs", "a.jpg", "b.jpg")
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,cat\nb.jpg,dog\n")
    with tarfile.open(tmp_path / "imgs" / "labels.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "labels.csv", arcname="labels.csv")
    cat = discover(tmp_path / "imgs", str(tmp_path / "imgs" / "labels.tar.gz"))
    assert cat.labels == [0, 1] and cat.ignored == []


def test_with_a_labels_csv_the_label_members_are_not_read(tmp_path: Path) -> None:
    """A sample whose .json metadata is not JSON would be skipped for its unknown label; labelled by the CSV, it is
    a candidate like any other."""
    tar_bytes(tmp_path / "d" / "a.tar", {"k0.jpg": b"x", "k0.json": b"{not json", "k1.jpg": b"x"})
    assert discover(tmp_path / "d").paths == ["a.tar/k1.jpg"]
    (tmp_path / "l.csv").write_text("key,label\nk0,wasp\nk1,bee\n")
    cat = discover(tmp_path / "d", str(tmp_path / "l.csv"))
    assert (cat.paths, cat.labels, cat.ignored) == (["a.tar/k0.jpg", "a.tar/k1.jpg"], [1, 0], [])
