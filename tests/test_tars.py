"""WebDataset tar shards as DATA (features/tars.py): the same images packed as shards give the features, labels and
splits of the folder layout; updates, resumes, shards + merge and predict hold as for folders; odd members are listed
and broken shards refused in one line. Small generated images go through the small random-weight backbone."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from features import tars
from features.augment import file_loader
from features.catalog import discover
from features.errors import UsageError
from features.images import read_file
from features.store import open_cache
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.merge import merge
from tests.conftest import write_images
from tests.test_update import assert_same, contents

SPLITS = {"train": 6, "val": 3}  # images per class and split
PER_SHARD = 6


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


def pack(folder: Path, out: Path, label_ext: str = "cls") -> list[str]:
    """The images of a split/class folder as shards `<split>-NNNNNN.tar` of PER_SHARD samples, in the folder's row
    order (sample keys count up across shards), each labelled by a `label_ext` member; returns the folder's rows."""
    rows = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for split in SPLITS:
        mine = [(i, r) for i, r in enumerate(rows) if r.startswith(f"{split}/")]
        for s in range(0, len(mine), PER_SHARD):
            members = []
            for i, rel in mine[s : s + PER_SHARD]:
                label = rel.split("/")[1]
                text = json.dumps({"label": label, "url": "x"}) if label_ext == "json" else label
                members += [(f"{i:06d}{Path(rel).suffix}", (folder / rel).read_bytes()),
                            (f"{i:06d}.{label_ext}", text.encode())]
            write_tar(out / f"{split}-{s // PER_SHARD:06d}.tar", members)
    return rows


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_backbone):
    """A split/class folder, the same images as tar shards, the extraction settings, and the folder's cache."""
    root = tmp_path_factory.mktemp("tars")
    for split, n in SPLITS.items():
        for k, name in enumerate(["cats", "dogs"]):
            write_images(root / "images" / split / name, n, seed=10 * k + len(split))
    rows = pack(root / "images", root / "shards")
    cfg = ExtractConfig(backbone=str(tiny_backbone), batch_size=4, workers=3)
    folder = extract(cfg.replace(data=str(root / "images"), out=str(root / "folder.h5")), verbose=False,
                     engines=root / "engines")
    assert folder.status == "written" and folder.images == len(rows)
    return root, cfg, rows, folder.path


def run(case, data: str | Path, out: str, **changes):
    root, cfg, _, _ = case
    return extract(cfg.replace(data=str(data), out=str(root / out) if "/" not in out else out, **changes),
                   verbose=False, engines=root / "engines")


def read(path: Path) -> dict:
    cache = open_cache(path)
    return {"paths": cache.paths.tolist(), "labels": cache.labels, "split": cache.split, "names": cache.label_names,
            "features": cache.read("avg_pool"), "layout": cache.attrs.layout}


def test_shards_give_the_features_labels_and_splits_of_the_same_images_in_folders(case):
    root, _, rows, folder = case
    result = run(case, root / "shards", "tars.h5")
    assert (result.status, result.images, result.processed) == ("written", len(rows), len(rows))
    a, b = read(folder), read(result.path)
    assert b["layout"] == "tars" and b["paths"][:2] == ["train-000000.tar/000000.png", "train-000000.tar/000001.jpg"]
    assert [p.rsplit("/", 1)[-1].split(".")[0] for p in b["paths"]] == [f"{i:06d}" for i in range(len(rows))]
    assert b["names"] == a["names"] == ["cats", "dogs"]
    np.testing.assert_array_equal(b["labels"], a["labels"])
    np.testing.assert_array_equal(b["split"], a["split"])
    assert set(b["split"].astype(str)) == {"train", "val"}
    np.testing.assert_array_equal(b["features"], a["features"])  # equal images, equal places: equal features


def test_each_image_is_read_at_its_offset_with_the_bytes_of_its_file(case):
    """What every loader gets (extract, predict): the very bytes of the image, from any thread and any block of the
    catalog, and the pixels the folder's loader makes."""
    root, _, rows, _ = case
    catalog = discover(root / "shards")
    assert len(catalog) == len(rows) and catalog.layout == "tars"
    for part in (catalog, catalog.shard(1, 3), catalog.with_views(1).subset([0, 5]), catalog.with_views(2)):
        for i in range(len(part)):
            row = rows[int(part.paths[i].rsplit("/", 1)[-1].split(".")[0])]
            assert bytes(read_file(part.source(i))) == (root / "images" / row).read_bytes()
    load = file_loader(32, "crop", 0.875, "standard", 0, 0)
    np.testing.assert_array_equal(load("x", catalog.source(3)), load("x", root / "images" / rows[3]))
    shard = catalog.members[catalog.paths[0]].shard
    assert catalog.stamps[0] == (os.stat(root / "shards" / "train-000000.tar").st_size,
                                 os.stat(root / "shards" / "train-000000.tar").st_mtime_ns) == shard.stamp
    # a reader that has only the path (fine-tuning reads root / path) reads through the shard too
    assert bytes(read_file(catalog.root / catalog.paths[7])) == (root / "images" / rows[7]).read_bytes()


def test_a_shard_is_opened_once_to_index_it_and_once_to_read_it(case, tmp_path, monkeypatch):
    """Discovery: one open and one pass per shard, no stat per image; decoding: one descriptor per shard, shared by
    the threads, whatever the number of images."""
    from concurrent.futures import ThreadPoolExecutor

    root, _, rows, _ = case
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(Path(path).name), real_open(path, *a, **k))[1])
    catalog = discover(root / "shards")
    assert sorted(opened) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    opened.clear()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: bytes(read_file(catalog.source(i))), range(len(catalog))))
    assert got == [(root / "images" / r).read_bytes() for r in rows]
    assert sorted(opened) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    monkeypatch.undo()

    shutil.copytree(root / "shards", tmp_path / "shards")
    catalog = discover(tmp_path / "shards")
    shard = tmp_path / "shards" / "val-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))  # changed after it was indexed
    with pytest.raises(ValueError, match="its tar shard 'val-000000.tar' changed since DATA was indexed"):
        read_file(catalog.source(len(catalog) - 1))


def catalog_facts(catalog) -> tuple:
    members = [(m.shard.path, m.shard.name, m.shard.stamp, m.offset, m.size) for m in catalog.members.values()]
    return (catalog.paths, catalog.labels, catalog.splits, catalog.label_names, catalog.ignored, catalog.stamps,
            catalog.fingerprint(), members)


def test_a_kept_index_spares_the_next_run_indexing_an_unchanged_shard(case, tmp_path, monkeypatch):
    """The first discovery indexes every shard and keeps each index; the next one only stats the shards, reads the
    kept indexes and gives the same catalog, images included; a changed shard is indexed again."""
    root, _, rows, _ = case
    shutil.copytree(root / "shards", tmp_path / "shards")
    kept = tmp_path / "cache" / tars.KEPT_FOLDER
    first = discover(tmp_path / "shards", tar_index=kept)
    assert len(list(kept.glob("*.json"))) == 3 and not list(kept.glob(".*"))
    scanned, real_scan = [], tars.scan
    monkeypatch.setattr(tars, "scan", lambda root, rel, *a: scanned.append(rel) or real_scan(root, rel, *a))
    again = discover(tmp_path / "shards", tar_index=kept)
    assert scanned == [] and catalog_facts(again) == catalog_facts(first)
    assert [bytes(read_file(again.source(i))) for i in range(len(again))] == \
        [(root / "images" / r).read_bytes() for r in rows]
    shard = tmp_path / "shards" / "val-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    touched = discover(tmp_path / "shards", tar_index=kept)
    assert scanned == ["val-000000.tar"] and catalog_facts(touched)[:5] == catalog_facts(first)[:5]
    assert catalog_facts(touched)[5] != catalog_facts(first)[5]  # the new stamp
    assert discover(tmp_path / "shards", tar_index=kept).paths == first.paths and scanned == ["val-000000.tar"]
    scanned.clear()
    labels_from_csv = tars.scan_kept(tmp_path / "shards", "val-000000.tar", False, kept)
    assert scanned == ["val-000000.tar"] and {s.label for s in labels_from_csv.samples} == {None}  # kept apart



def test_a_kept_index_that_fails_to_be_written_leaves_no_file(case, tmp_path, monkeypatch):
    """A full disk while an index is kept: the catalog is the same, and neither the index nor its temporary file is
    left in the folder (the next run scans the shard again)."""
    import errno

    import features.files

    root, _, _, _ = case
    shutil.copytree(root / "shards", tmp_path / "shards")
    kept = tmp_path / tars.KEPT_FOLDER

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.files.os, "replace", full)
    assert catalog_facts(discover(tmp_path / "shards", tar_index=kept)) == catalog_facts(discover(tmp_path / "shards"))
    assert list(kept.iterdir()) == []

@pytest.mark.parametrize("change", ["offset past the end", "a path outside the shard", "a size as text",
                                    "another identity", "a column short", "not json", "an ignored entry of 3",
                                    "a list, not an object", "a negative offset", "a key as a number",
                                    "a label as a number", "an origin as null", "an offset as true"])
def test_a_kept_index_that_does_not_describe_the_shard_exactly_is_not_believed(case, tmp_path, monkeypatch, change):
    root, _, _, _ = case
    shutil.copytree(root / "shards", tmp_path / "shards")
    kept = tmp_path / tars.KEPT_FOLDER
    first = discover(tmp_path / "shards", tar_index=kept)
    size = (tmp_path / "shards" / "val-000000.tar").stat().st_size
    for file in kept.glob("*.json"):
        record = json.loads(file.read_text())
        if record["rel"] != "val-000000.tar":
            continue
        if change == "offset past the end":
            record["offsets"][0] = size - record["sizes"][0] + 1
        elif change == "a path outside the shard":
            record["paths"][0] = "train-000000.tar/000000.jpg"
        elif change == "a size as text":
            record["sizes"][0] = str(record["sizes"][0])
        elif change == "another identity":
            record["identity"][1] += 1
        elif change == "a column short":
            record["labels"].pop()
        elif change == "an ignored entry of 3":
            record["ignored"] = [["a", "b", "c"]]
        elif change == "a negative offset":
            record["offsets"][-1] = -1
        elif change == "a key as a number":
            record["keys"][-1] = 7
        elif change == "a label as a number":
            record["labels"][-1] = 1
        elif change == "an origin as null":
            record["label_from"][-1] = None
        elif change == "an offset as true":
            record["offsets"][-1] = True
        if change == "a list, not an object":
            record = [record]
        file.write_text("{" if change == "not json" else json.dumps(record))
    scanned, real_scan = [], tars.scan
    monkeypatch.setattr(tars, "scan", lambda root, rel, *a: scanned.append(rel) or real_scan(root, rel, *a))
    assert catalog_facts(discover(tmp_path / "shards", tar_index=kept)) == catalog_facts(first)
    assert scanned == ["val-000000.tar"]
    unwritable = tmp_path / "shards" / "val-000000.tar" / "index"  # under a file: no index is kept, same catalog
    assert catalog_facts(discover(tmp_path / "shards", tar_index=unwritable)) == catalog_facts(first)


def test_brace_patterns_and_globs_name_the_same_shards(case, tmp_path):
    root, _, rows, _ = case
    whole = discover(root / "shards")
    for pattern in [f"{root}/shards/*.tar", f"{root}/shards/{{train,val}}-00000[0-9].tar",
                    f"{root}/shards/{{train-{{000000..000001}},val-000000}}.tar"]:
        found = discover(pattern)
        assert (found.paths, found.labels, found.splits, found.root) == (whole.paths, whole.labels, whole.splits,
                                                                          root / "shards"), pattern
    only = discover(f"{root}/shards/train-{{000000..000002}}.tar")
    assert len(only) == 12 and set(only.splits) == {"train"}
    assert only.ignored == [("train-000002.tar", "named by the pattern, but does not exist; skipped")]
    single = discover(root / "shards" / "val-000000.tar")
    assert len(single) == 6 and single.paths[0] == "val-000000.tar/000012.png"
    with pytest.raises(UsageError, match=r"pattern '.*/shards/test-\*\.tar' matches no file"):
        discover(f"{root}/shards/test-*.tar")
    assert tars.expand_braces("a-{00..10}.tar")[:2] == ["a-00.tar", "a-01.tar"]
    assert tars.expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]


def test_splits_come_from_shard_names_or_split_folders(tmp_path):
    jpeg = write_images(tmp_path / "img", 1, seed=1)[0].read_bytes()
    for rel in ["train/000.tar", "val/000.tar", "validation-001.tar"]:
        write_tar(tmp_path / "d" / rel, [("a.jpg", jpeg)])
    assert discover(tmp_path / "d").splits == ["train", "val", "val"]
    write_tar(tmp_path / "d" / "misc" / "x.tar", [("a.jpg", jpeg)])  # a folder not named for a split: no folder splits
    assert discover(tmp_path / "d").splits == ["", "", "", "val"]


def test_labels_from_json_txt_class_lists_and_a_csv(tmp_path):
    jpeg = write_images(tmp_path / "img", 1, seed=1)[0].read_bytes()
    d = tmp_path / "d"
    write_tar(d / "a.tar", [("k1.jpg", jpeg), ("k1.json", b'{"label": "bee"}'),
                            ("k2.jpg", jpeg), ("k2.txt", b"ant\n"),
                            ("k3.jpg", jpeg), ("k3.txt", b"a caption"), ("k3.json", b'{"url": "x"}'),  # img2dataset
                            ("k4.jpg", jpeg)])
    found = discover(d)
    assert [found.label_names[i] if i >= 0 else None for i in found.labels] == ["bee", "ant", None, None]
    assert any(".txt members" in n for n in found.notes)

    write_tar(d / "a.tar", [(f"k{i}.jpg", jpeg) for i in range(4)] + [("k0.cls", b"10"), ("k1.cls", b"2"),
                                                                        ("k2.cls", b"-1"), ("k3.cls", b"02")])
    found = discover(d)  # indices without a class list: named by number, ordered by number; -1 is unlabelled
    assert found.label_names == ["2", "10"] and found.labels == [1, 0, -1, 0]

    (d / "classes.txt").write_text("\n".join(f"class{k}" for k in range(11)) + "\n")
    found = discover(d)
    assert found.label_names == ["class2", "class10"] and found.labels == [1, 0, -1, 0] and not found.ignored
    (d / "classes.txt").write_text("ants\nbees\n")
    with pytest.raises(UsageError, match=r"class index 10 in 'a.tar/k0.cls' is out of range: expected 0..1 \(the 2 "
                                         r"lines of classes.txt\)"):
        discover(d)
    (d / "classes.txt").unlink()
    write_tar(d / "a.tar", [("k0.jpg", jpeg), ("k0.cls", b"-3")])
    with pytest.raises(UsageError, match=r"class index -3 in 'a.tar/k0.cls' is out of range"):
        discover(d)

    write_tar(d / "a.tar", [("k0.jpg", jpeg), ("k0.cls", b"-3"), ("x/k1.jpg", jpeg), ("k2.jpg", jpeg)])
    (tmp_path / "labels.csv").write_text("key,label\nk0,wasp\nx/k1,bee\na.tar/k2.jpg,ant\n")
    found = discover(d, str(tmp_path / "labels.csv"))  # the CSV's labels win; label members are not read
    assert found.paths == ["a.tar/k0.jpg", "a.tar/k2.jpg", "a.tar/x/k1.jpg"]
    assert [found.label_names[i] for i in found.labels] == ["wasp", "ant", "bee"] and found.layout == "tars"


def headers_of(path: Path, reader) -> tuple[list[tuple], int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        infos, end = reader(fd)
    finally:
        os.close(fd)
    return [(i.name, i.type, i.size, i.offset_data, i.linkname, i.isreg(), i.isdir()) for i in infos], end


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_fast_header_reader_lists_what_tarfile_lists(tmp_path, fmt):
    """Every kind of member `scan` looks at, in the three formats writers use (webdataset and img2dataset write pax,
    with a float mtime: an extended header before every member): `_headers` equals `tarfile`, offsets included."""
    path = tmp_path / "a.tar"
    long_dir = "d" * 60 + "/" + "e" * 50  # over 100 characters: ustar prefix, GNU long name or pax path
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data, kind, mtime in [("000.jpg", b"x" * 700, tarfile.REGTYPE, 1_700_000_000.25),
                                        ("./000.cls", b"cats", tarfile.REGTYPE, 0), ("dir", b"", tarfile.DIRTYPE, 0),
                                        (f"{long_dir}/", b"", tarfile.DIRTYPE, 0),
                                        (f"{long_dir}/001.jpg", b"y" * 512, tarfile.REGTYPE, 5),
                                        ("empty.txt", b"", tarfile.REGTYPE, 0),
                                        ("link.jpg", b"", tarfile.SYMTYPE, 0), ("hard.jpg", b"", tarfile.LNKTYPE, 0),
                                        ("far.jpg", b"", tarfile.SYMTYPE, 0),  # a link over 100 characters long
                                        ("old/", b"", tarfile.AREGTYPE, 0)]:  # a folder as V7 tar wrote it
            if fmt == tarfile.USTAR_FORMAT and isinstance(mtime, float):
                mtime = int(mtime)
            info = tarfile.TarInfo(name)
            info.size, info.type, info.mtime = len(data), kind, mtime
            info.linkname = "000.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            if name == "far.jpg":
                if fmt == tarfile.USTAR_FORMAT:  # ustar has no room for it
                    continue
                info.linkname = f"{long_dir}/001.jpg"
            if fmt == tarfile.PAX_FORMAT and name == "000.jpg":  # a record a reader skips
                info.pax_headers = {"comment": "a=b c"}
            archive.addfile(info, io.BytesIO(data))
    fast, tarred = headers_of(path, tars._headers), headers_of(path, lambda fd: tars._tarfile_headers(fd, "a.tar"))
    assert fast == tarred and [m[0] for m in fast[0][3:5]] == [long_dir, f"{long_dir}/001.jpg"]
    assert len(fast[0]) == (9 if fmt == tarfile.USTAR_FORMAT else 10) and fast[0][-1][0] == "old" and fast[0][-1][6]
    with open(path, "ab") as f:  # a damaged header after the members: both stop before it, `scan` refuses it
        f.write(b"\x01" * 512)
    assert headers_of(path, tars._headers)[1] == headers_of(path, lambda fd: tars._tarfile_headers(fd, "a"))[1]


def test_whenever_the_fast_reader_answers_tarfile_answers_the_same(tmp_path):
    """300 random archives (three formats, names of 1-150 characters in folders, files, folders, links, pax records),
    each read as written or with one random byte changed or cut short: where `_headers` gives members instead of
    `_Unusual`, `tarfile` reads the archive and gives the same members and end."""
    rng = np.random.default_rng(7)
    alphabet = np.array(list("abcxyz0129_-."))
    kinds = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]
    answered = 0
    for i in range(300):
        fmt = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT][i % 3]
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as archive:
            for _ in range(rng.integers(1, 6)):
                parts = ["".join(rng.choice(alphabet, rng.integers(1, 60))) for _ in range(rng.integers(1, 4))]
                info = tarfile.TarInfo("/".join(parts)[:150].strip("/") or "x")
                info.type = kinds[rng.integers(len(kinds))]
                data = rng.bytes(int(rng.integers(0, 1500))) if info.type == tarfile.REGTYPE else None
                info.linkname = "x" if info.issym() or info.islnk() else ""
                # a link or folder may declare a size; no data follows it, and readers skip none
                info.size = len(data) if data is not None else int(rng.integers(0, 1500))
                info.mtime = float(rng.integers(0, 2**31)) + (0.5 if fmt == tarfile.PAX_FORMAT else 0)
                try:
                    archive.addfile(info, io.BytesIO(data) if data is not None else None)
                except ValueError:  # a name ustar cannot hold
                    continue
        data = bytearray(raw.getvalue())
        if i % 4 == 1:
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif i % 4 == 2:
            data = data[: rng.integers(1, len(data))]
        path = tmp_path / f"{i}.tar"
        path.write_bytes(bytes(data))
        try:
            fast = headers_of(path, tars._headers)
        except tars._Unusual:
            continue
        answered += 1
        assert fast == headers_of(path, lambda fd: tars._tarfile_headers(fd, path.name)), i
    assert answered > 150


def test_headers_the_fast_reader_cannot_match_exactly_are_left_to_tarfile(tmp_path):
    """Non-ASCII names (in a pax record or, GNU, in the header), a global pax header, a pax size (members over
    8 GiB) or sparse record, an unknown member type, a number that does not parse, a bad checksum, a long name
    twice: `_Unusual`, and `scan` gets from tarfile what it always got."""
    jpeg = write_images(tmp_path / "img", 1, seed=1)[0].read_bytes()
    cases = {  # name: (format, the archive's pax headers, the image's name, its pax headers, its type)
        "utf8": (tarfile.PAX_FORMAT, {}, "café.jpg", {}, tarfile.REGTYPE),
        "gnu_utf8": (tarfile.GNU_FORMAT, {}, "café.jpg", {}, tarfile.REGTYPE),
        "global": (tarfile.PAX_FORMAT, {"comment": "all"}, "000.jpg", {}, tarfile.REGTYPE),
        "size": (tarfile.PAX_FORMAT, {}, "000.jpg", {"size": str(len(jpeg))}, tarfile.REGTYPE),
        "sparse": (tarfile.PAX_FORMAT, {}, "000.jpg", {"GNU.sparse.name": "001.jpg"}, tarfile.REGTYPE),
        "unknown": (tarfile.GNU_FORMAT, {}, "000.jpg", {}, b"Z")}
    inner = write_tar(tmp_path / "inner" / "in.tar", [("inner.jpg", jpeg)]).read_bytes()  # what a Z member holds
    for name, (fmt, everywhere, image, own, kind) in cases.items():
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt, pax_headers=everywhere) as archive:
            for member, data in [(image, inner if name == "unknown" else jpeg), ("000.cls", b"cats")]:
                info = tarfile.TarInfo(member)
                info.size, info.pax_headers = len(data), own if member == image else {}
                info.type = kind if member == image else tarfile.REGTYPE
                archive.addfile(info, io.BytesIO(data))
        with pytest.raises(tars._Unusual):
            headers_of(path, tars._headers)
        index = tars.scan(tmp_path, path.name)
        expected = {"sparse": "001.jpg", "unknown": None}.get(name, image)
        assert [s.path for s in index.samples] == ([f"{name}.tar/{expected}"] if expected else []), name
    raw = bytearray(write_tar(tmp_path / "x.tar", [("000.jpg", jpeg)]).read_bytes())
    raw[136:148] = b"zz" + raw[138:148]  # an mtime that is no number, with its checksum made right
    raw[148:156] = b"%06o\0 " % (256 + sum(raw[:148]) + sum(raw[156:512]))
    (tmp_path / "mtime.tar").write_bytes(bytes(raw))
    with pytest.raises(tars._Unusual):
        headers_of(tmp_path / "mtime.tar", tars._headers)
    with pytest.raises(UsageError, match="'mtime.tar' cannot be read: invalid header"):
        tars.scan(tmp_path, "mtime.tar")
    path = write_tar(tmp_path / "sum.tar", [("000.jpg", jpeg), ("000.cls", b"cats")])
    with open(path, "r+b") as f:  # the checksum field of the first header, off by one
        f.seek(148)
        field = f.read(8)
        f.seek(148)
        f.write(field.replace(b"0", b"1", 1) if b"0" in field[:6] else field)
    with pytest.raises(tars._Unusual):
        headers_of(path, tars._headers)
    with pytest.raises(UsageError, match="tar shard 'sum.tar' cannot be read"):
        tars.scan(tmp_path, "sum.tar")
    long_name = "n" * 120 + ".jpg"  # two GNU long names in a row: tarfile keeps the first, so must `scan`
    raw = write_tar(tmp_path / "one.tar", [(long_name, jpeg)]).read_bytes()  # L header, its name, the member
    first = raw[:1024].replace(b"n" * 120, b"m" * 120)
    (tmp_path / "twice.tar").write_bytes(first + raw)
    with pytest.raises(tars._Unusual):
        headers_of(tmp_path / "twice.tar", tars._headers)
    assert tars.scan(tmp_path, "twice.tar").samples[0].path == "twice.tar/" + "m" * 120 + ".jpg"


def test_odd_members_are_skipped_and_listed_with_the_reason(case, tmp_path):
    root, _, _, _ = case
    jpeg = write_images(tmp_path / "img", 2, seed=1)[1].read_bytes()
    png = write_images(tmp_path / "img", 1, seed=2)[0].read_bytes()
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
    d = tmp_path / "d"
    write_tar(d / "train-000.tar", [("000.jpg", jpeg), ("000.cls", b"cats"), ("001.cls", b"dogs"),
                                    ("002.jpg", jpeg), ("002.png", png), ("003.jpg", b"\xff\xd8 not a jpeg"),
                                    ("003.cls", b"dogs"), ("../up.jpg", jpeg), ("._000.jpg", b"macOS"),
                                    ("004.jpg", jpeg[: len(jpeg) // 3]), ("004.cls", b"cats"), ("notes", b"x")])
    with tarfile.open(d / "train-000.tar", "a") as archive:
        archive.addfile(link)
    (d / "train-000.parquet").write_bytes(b"img2dataset's sidecar")
    (d / "readme.md").write_text("about")
    (d / "old.tar.gz").write_bytes(b"")
    found = discover(d)
    assert found.paths == ["train-000.tar/000.jpg", "train-000.tar/003.jpg", "train-000.tar/004.jpg"]
    reasons = dict(found.ignored)
    assert reasons["train-000.tar/001"].startswith("a sample with no image (001.cls)")
    assert reasons["train-000.tar/002"].startswith("a sample with 2 images (002.jpg, 002.png)")
    assert "leaves the archive" in reasons["train-000.tar/../up.jpg"]
    assert reasons["train-000.tar/link.jpg"].startswith("a link inside the tar")
    assert "no image (notes)" in reasons["train-000.tar/notes"]
    assert "decompress" in reasons["old.tar.gz"].lower()  # looks like a shard, cannot be read: listed
    assert "readme.md" not in reasons and "train-000.parquet" not in reasons and len(reasons) == 6  # no shards: ignored

    result = run(case, d, str(tmp_path / "odd.h5"))
    skipped = dict(result.skipped)
    assert result.images == 1 and "not a decodable image" in skipped["train-000.tar/003.jpg"]
    assert "train-000.tar/004.jpg" in skipped and skipped["train-000.tar/002"] == reasons["train-000.tar/002"]


def test_the_summary_counts_the_commonest_reasons_for_skipping_and_how_many_others(case, tmp_path, capsys):
    """A reason may name its members, so a shard of many label-only samples has as many reasons as samples: the
    summary's line stays one line (it held 29,000 reasons, 3.6 MB, for a bench's shards of hard links)."""
    from pipeline.summary import SHOWN_REASONS, print_extract_summary

    jpeg = write_images(tmp_path / "img", 1, seed=1)[0].read_bytes()
    orphans = SHOWN_REASONS + 3
    d = write_tar(tmp_path / "d" / "train-000.tar", [("000.jpg", jpeg), ("000.cls", b"cats"),
                                                    *[(f"{i:03d}.cls", b"dogs") for i in range(1, orphans + 1)]])
    print_extract_summary(run(case, d.parent, str(tmp_path / "few.h5")))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("skipped: "))
    assert line.count(" x a sample with no image") == SHOWN_REASONS and line.endswith("; 3 other reasons")


def test_a_tar_among_images_is_listed_not_read(case, tmp_path):
    root, _, _, _ = case
    shutil.copytree(root / "images" / "val", tmp_path / "d")
    shutil.copy(root / "shards" / "val-000000.tar", tmp_path / "d" / "cats")
    found = discover(tmp_path / "d")
    assert found.layout == "classes" and len(found) == 6
    assert "a tar shard among image files" in dict(found.ignored)["cats/val-000000.tar"]


def test_broken_shards_are_refused_in_one_line_naming_them(case, tmp_path):
    root, _, _, _ = case
    good = (root / "shards" / "val-000000.tar").read_bytes()
    with tarfile.open(root / "shards" / "val-000000.tar") as archive:
        second = archive.getmembers()[1].offset  # where the second member's header starts
    cases = {"cut.tar": good[:second + 300],  # ends inside the second header
             "cutdata.tar": good[:second - 100],  # ends inside the first member's data
             "bad.tar": good[:second] + bytes([good[second] ^ 0xFF]) + good[second + 1:],  # second header damaged
             "text.tar": b"not a tar at all" * 40, "empty.tar": b""}
    for name, raw in cases.items():
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_bytes(raw)
        with pytest.raises(UsageError, match=rf"tar shard '{name}' cannot be read: .*Expected a complete, "
                                             r"uncompressed tar archive") as err:
            discover(d)
        assert "\n" not in str(err.value)


def test_an_update_computes_only_added_or_changed_shards_and_equals_a_fresh_run(case, tmp_path):
    root, _, _, _ = case
    data = tmp_path / "shards"
    data.mkdir()
    for name in ("train-000000.tar", "val-000000.tar"):
        shutil.copy2(root / "shards" / name, data / name)
    pattern = f"{data}/{{train,val}}-*.tar"
    first = run(case, pattern, str(tmp_path / "x.h5"))
    assert (first.status, first.images) == ("written", 12)
    shutil.copy2(root / "shards" / "train-000001.tar", data)  # added: its 6 samples are computed, no other
    update = run(case, pattern, str(tmp_path / "x.h5"))
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 18, 6, 12)
    fresh = run(case, pattern, str(tmp_path / "fresh.h5"))
    assert_same(contents(tmp_path / "x.h5"), contents(tmp_path / "fresh.h5"))
    np.testing.assert_array_equal(read(tmp_path / "x.h5")["features"], read(case[3])["features"])
    assert fresh.processed == 18 and run(case, pattern, str(tmp_path / "x.h5")).status == "up-to-date"

    shard = data / "val-000000.tar"  # touched: same bytes, new modification time; and one removed
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    (data / "train-000000.tar").unlink()
    update = run(case, pattern, str(tmp_path / "x.h5"))
    assert (update.status, update.images, update.processed, update.reused) == ("updated", 12, 6, 6)
    assert_same(contents(tmp_path / "x.h5"), contents(run(case, pattern, str(tmp_path / "fresh2.h5")).path))


def test_an_interrupted_extraction_of_shards_resumes_to_the_contents_of_one_run(case, tmp_path, monkeypatch):
    root, _, rows, _ = case
    reads, real = [], tars.Shard.read

    def stop_midway(shard, offset, size):
        reads.append(offset)
        if len(reads) > 9:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the run
        return real(shard, offset, size)

    monkeypatch.setattr(tars.Shard, "read", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        run(case, root / "shards", str(tmp_path / "x.h5"), workers=1)
    monkeypatch.setattr(tars.Shard, "read", real)
    assert not (tmp_path / "x.h5").exists()
    resumed = run(case, root / "shards", str(tmp_path / "x.h5"), workers=1)
    assert resumed.status == "resumed" and 0 < resumed.processed < len(rows)
    fresh = run(case, root / "shards", str(tmp_path / "fresh.h5"), workers=1)
    assert_same(contents(tmp_path / "x.h5"), contents(fresh.path))


def test_sharded_extraction_of_shards_merges_to_one_run_bit_for_bit(case, tmp_path):
    root, _, _, _ = case
    single = run(case, root / "shards", str(tmp_path / "single.h5"))
    for i in range(3):
        assert run(case, root / "shards", str(tmp_path / "x.h5"), shard=f"{i}/3").status == "written"
    merged = merge(tmp_path / "x.h5", tmp_path / "merged.h5")
    a, b = contents(single.path), contents(merged.path)
    a.pop("@config_json"), b.pop("@config_json")  # the one records no shard, the other shard 2/3
    assert_same(a, b)


def test_predict_on_shards_equals_predict_on_the_folder(case, tmp_path):
    from pipeline.classification import ClassifyConfig, classify
    from pipeline.prediction import PredictConfig, predict
    import pandas as pd

    root, _, _, folder = case
    run_dir = classify(ClassifyConfig(features=str(folder), heads="logreg", out=str(tmp_path / "run")))
    on_folder = pd.read_csv(predict(PredictConfig(model=str(run_dir / "best"), data=str(root / "images" / "val"),
                                                  out=str(tmp_path / "folder.csv"))))
    shards = tmp_path / "val-shards"
    shards.mkdir()
    shutil.copy(root / "shards" / "val-000000.tar", shards)
    on_tars = pd.read_csv(predict(PredictConfig(model=str(run_dir / "best"), data=str(shards),
                                                out=str(tmp_path / "tars.csv"))))
    assert len(on_tars) == 6 and on_tars["path"][0] == str(shards.resolve() / "val-000000.tar" / "000012.png")
    assert list(on_tars["predicted"]) == list(on_folder["predicted"])
    np.testing.assert_array_equal(on_tars.filter(like="p_").to_numpy(), on_folder.filter(like="p_").to_numpy())
