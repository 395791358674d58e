"""DATA listed once (features/catalog.py, `write_manifest`/`read_manifest`): a shard read from the manifest has exactly
the rows, stamps, views, offset and left-out entries of today's `discover(...).with_views(k).shard(i, n)`; a shard task
given the manifest never walks DATA, stats only its own files, reads only its own part of the manifest, and writes the
very cache a task that lists DATA writes. A manifest that DATA no longer matches, or that was written for other flags,
stops the task in one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from features import catalog as catalog_module
from features.catalog import (Catalog, discover, manifest_path, manifest_source, read_manifest, write_manifest)
from features.errors import UsageError
from features.images import read_file
from features.store import read_attrs
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import write_images
from tests.test_tars import pack
from tests.test_update import assert_same, contents


def split_folder(root: Path) -> Path:
    """train/ and val/ with two classes, an unlabelled image at the top of train/, and two odd entries."""
    data = root / "data"
    for split, n in [("train", 7), ("val", 3)]:
        for k, name in enumerate(["ants", "bees"]):
            write_images(data / split / name, n, seed=10 * k + n)
    write_images(data / "train", 1, seed=99)  # train/img_000.png: no class folder, unlabelled
    (data / "train" / "ants" / "gone.jpg").symlink_to("nowhere.jpg")
    (data / "val" / "bees" / "caption.txt").write_text("not an image")
    return data


def source(data: Path, augment: int = 0) -> dict[str, object]:
    return manifest_source(str(data), None, None, None, augment)


def same_rows(a: Catalog, b: Catalog) -> None:
    for name in ("root", "paths", "labels", "splits", "views", "label_names", "layout", "ignored", "offset", "notes"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.stamps == b.stamps


@pytest.mark.parametrize("augment", [0, 2])
def test_every_shard_read_from_the_manifest_is_the_shard_of_the_listing(tmp_path, augment):
    data = split_folder(tmp_path)
    listed = discover(data)
    manifest = tmp_path / ".x.h5.manifest.jsonl"
    fingerprint = write_manifest(manifest, listed, source(data, augment))
    full = listed.with_views(augment)
    assert fingerprint == full.fingerprint() and len(full) == 21 + 2 * 14 * (augment > 0)
    whole, whole_fingerprint = read_manifest(manifest, None, source(data, augment))
    same_rows(whole, full)
    assert whole_fingerprint == fingerprint
    for count in (1, 3, 7, len(full) + 2):  # + 2: empty shards too
        parts = [read_manifest(manifest, (i, count), source(data, augment)) for i in range(count)]
        for i, (part, part_fingerprint) in enumerate(parts):
            same_rows(part, full.shard(i, count))
            assert part_fingerprint == fingerprint
        assert sum(len(p) for p, _ in parts) == len(full)


def test_a_tar_manifest_reads_each_image_from_its_shard(tmp_path):
    for split, n in [("train", 6), ("val", 2)]:
        for k, name in enumerate(["cats", "dogs"]):
            write_images(tmp_path / "images" / split / name, n, seed=k + n)
    pack(tmp_path / "images", tmp_path / "shards")
    listed = discover(tmp_path / "shards")
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, listed, source(tmp_path / "shards"))
    for i in range(3):
        part, _ = read_manifest(manifest, (i, 3), source(tmp_path / "shards"))
        same_rows(part, listed.with_views(0).shard(i, 3))
        for j in range(len(part)):
            assert bytes(read_file(part.source(j))) == bytes(read_file(listed.source(part.offset + j)))


def test_a_shard_task_with_a_manifest_walks_nothing_and_writes_the_cache_a_listing_task_writes(
        tmp_path, tiny_backbone, monkeypatch):
    data = split_folder(tmp_path)
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), batch_size=4, workers=1, augment=1)
    manifest = manifest_path(tmp_path / "with.h5")
    write_manifest(manifest, discover(data), source(data, augment=1))
    listed = discover(data).with_views(1)
    today = extract(cfg.replace(out=str(tmp_path / "listed.h5"), shard="1/3"), verbose=False)

    def no_walk(*args, **kwargs):
        raise AssertionError("a task with a manifest walked DATA")

    monkeypatch.setattr(catalog_module, "_walk_files", no_walk)
    monkeypatch.setattr(catalog_module, "discover", no_walk)
    monkeypatch.setattr(os, "walk", no_walk)
    real_stat, statted = os.stat, []

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(data)):
            statted.append(Path(path).relative_to(data).as_posix())
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    mine = extract(cfg.replace(out=str(tmp_path / "with.h5"), shard="1/3", manifest=str(manifest)), verbose=False)
    monkeypatch.undo()
    own = set(listed.shard(1, 3).paths)
    assert set(statted) - {"."} == own  # DATA itself and its own files, each checked against the listing: no other
    assert (mine.status, mine.images, mine.processed) == (today.status, today.images, today.processed)
    assert_same(contents(mine.path), contents(today.path))


def test_a_task_reads_only_its_part_of_the_manifest(tmp_path, monkeypatch):
    """100,000 listed files (stamps only: no file is opened here): shard 7 of 50 reads the header, a few index lines
    and its 2,000 entries, about 1/50 of the file."""
    n = 100_000
    paths = [f"c{i % 10}/img_{i:06d}.jpg" for i in range(n)]
    order = np.argsort(paths)
    paths = [paths[i] for i in order]
    listed = Catalog(tmp_path, paths, [int(p[1]) for p in paths], [""] * n, [f"c{k}" for k in range(10)], "classes",
                     [("odd.jpg", "a named pipe")], file_stamps=[(1000 + i, 10**18 + i) for i in range(n)])
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, listed, source(tmp_path))
    monkeypatch.setattr(catalog_module, "_check_listed", lambda *args: None)
    real_open, read = open, []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            data = self.f.read(size)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    part, _ = read_manifest(manifest, (7, 50), source(tmp_path))
    monkeypatch.undo()
    assert part.paths == listed.shard(7, 50).paths and part.stamps == listed.shard(7, 50).stamps
    assert part.ignored == [] and part.offset == 14_000
    size = manifest.stat().st_size
    assert sum(read) < 1.5 * size / 50, (sum(read), size)


def test_a_manifest_that_data_no_longer_matches_stops_only_the_tasks_whose_files_changed(tmp_path):
    data = split_folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, discover(data), source(data))
    full = discover(data).with_views(0)
    touched = full.shard(2, 3).paths[1]
    st = os.stat(data / touched)
    os.utime(data / touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UsageError) as err:
        read_manifest(manifest, (2, 3), source(data))
    assert str(err.value).startswith(f"DATA changed since the manifest '{manifest}' was written: '{touched}' has "
                                     "another size or modification time. Every task of one job extracts the same "
                                     "listing, so this one stops; submit the job again")
    gone = full.shard(2, 3).paths[0]
    (data / gone).unlink()
    with pytest.raises(UsageError, match=rf"'{gone}' is gone \(and 1 more of this shard's files\)"):
        read_manifest(manifest, (2, 3), source(data))
    same_rows(read_manifest(manifest, (0, 3), source(data))[0], full.shard(0, 3))  # its files did not change


def test_a_manifest_of_other_flags_or_none_at_all_is_one_line(tmp_path):
    data = split_folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, discover(data), source(data))
    with pytest.raises(UsageError, match=r"lists DATA for --augment 0, not 2: it was written for another extraction"):
        read_manifest(manifest, None, source(data, augment=2))
    with pytest.raises(UsageError, match=r"lists DATA for --data '.*data', not 'elsewhere'"):
        read_manifest(manifest, None, dict(source(data), data="elsewhere"))
    with pytest.raises(UsageError, match=r"manifest '.*missing.jsonl' cannot be read \(No such file or directory\)"):
        read_manifest(tmp_path / "missing.jsonl", None, source(data))
    (tmp_path / "x.jsonl").write_text('{"format": "something else"}\n')
    with pytest.raises(UsageError, match=r"is not a manifest of this version"):
        read_manifest(tmp_path / "x.jsonl", None, source(data))


def test_an_extraction_without_shard_reads_the_whole_manifest_and_records_no_manifest(tmp_path, tiny_backbone):
    data = split_folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, discover(data), source(data))
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(data), batch_size=4, workers=1)
    listed = extract(cfg.replace(out=str(tmp_path / "a.h5")), verbose=False)
    read = extract(cfg.replace(out=str(tmp_path / "b.h5"), manifest=str(manifest)), verbose=False)
    assert_same(contents(read.path), contents(listed.path))  # config_json included: the manifest is not recorded
    assert json.loads(read_attrs(read.path).config_json)["manifest"] is None
