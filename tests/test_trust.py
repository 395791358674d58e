"""A cache from someone else is untrusted input: every reader validates it before use, reads nothing outside it, and
pins the version it planned with. Each test builds the hostile file a realistic user could hand us."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from classifiers.data import load_reduced, open_cache as open_for_stage_two
from classifiers.reduce import get_reduce
from classifiers.testing import separable, write_cache
from features import schema
from features.errors import UsageError
from features.schema import DamagedCache, ForeignFile, SchemaMismatch, StaleCache, StoreError, names
from features.store import concatenation, existing_cache, open_cache, verify
from tests.conftest import ROOT, fails_in_one_line


@pytest.fixture
def cache(tmp_path) -> Path:
    X, y = separable(10, 2, 6)
    return write_cache(tmp_path / "c.h5", {"x": X}, y, label_names=["ant", "bee"],
                       paths=[f"{'ab'[c]}/img{i}.jpg" for i, c in enumerate(y)])


def refused_everywhere(capsys, path: Path, kind: type[StoreError], match: str) -> None:
    """open_cache raises `kind`; verify and classify each end in one line (exit 2)."""
    with pytest.raises(kind, match=match):
        open_cache(path)
    assert re.search(match, fails_in_one_line(capsys, ["verify", str(path)]))
    fails_in_one_line(capsys, ["classify", "--features", str(path), "--heads", "logreg", "--out",
                               str(path.parent / "run")])


def test_the_schema_doc_is_generated_from_the_declaration():
    doc = (ROOT / "docs" / "hdf5-schema.md").read_text()
    assert schema.render_doc(doc) == doc, "run: python -m features.schema --write docs/hdf5-schema.md"
    assert all(f"| `{f.name}` |" in doc for f in schema.FIELDS)


def test_every_list_of_attributes_is_derived_from_the_roles():
    assert set(names(*schema.IDENTITY)) >= {"decoder", "interpolation", "precision", "engine", "source_fingerprint"}
    assert set(names(schema.UPDATABLE)) == {"source_fingerprint", "num_candidates"}
    assert set(names(schema.UPDATABLE)) <= set(names(*schema.IDENTITY))
    assert "generation" in names(schema.PER_SHARD) and "generation" not in names(*schema.IDENTITY)
    for f in schema.FIELDS:
        assert f.metadata["roles"] and f.metadata["doc"], f.name
        assert isinstance(f.metadata["example"], schema.TYPES[f.name].__origin__ if hasattr(
            schema.TYPES[f.name], "__origin__") else schema.TYPES[f.name]), f.name


def test_a_fabricated_cache_carries_every_attribute_a_real_one_does(cache):
    with h5py.File(cache) as f:
        assert set(f.attrs) == {f.name for f in schema.FIELDS}


@pytest.mark.parametrize("attr,value,message", [
    ("complete", "True", "root attribute 'complete' is 'True', expected bool"),
    ("image_size", "224", "root attribute 'image_size' is '224', expected int"),
    ("layers", 5, "root attribute 'layers' is 5, expected list"),
])
def test_mistyped_attributes_are_refused_in_one_line(capsys, cache, attr, value, message):
    with h5py.File(cache, "r+") as f:
        f.attrs[attr] = value
    refused_everywhere(capsys, cache, DamagedCache, message)


def test_a_missing_attribute_is_named(cache):
    with h5py.File(cache, "r+") as f:
        del f.attrs["decoder"]
    with pytest.raises(DamagedCache, match="lacks the root attribute 'decoder'"):
        open_cache(cache)


def test_labels_outside_the_label_names_are_refused(capsys, cache):
    with h5py.File(cache, "r+") as f:
        f["labels"][3] = 7
    refused_everywhere(capsys, cache, DamagedCache, r"labels 3 lie outside the 2 label names")


def test_a_per_row_dataset_shorter_than_the_rows_is_refused(capsys, cache):
    with h5py.File(cache, "r+") as f:
        f["paths"].resize(15, axis=0)
    refused_everywhere(capsys, cache, DamagedCache, r"paths has shape \(15,\), expected 20 rows")


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.jpg", "a/../../x.jpg"])
def test_paths_that_leave_the_data_root_are_refused(cache, bad):
    with h5py.File(cache, "r+") as f:
        f["paths"][0] = bad.encode()
    with pytest.raises(DamagedCache, match="absolute or leave the data root"):
        open_cache(cache)


def test_a_small_file_declaring_a_billion_rows_is_refused_before_allocating(tmp_path, cache):
    """The rows are declared (chunked datasets, chunks never written): reading the labels alone would take 4 GB."""
    with h5py.File(cache, "r+") as f:
        for name in ["features/x", *schema.PER_ROW]:
            old = f[name]
            shape, dtype, chunks = (10**9, *old.shape[1:]), old.dtype, old.chunks
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fletcher32=True)
        f.attrs["num_images"] = 10**9
    assert cache.stat().st_size < 200_000
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: far below what the rows would take
        from features.store import open_cache, verify
        from features.schema import DamagedCache
        for read in (open_cache, verify):
            try:
                read({str(cache)!r})
            except DamagedCache as err:
                print("refused:", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused:") == 2 and re.search(r"declares \d{10,} bytes of data but stores \d+", done.stdout)


def test_external_raw_storage_is_never_read(capsys, cache, tmp_path):
    """`paths` whose bytes live in another file (HDF5 external storage) would put that file into predict's CSV."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password=hunter2".ljust(20 * 16, b" "))
    with h5py.File(cache, "r+") as f:
        del f["paths"]
        f.create_dataset("paths", shape=(20,), dtype=h5py.string_dtype("utf-8", 16),
                         external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    refused_everywhere(capsys, cache, ForeignFile, r"reads data from outside its own file \(paths keeps its data in")


def test_an_external_link_is_never_followed(capsys, cache, tmp_path):
    other = write_cache(tmp_path / "other" / "o.h5", {"x": np.ones((20, 6), np.float32)}, [0, 1] * 10)
    with h5py.File(cache, "r+") as f:
        del f["features"]
        f["features"] = h5py.ExternalLink(str(other), "/features")
    refused_everywhere(capsys, cache, ForeignFile, r"features is a ExternalLink")


def test_a_virtual_dataset_over_a_file_elsewhere_is_refused(capsys, cache, tmp_path):
    other = write_cache(tmp_path / "other" / "o.h5", {"x": np.ones((20, 6), np.float32)}, [0, 1] * 10)
    with h5py.File(cache, "r+") as f:
        del f["features/x"]
        layout = h5py.VirtualLayout(shape=(20, 6), dtype="float32")
        layout[:] = h5py.VirtualSource(str(other), "features/x", shape=(20, 6))
        f.create_virtual_dataset("features/x", layout)
    refused_everywhere(capsys, cache, ForeignFile, r"features/x is virtual over")


def test_a_shard_replaced_after_a_virtual_merge_is_refused(tmp_path):
    from features.store import CacheWriter, Progress, copy_rows

    X, y = separable(10, 2, 6)
    shards = [write_cache(tmp_path / f"s{i}.h5", {"x": X[i::2]}, y[i::2], paths=[f"s{i}/{j}.jpg" for j in range(10)])
              for i in range(2)]
    sources = [open_cache(s) for s in shards]
    writer = CacheWriter.create(tmp_path / "m.h5", sources[0].attrs, {}, [p for s in sources for p in s.paths], ["a", "b"])
    writer.link_features(*concatenation(sources), {"x": (6,)}, {"x": np.dtype("float32")})
    start = 0
    for source in sources:
        start = copy_rows(source, writer, start)
    writer.finalize(Progress(rows_written=start, files_done=start))
    assert np.array_equal(open_cache(tmp_path / "m.h5").read("x"), np.concatenate([X[0::2], X[1::2]]))
    write_cache(shards[1], {"x": X[1::2] * 2}, y[1::2], paths=[f"s1/{j}.jpg" for j in range(10)])  # re-extracted
    with pytest.raises(ForeignFile, match="reads the shard 's1.h5', which was replaced or damaged since the merge"):
        open_cache(tmp_path / "m.h5")
    shards[1].unlink()
    with pytest.raises(ForeignFile, match="reads the shard 's1.h5', which is missing beside it"):
        verify(tmp_path / "m.h5")


def test_a_reader_never_mixes_two_versions_of_a_cache(cache):
    """classify plans from the cache it opened; if an update publishes a new version meanwhile, the next read stops
    in one line instead of reading rows shifted against the labels it holds."""
    planned = open_for_stage_two(cache)
    assert planned.read("x").shape == (20, 6)
    X, y = separable(11, 2, 6, seed=3)  # the folder gained two images: rows move
    write_cache(cache, {"x": X}, y, label_names=["ant", "bee"])
    with pytest.raises(StaleCache, match="was replaced .* while this command was reading it; run the command again"):
        planned.read("x")
    with pytest.raises(StaleCache):  # streamed heads hold a RowStream that re-opens the file per pass
        loaded = load_reduced(planned, "x", get_reduce("none"), np.arange(20), np.arange(20), budget=1)
        next(loaded.X.blocks())
    assert open_for_stage_two(cache).read("x").shape == (22, 6)


def test_each_publish_gets_a_new_generation(cache):
    first = open_cache(cache).attrs.generation
    write_cache(cache, {"x": np.ones((4, 6), np.float32)}, [0, 1, 0, 1])
    assert len(first) == 32 and open_cache(cache).attrs.generation not in ("", first)


def test_an_older_schema_is_refused_with_the_fix_and_still_replaceable(capsys, cache):
    with h5py.File(cache, "r+") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(SchemaMismatch, match=r"has schema_version=1; this version reads schema 2\. Re-extract it"):
        open_cache(cache)
    with pytest.raises(SchemaMismatch):
        existing_cache(cache)
    write_cache(cache, {"x": np.ones((4, 6), np.float32)}, [0, 1, 0, 1])  # the writer replaces a cache of ours
    assert open_cache(cache).attrs.schema_version == schema.SCHEMA_VERSION


def test_every_refusal_is_a_usage_error_of_its_own_kind():
    for kind in (DamagedCache, ForeignFile, SchemaMismatch, StaleCache, schema.IncompleteCache, schema.ConfigMismatch):
        assert issubclass(kind, StoreError) and issubclass(kind, UsageError)


def test_thumbnails_read_only_the_files_that_were_extracted(tmp_path):
    """A cache names its data root; the report shows an image only when it is the very file extracted (regular,
    under the root, same size and modification time), so `data_root='/'` cannot show the machine's images."""
    data = tmp_path / "data" / "ant"
    data.mkdir(parents=True)
    image = data / "a.jpg"
    image.write_bytes(b"\xff\xd8 not really")
    stamp = image.stat()
    path = write_cache(tmp_path / "c.h5", {"x": np.ones((2, 3), np.float32)}, [0, 0], label_names=["ant"],
                       paths=["ant/a.jpg", "ant/b.jpg"], data_root=str(tmp_path / "data"))
    with h5py.File(path, "r+") as f:
        f["file_stamp"][0] = (stamp.st_size, stamp.st_mtime_ns)
    cache = open_cache(path)
    assert cache.image_file("ant/a.jpg") == image
    assert cache.image_file("ant/b.jpg") is None  # stamp unknown
    assert cache.image_file("etc/passwd") is None  # not a row
    image.write_bytes(b"\xff\xd8 changed since")
    assert cache.image_file("ant/a.jpg") is None
    rooted = dataclasses.replace(cache, attrs=dataclasses.replace(cache.attrs, data_root="/"))
    assert rooted.image_file("ant/a.jpg") is None


def test_an_extraction_records_and_applies_max_pixels(class_folder, tmp_path):
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    cfg = ExtractConfig(backbone="mobilenetv3small", weights="none", data=str(class_folder), image_size=32,
                        pool="avg", out=str(tmp_path / "x.h5"), max_pixels=48 * 64 - 1)
    with pytest.raises(UsageError, match="none of the .* could be used.*more than --max-pixels 3071"):
        extract(cfg, verbose=False)
    done = extract(cfg.replace(max_pixels=100 * 100), verbose=False)
    assert open_cache(done.path).attrs.max_pixels == 100 * 100 and done.images == 20


def test_a_virtual_merge_never_reads_zeros_for_shards_it_cannot_open(tmp_path, monkeypatch):
    """Under a low open-file limit HDF5 gives a virtual dataset's fill value for sources it cannot open: NaN, which
    every reader refuses, where zeros passed as features. And merge copies when the limit is too low for its shards."""
    from pipeline import merge as merging

    X, y = separable(10, 2, 6)
    for i in range(3):
        write_cache(tmp_path / f"x.shard{i}-of-3.h5", {"x": X[i::3] + 1}, y[i::3], shard=f"{i}/3",
                    paths=[f"s{i}/{j}.jpg" for j in range(len(y[i::3]))], num_candidates=len(y[i::3]))
    virtual = merging.merge(tmp_path / "x.h5", virtual=True)
    assert virtual.virtual and not virtual.note
    with h5py.File(tmp_path / "x.h5") as f:
        assert np.isnan(f["features/x"].fillvalue)
    (tmp_path / "x.shard1-of-3.h5").rename(tmp_path / "away.h5")  # as if it could not be opened
    with h5py.File(tmp_path / "x.h5") as f:  # HDF5 itself fills with NaN, not zeros
        assert np.isnan(f["features/x"][()]).any()
    from features.store import read_blocks
    with pytest.raises(DamagedCache, match="could not be read from its shard files beside it"):
        list(read_blocks(tmp_path / "x.h5", "x", np.arange(20), 20))
    (tmp_path / "away.h5").rename(tmp_path / "x.shard1-of-3.h5")
    monkeypatch.setattr(merging, "open_file_limit", lambda: 50)
    copied = merging.merge(tmp_path / "x.h5", out=tmp_path / "y.h5", virtual=True)
    assert not copied.virtual and "ulimit -n" in copied.note
    assert np.array_equal(open_cache(tmp_path / "y.h5").read("x"), open_cache(tmp_path / "x.h5").read("x"))


def test_cache_attributes_are_named_only_in_the_schema():
    """Attribute names as string keys (`attrs["engine"]`, `attrs.get("decoder")`, `{"layers": ...}` handed to a
    writer) would be a second, hand-written copy of the schema: product code reads and writes `CacheAttrs` fields."""
    import ast

    names_ = {f.name for f in schema.FIELDS}
    found = []
    for path in sorted(ROOT.glob("*/*.py")):
        if path.parts[-2] not in ("features", "classifiers", "pipeline") or path.name == "schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Subscript) and "attrs" in ast.unparse(node.value):
                key = node.slice
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and "attrs" in ast.unparse(node.func.value) and node.args):
                key = node.args[0]
            if isinstance(key, ast.Constant) and key.value in names_:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {key.value}")
    assert not found, found
