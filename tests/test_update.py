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
    assert hidden(tmp_path / "x.h5") == parts_read(tmp_path / "x.h5")  # no scratch file is left
    assert extract(cfg, verbose=False).status == "up-to-date"


def hidden(path: Path) -> set[str]:
    """The hidden files beside the cache `path` but its lock."""
    return {p.name for p in path.parent.glob(f".{path.name}.*") if ".lock" not in p.name}


def parts_read(path: Path) -> set[str]:
    """The files the features of the cache `path` are read from, other than itself."""
    with h5py.File(path, "r") as f:
        return {s.file_name for d in f["features"].values() if d.is_virtual for s in d.virtual_sources()}


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
    monkeypatch.setattr(features.update, "LINKED_FILES", 0)  # rewritten, not linked: what is tested is the copy
    update = extract(cfg, verbose=False)
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 142, 28, 114)
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_a_damaged_kept_row_stops_the_update_in_one_line_naming_it(tiny_backbone, tmp_path, monkeypatch):
    """When the update rewrites the cache, a kept row that fails its checksum stops it; a linked update reads no kept
    row, and the damage is refused where the rows are read, as before the update."""
    import features.update
    from features.schema import DamagedCache
    from features.store import open_cache
    from tests.test_store import _overwrite_rows

    data = tmp_path / "data"
    write_images(data / "ants", 12, seed=3)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    _overwrite_rows(tmp_path / "x.h5", "top_conv", 5, b"\x7f" * 64)
    write_images(tmp_path / "more", 1, seed=4)[0].rename(data / "ants" / "img_003b.png")
    monkeypatch.setattr(features.update, "LINKED_FILES", 0)
    with pytest.raises(DamagedCache, match=r"x\.h5 is damaged: rows 0-11 of features/top_conv fail their checksum"):
        extract(cfg, verbose=False)  # rows 0-11: the chunk that holds row 5
    assert (tmp_path / "x.h5").exists()  # left as it was
    monkeypatch.undo()
    assert extract(cfg, verbose=False).status == "updated"
    with pytest.raises(DamagedCache, match=r"x\.h5 is damaged: rows 0-12 of features/top_conv fail their checksum"):
        open_cache(tmp_path / "x.h5").read("top_conv")  # the 13 rows of the linked file, read as one block


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_an_update_links_the_kept_rows_and_writes_no_feature_row(tiny_backbone, tmp_path, monkeypatch, capsys,
                                                                compression):
    """New files between kept rows and after them, a removed one: the updated cache reads its features from the old
    version and the computed rows (hard links beside it, no row copied), and equals a fresh extraction row for row."""
    from features.store import CacheWriter, open_cache

    data = tmp_path / "data"
    for k, name in enumerate(["ants", "bees"]):
        write_images(data / name, 10, seed=60 + k)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx", compression=compression)
    extract(cfg, verbose=False)
    for i, image in enumerate(write_images(tmp_path / "more", 3, seed=9)):
        image.rename(data / "bees" / f"img_{i:03d}b{image.suffix}")
    write_images(data / "wasps", 4, seed=10)
    (data / "ants" / "img_004.jpg").unlink()
    features_written, real = [], CacheWriter.write
    monkeypatch.setattr(CacheWriter, "write", lambda self, row, features, *a: features_written.append(
        (self.path.name, len(features))) or real(self, row, features, *a))
    update = extract(cfg, verbose=True)
    assert "no row copied; x.h5 reads its features from 2 file(s) beside it" in capsys.readouterr().out
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 26, 7, 19)
    assert {n for n, k in features_written if k} == {".x.h5.update"}  # only the 7 computed rows, into their cache
    assert open_cache(tmp_path / "x.h5").virtual and len(parts_read(tmp_path / "x.h5")) == 2
    assert hidden(tmp_path / "x.h5") == parts_read(tmp_path / "x.h5")
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_updates_in_turn_link_the_files_still_read_prune_the_others_and_compact_past_the_limit(tiny_backbone,
                                                                                             tmp_path, monkeypatch):
    """Each update links the parts its rows are in; a part no row reads any more is removed once the new version is
    published; past LINKED_FILES the update rewrites one plain file and removes every part; --overwrite too."""
    import features.update
    from features.store import open_cache

    data = tmp_path / "data"
    write_images(data / "ants", 8, seed=20)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    out = tmp_path / "x.h5"
    extract(cfg, verbose=False)
    monkeypatch.setattr(features.update, "LINKED_FILES", 3)
    first = write_images(tmp_path / "a", 1, seed=21)[0].rename(data / "ants" / "img_0005.png")
    extract(cfg, verbose=False)
    base_and_first = parts_read(out)
    assert len(base_and_first) == 2 and hidden(out) == base_and_first
    write_images(tmp_path / "b", 1, seed=22)[0].rename(data / "ants" / "img_0001.png")
    extract(cfg, verbose=False)
    assert len(parts_read(out)) == 3 and base_and_first < parts_read(out) and hidden(out) == parts_read(out)
    first.unlink()  # no row reads the first update's part any more: pruned
    extract(cfg, verbose=False)
    assert len(parts_read(out)) == 2 and hidden(out) == parts_read(out) and not base_and_first <= parts_read(out)
    for k in (23, 24):  # a third part, then a fourth: one file more than the limit, so the update compacts
        write_images(tmp_path / f"c{k}", 1, seed=k)[0].rename(data / "ants" / f"img_00{k}.png")
        extract(cfg, verbose=False)
    assert not open_cache(out).virtual and hidden(out) == set()
    assert_same(contents(out), contents(extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False).path))
    write_images(tmp_path / "d", 1, seed=25)[0].rename(data / "ants" / "img_0025.png")
    extract(cfg, verbose=False)
    assert hidden(out) and extract(cfg.replace(overwrite=True), verbose=False).status == "written"
    assert hidden(out) == set()


def test_a_linked_update_renumbers_kept_labels_for_a_class_listed_first(tiny_backbone, tmp_path):
    """Labels from a CSV: an added image of a new class 'ant' puts it first in the class list, so every kept row's
    label is renumbered in the linked cache; still a fresh extraction's rows."""
    from features.store import open_cache

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
    assert extract(cfg, verbose=False).processed == 2 and open_cache(tmp_path / "x.h5").virtual
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert [n.decode() for n in f["label_names"][()]] == ["ant", "cat", "dog"]
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_a_linked_update_that_fails_leaves_the_cache_as_it_was_and_the_rerun_finishes_it(tiny_backbone, tmp_path,
                                                                                         monkeypatch):
    """A full disk while the linked cache's rows are written: one line, the published cache untouched (same
    generation, same rows), and the rerun, with the computed rows kept in the update's scratch cache, runs no model,
    links, and leaves no part it does not read."""
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
    assert len(parts_read(tmp_path / "x.h5")) == 2 and hidden(tmp_path / "x.h5") == parts_read(tmp_path / "x.h5")
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_without_hard_links_an_update_rewrites_the_cache(tiny_backbone, tmp_path, monkeypatch):
    import errno

    from features.store import open_cache

    data = tmp_path / "data"
    write_images(data / "ants", 6, seed=26)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "x.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    extract(cfg, verbose=False)
    write_images(tmp_path / "more", 1, seed=27)[0].rename(data / "ants" / "img_0001.png")

    def no_links(*_):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    assert extract(cfg, verbose=False).status == "updated"
    assert not open_cache(tmp_path / "x.h5").virtual and hidden(tmp_path / "x.h5") == set()
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_an_updated_virtual_merge_links_its_shards_and_a_missing_part_is_refused(tiny_backbone, tmp_path):
    from features.schema import ForeignFile
    from features.store import open_cache
    from pipeline.merge import merge

    data = tmp_path / "data"
    write_images(data / "bees", 6, seed=28)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(tmp_path / "v.h5"), layer=["top_conv"],
                        image_size=64, batch_size=4, workers=1, engine="onnx")
    for i in range(2):
        extract(cfg.replace(shard=f"{i}/2"), verbose=False)
    merge(tmp_path / "v.h5", virtual=True)
    shards = parts_read(tmp_path / "v.h5")
    write_images(tmp_path / "more", 1, seed=29)[0].rename(data / "bees" / "img_0002.png")
    assert extract(cfg, verbose=False).status == "updated"
    assert shards < parts_read(tmp_path / "v.h5") and len(parts_read(tmp_path / "v.h5")) == 3
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "v.h5"), contents(fresh.path))
    (part,) = hidden(tmp_path / "v.h5")
    (tmp_path / part).unlink()
    with pytest.raises(ForeignFile, match=f"reads the shard '{part}', which is missing beside it"):
        open_cache(tmp_path / "v.h5")
