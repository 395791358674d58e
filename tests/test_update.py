"""Incremental extraction: a folder that changed since its cache was written is updated by computing only the new or
changed images, and the result equals a fresh extraction of the new folder row for row and bit for bit. Real photos
go through the small random-weight backbone: which rows are kept is the point here, not what the weights know."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import ROOT, write_images

TRAIN = ROOT / "data" / "hymenoptera-small" / "train"


def contents(path: Path) -> dict:
    """Every dataset and every attribute but the two timestamps and the output path: what a fresh run and an update
    must agree on."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        volatile = ("created", "completed", "config_json", "generation")
        out.update({f"@{k}": v for k, v in f.attrs.items() if k not in volatile})
        out["@config_json"] = {**json.loads(f.attrs["config_json"]), "out": None}
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] if isinstance(a[key], dict) else np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[Path]]:
    """200 real photos (100 per class) in DATA, and 10 more kept aside to be added."""
    data = tmp_path_factory.mktemp("update") / "data"
    spare = []
    for name in ("ants", "bees"):
        files = sorted((TRAIN / name).glob("*.jpg"))
        (data / name).mkdir(parents=True)
        for f in files[:100]:
            shutil.copy2(f, data / name / f.name)
        spare += files[100:105]
    return data, spare


def test_update_computes_only_new_or_changed_images_and_equals_a_fresh_run(folder, tiny_backbone, tmp_path, capsys):
    data, spare = folder
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), batch_size=16)
    first = extract(cfg, verbose=False)
    assert (first.status, first.images, first.processed, first.engine) == ("written", 200, 200, "onnx")

    for f in spare:  # 10 added
        shutil.copy2(f, data / f.parent.name / f.name)
    removed = sorted(data.glob("*/*.jpg"))[::40][:5]  # 5 removed, spread over both classes
    for f in removed:
        f.unlink()
    touched = sorted(data.glob("bees/*.jpg"))[7:10]  # 3 touched: same pixels, new modification time
    for f in touched:
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))

    update = extract(cfg, verbose=True)
    assert "keeping 192 rows of unchanged files, computing 13 new or changed" in capsys.readouterr().out
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 205, 13, 192)
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert (fresh.status, fresh.processed) == ("written", 205)
    assert_same(contents(tmp_path / "x.h5"), contents(tmp_path / "fresh.h5"))
    assert not [p for p in tmp_path.glob(".x.h5.*") if ".lock" not in p.name]  # no scratch file is left
    assert extract(cfg, verbose=False).status == "up-to-date"


def test_an_update_that_only_removes_files_runs_no_model(tiny_backbone, tmp_path):
    data = tmp_path / "data"
    for name in ("ants", "bees"):
        (data / name).mkdir(parents=True)
        for f in sorted((TRAIN / name).glob("*.jpg"))[:6]:
            shutil.copy2(f, data / name / f.name)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), batch_size=4)
    extract(cfg, verbose=False)
    (data / "bees").joinpath(sorted(os.listdir(data / "bees"))[0]).unlink()
    (data / "ants" / "notes.txt").write_text("not an image\n")
    update = extract(cfg, verbose=False)
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 11, 0, 11)
    extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(tmp_path / "fresh.h5"))


def test_an_update_copied_in_many_blocks_with_views_and_a_new_first_class_equals_a_fresh_run(tiny_backbone, tmp_path,
                                                                                           monkeypatch):
    """The copy goes block by block (here 32 rows: one chunk of 32 KiB rows), new rows land inside blocks and at their
    edges, removed files leave gaps, augmented views are rows of their own, and a class added first in the class list
    renumbers every kept label: still the rows of a fresh extraction."""
    import features.update

    data = tmp_path / "data"
    for k, name in enumerate(["bees", "wasps"]):
        write_images(data / name, 30, seed=40 + k)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=8, workers=1, engine="onnx", augment=1)
    assert extract(cfg, verbose=False).images == 120
    write_images(data / "ants", 5, seed=7)  # a new class, first in the list
    for i, image in enumerate(write_images(tmp_path / "more", 9, seed=8)):  # new files between kept ones
        image.rename(data / ("bees" if i % 2 else "wasps") / f"img_{i:03d}b{image.suffix}")
    for name in ("bees/img_004.jpg", "bees/img_005.jpg", "wasps/img_020.jpg"):
        (data / name).unlink()
    monkeypatch.setattr(features.update, "COPY_BLOCK_BYTES", 1)
    update = extract(cfg, verbose=False)
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 142, 28, 114)
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_a_damaged_kept_row_stops_the_update_in_one_line_naming_it(tiny_backbone, tmp_path):
    from features.schema import DamagedCache
    from tests.test_store import _overwrite_rows

    data = tmp_path / "data"
    write_images(data / "ants", 12, seed=3)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    _overwrite_rows(tmp_path / "x.h5", "top_conv", 5, b"\x7f" * 64)
    write_images(tmp_path / "more", 1, seed=4)[0].rename(data / "ants" / "img_003b.png")
    with pytest.raises(DamagedCache, match=r"x\.h5 is damaged: rows 0-11 of features/top_conv fail their checksum"):
        extract(cfg, verbose=False)  # rows 0-11: the chunk that holds row 5
    assert (tmp_path / "x.h5").exists()  # left as it was


def _rows_written(monkeypatch, path: Path) -> list[int]:
    """The first row of every `CacheWriter.write` into `path` (not the update's scratch cache) from now on."""
    from features.store import CacheWriter

    rows, real = [], CacheWriter.write

    def write(self, row, *args):
        if self.path == path:
            rows.append(row)
        return real(self, row, *args)

    monkeypatch.setattr(CacheWriter, "write", write)
    return rows


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_files_added_after_the_last_row_are_appended_and_the_kept_rows_not_rewritten(tiny_backbone, tmp_path,
                                                                                     monkeypatch, capsys, compression):
    """New files that all sort after the cache's rows (more images at the end of the last class, a class after the
    others): the update copies the file and writes only the new rows, and equals a fresh extraction row for row."""
    data = tmp_path / "data"
    for k, name in enumerate(["ants", "bees"]):
        write_images(data / name, 10, seed=60 + k)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx", compression=compression)
    extract(cfg, verbose=False)
    for i, image in enumerate(write_images(tmp_path / "more", 3, seed=9)):
        image.rename(data / "bees" / f"img_9{i:02d}{image.suffix}")
    write_images(data / "wasps", 4, seed=10)
    rows = _rows_written(monkeypatch, tmp_path / "x.h5")
    update = extract(cfg, verbose=True)
    assert "appending 7 rows to a copy of" in capsys.readouterr().out
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 27, 7, 20)
    assert rows and min(rows) == 20  # the kept rows 0-19 are never written again
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))
    assert not [p for p in tmp_path.glob(".x.h5.*") if ".lock" not in p.name]


def test_an_appended_update_renumbers_kept_labels_for_a_class_listed_first(tiny_backbone, tmp_path, monkeypatch):
    """Labels from a CSV: an added image of a new class 'ant' puts it first in the class list, so every kept row's
    label is renumbered in the copy; still a fresh extraction's rows."""
    from features.store import CacheWriter

    data = tmp_path / "data"
    images = write_images(data, 6, seed=11)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{p.name},{'dog' if i % 2 else 'cat'}\n" for i, p in enumerate(images)))
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), labels=str(csv), out=str(tmp_path / "x.h5"),
                        layer=["top_conv"], image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    added = write_images(tmp_path / "more", 2, seed=12)
    for i, image in enumerate(added):
        image.rename(data / f"img_9{i:02d}{image.suffix}")
        csv.write_text(csv.read_text() + f"img_9{i:02d}{image.suffix},ant\n")
    extended = []
    real = CacheWriter.extend.__func__
    monkeypatch.setattr(CacheWriter, "extend", classmethod(lambda cls, *a: extended.append(1) or real(cls, *a)))
    assert extract(cfg, verbose=False).processed == 2 and extended
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert [n.decode() for n in f["label_names"][()]] == ["ant", "cat", "dog"]
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_an_append_that_fails_leaves_the_cache_as_it_was_and_the_rerun_finishes_it(tiny_backbone, tmp_path,
                                                                                   monkeypatch):
    """A full disk while the new rows are written: one line, the published cache untouched (same generation, same
    rows), and the rerun, with the computed rows kept in the update's scratch cache, runs no model and appends."""
    import errno

    from features.schema import WriteFailed
    from features.store import CacheWriter, open_cache

    data = tmp_path / "data"
    write_images(data / "ants", 8, seed=13)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    before = contents(tmp_path / "x.h5")
    generation = open_cache(tmp_path / "x.h5").attrs.generation
    write_images(tmp_path / "more", 1, seed=14)[0].rename(data / "ants" / "img_900.png")
    real = CacheWriter.write

    def full_disk(self, row, *args):
        if self.path == tmp_path / "x.h5":
            raise self._fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"rows {row}-", row + 1)
        return real(self, row, *args)

    monkeypatch.setattr(CacheWriter, "write", full_disk)
    with pytest.raises(WriteFailed, match="the disk is full"):
        extract(cfg, verbose=False)
    assert open_cache(tmp_path / "x.h5").attrs.generation == generation
    assert_same(contents(tmp_path / "x.h5"), before)
    monkeypatch.setattr(CacheWriter, "write", real)
    again = extract(cfg, verbose=False)
    assert (again.status, again.images, again.processed) == ("updated", 9, 0)
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_only_files_added_after_every_row_of_a_plain_cache_are_appended(tiny_backbone, tmp_path):
    from features.catalog import discover
    from features.store import open_cache
    from features.update import appendable, reusable_rows
    from pipeline.merge import merge

    data = tmp_path / "data"
    write_images(data / "bees", 4, seed=15)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    old = open_cache(tmp_path / "x.h5")

    def can_append() -> bool:
        catalog = discover(data)
        return appendable(old, reusable_rows(old, catalog))

    assert not can_append()  # nothing added
    (data / "bees" / "img_900.jpg").write_bytes((data / "bees" / "img_001.jpg").read_bytes())
    assert can_append()
    (data / "bees" / "img_900.jpg").rename(data / "bees" / "img_900_with_a_longer_name.jpg")
    assert can_append()  # longer than any path the cache's column holds: the copy's column is widened
    (data / "bees" / "img_900_with_a_longer_name.jpg").rename(data / "bees" / "img_0015.jpg")
    assert not can_append()  # sorts between kept rows
    (data / "bees" / "img_0015.jpg").rename(data / "bees" / "img_900.jpg")
    (data / "bees" / "img_002.jpg").unlink()
    assert not can_append()  # a removed file
    for i in range(2):
        extract(cfg.replace(out=str(tmp_path / "v.h5"), shard=f"{i}/2"), verbose=False)
    virtual = open_cache(merge(tmp_path / "v.h5", virtual=True).path)
    catalog = discover(data)
    assert not appendable(virtual, reusable_rows(virtual, catalog))
