"""Shards merged (copied or virtual) equal a one-process run bit for bit; bad shard sets are refused by index;
`--devices` runs one worker process per GPU and merges, or one worker on a CPU-only machine."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest

from classifiers.testing import separable, write_cache
from features.backbones import get_backbone
from features.errors import UsageError
from features.model import build_base
from features.store import partial_path, progress_path
from pipeline.config import ExtractConfig, shard_out
from pipeline.devices import extract_on_devices, select_gpus
from pipeline.extraction import extract
from pipeline.merge import merge
from tests.conftest import ROOT, fails_in_one_line, write_images

VOLATILE_ATTRS = {"created", "completed", "config_json", "generation"}  # times, ids, and the config's own --out


def read(path: Path) -> dict:
    """Every dataset's values and dtype, and every root attribute but the volatile ones."""
    with h5py.File(path) as f:
        out = {name: f[name][()] for name in ["paths", "labels", "split", "label_names", "skipped"]}
        out.update({f"features/{k}": v[()] for k, v in f["features"].items()})
        out.update({f"dtype:{k}": str(v.dtype) for k, v in out.items() if isinstance(v, np.ndarray)})
        out.update({f"attr:{k}": v for k, v in f.attrs.items() if k not in VOLATILE_ATTRS})
        config = json.loads(f.attrs["config_json"])
        out["config"] = {k: v for k, v in config.items() if k != "out"}
    return out


def assert_identical(a: Path, b: Path) -> None:
    ra, rb = read(a), read(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert np.array_equal(ra[key], rb[key]) if isinstance(ra[key], np.ndarray) else ra[key] == rb[key], key


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> SimpleNamespace:
    """A one-process cache and the 3 shards of the same extraction (same weights file), with unusable files in
    shards 0 and 1 so that `skipped` and the row offsets are exercised."""
    root = tmp_path_factory.mktemp("merge")
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / "data" / name, 10, seed=k)
    (root / "data" / "cats" / "zero.jpg").write_bytes(b"")
    (root / "data" / "dogs" / "notes.txt").write_text("not an image")
    weights = root / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 64).save_weights(weights)
    cfg = ExtractConfig(backbone="vgg19", weights=str(weights), data=str(root / "data"), image_size=64, batch_size=8,
                        layer=["block1_pool", "block2_pool"])
    single = extract(cfg.replace(out=str(root / "single.h5")), verbose=False).path
    shards = root / "shards"
    for i in range(3):
        extract(cfg.replace(out=str(shards / "x.h5"), shard=f"{i}/3"), verbose=False)
    return SimpleNamespace(root=root, cfg=cfg, single=single, shards=shards, merged=shards / "x.h5")


def copy_shards(sharded: SimpleNamespace, tmp_path: Path) -> Path:
    shutil.copytree(sharded.shards, tmp_path / "shards")
    return tmp_path / "shards" / "x.h5"


def test_shards_are_named_beside_out_and_hold_their_block(sharded):
    names = sorted(p.name for p in sharded.shards.glob("*.h5"))
    assert names == ["x.shard0-of-3.h5", "x.shard1-of-3.h5", "x.shard2-of-3.h5"]
    assert shard_out(Path("f/x.h5"), (1, 3)) == Path("f/x.shard1-of-3.h5")
    with h5py.File(sharded.shards / "x.shard1-of-3.h5") as f:
        # 21 candidates (notes.txt is none): block 1 is candidates 7..13; zero.jpg among them is skipped
        assert f.attrs["shard"] == "1/3" and f.attrs["num_candidates"] == 7 and len(f["paths"]) == 6
        assert [(p.decode(), r.decode()) for p, r in f["skipped"][()]] == [("cats/zero.jpg", "empty file (0 bytes)")]


def test_merged_shards_equal_a_single_run_bit_for_bit(sharded, tmp_path):
    result = merge(sharded.merged, out=tmp_path / "merged.h5")
    assert result.status == "written" and result.images == 20 and len(result.skipped) == 1  # notes.txt: ignored
    assert_identical(tmp_path / "merged.h5", sharded.single)
    with h5py.File(tmp_path / "merged.h5") as f:
        assert f.attrs["complete"] and f.attrs["shard"] == "" and f.attrs["num_candidates"] == 21
        assert not f["features/block2_pool"].is_virtual
        assert [p.decode() for p, _ in f["skipped"][()]] == ["cats/zero.jpg"]
    assert merge(sharded.merged, out=tmp_path / "merged.h5").status == "up-to-date"


def test_virtual_merge_reads_the_shards_in_place(sharded, tmp_path, monkeypatch):
    merged = copy_shards(sharded, tmp_path)
    with pytest.raises(UsageError, match=r"a virtual merge links caches in its own folder only"):
        merge(merged.parent / "x.shard2-of-3.h5", out=tmp_path / "elsewhere.h5", virtual=True)
    merge(merged.parent / "x.shard2-of-3.h5", virtual=True)  # any one shard names the set
    moved = tmp_path / "moved"
    shutil.move(merged.parent, moved)  # the folder moves as a whole
    monkeypatch.chdir(tmp_path)  # sources are found beside the virtual file, not in the working directory
    assert_identical(moved / "x.h5", sharded.single)
    with h5py.File(moved / "x.h5") as f:
        assert f["features/block2_pool"].is_virtual and not f["paths"].is_virtual
        sources = {s.file_name for s in f["features/block2_pool"].virtual_sources()}
    assert sources == {f"x.shard{i}-of-3.h5" for i in range(3)}
    assert (moved / "x.h5").stat().st_size < (moved / "x.shard0-of-3.h5").stat().st_size


def test_missing_and_incomplete_shards_are_reported_by_index(sharded, tmp_path):
    merged = copy_shards(sharded, tmp_path)
    (merged.parent / "x.shard2-of-3.h5").unlink()
    with pytest.raises(UsageError, match=r"shard\(s\) 2 of 3 missing \(expected x\.shard2-of-3\.h5\)"):
        merge(merged)
    shutil.copy(sharded.shards / "x.shard2-of-3.h5", merged.parent)
    for i in (0, 2):  # as a killed task leaves it: unpublished, under its partial name
        shard = merged.parent / f"x.shard{i}-of-3.h5"
        with h5py.File(shard, "r+") as f:
            f.attrs["complete"] = False
        shard.rename(partial_path(shard))
    progress_path(merged.parent / "x.shard2-of-3.h5").write_text(json.dumps(
        {"rows_written": 2, "files_done": 2, "skipped": []}))
    with pytest.raises(UsageError, match=r"shard\(s\) 0 \(x\.shard0-of-3\.h5: no progress record\); "
                                         r"2 \(x\.shard2-of-3\.h5: 2 of 7 files done\) of 3 incomplete"):
        merge(merged)
    assert not merged.exists() and not partial_path(merged).exists()


def test_shards_of_other_configurations_or_counts_are_refused(sharded, tmp_path):
    merged = copy_shards(sharded, tmp_path)
    extract(sharded.cfg.replace(out=str(merged), shard="1/3", dtype="float16", overwrite=True), verbose=False)
    with pytest.raises(UsageError, match=r"shard 1 \(x\.shard1-of-3\.h5\) was made with a different configuration "
                                         r"than shard 0 \(dtype: 'float32' -> 'float16'\)"):
        merge(merged)
    shutil.copy(sharded.shards / "x.shard1-of-3.h5", merged.parent)
    shutil.copy(sharded.shards / "x.shard0-of-3.h5", merged.parent / "x.shard0-of-2.h5")
    with pytest.raises(UsageError, match=r"different shard counts \(2 shards: x\.shard0-of-2\.h5; 3 shards: "):
        merge(merged)
    with pytest.raises(UsageError, match=r"no shards of '.*other\.h5' found"):
        merge(tmp_path / "other.h5")


def test_make_merge_virtual(sharded, tmp_path):
    out = copy_shards(sharded, tmp_path).with_name("m.h5")
    done = subprocess.run(["make", "-s", "merge", "STAMP=", f"PY={sys.executable}", f"SHARDS_OF={out.parent / 'x.h5'}",
                           f"OUT={out}", "VIRTUAL=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"written: {out} from 3 shards" in done.stdout and "virtual" in done.stdout
    assert_identical(out, sharded.single)


def test_select_gpus_by_index_and_errors_name_the_visible_ones():
    assert select_gpus("all", ["2", "3"]) == ["2", "3"]
    assert select_gpus("1", ["2", "3"]) == ["3"]
    for bad in ("2", "0,0", "x"):
        with pytest.raises(UsageError, match=rf"devices '{bad}' is not valid.*visible: 0\.\.1"):
            select_gpus(bad, ["2", "3"])
    with pytest.raises(UsageError, match="devices '0' is not valid.*TensorFlow sees no GPU"):
        select_gpus("0", [])


def test_cpu_only_runs_one_worker_and_says_so(sharded, tmp_path, capsys):
    result = extract_on_devices(sharded.cfg.replace(out=str(tmp_path / "cpu.h5")), verbose=False, gpus=[])
    assert "no GPU visible; extracting with one worker on the CPU" in capsys.readouterr().out
    assert_identical(result.path, sharded.single)


def test_one_worker_process_per_gpu_then_merge_equals_a_single_run(sharded, tmp_path, capsys):
    """Two 'GPUs' on a CPU machine: each worker process gets CUDA_VISIBLE_DEVICES and one shard, then a merge."""
    out = tmp_path / "multi.h5"
    result = extract_on_devices(sharded.cfg.replace(out=str(out)), verbose=True, gpus=["0", "1"])
    printed = capsys.readouterr().out
    assert "2 workers, one per GPU (0, 1)" in printed and "shard 1/2 -> multi.shard1-of-2.h5" in printed
    assert result.path == out and result.images == 20
    assert_identical(out, sharded.single)
    assert sorted(p.name for p in tmp_path.glob("multi.shard*-of-2.h5")) == ["multi.shard0-of-2.h5",
                                                                              "multi.shard1-of-2.h5"]


def test_bad_options_are_refused_in_the_parent_before_any_worker_starts(tmp_path, monkeypatch):
    def no_worker(*args, **kwargs):
        raise AssertionError("a worker process was started before the options were checked")

    monkeypatch.setattr(subprocess, "Popen", no_worker)
    cfg = ExtractConfig(data=str(tmp_path), out=str(tmp_path / "c.h5"), pool="median")
    with pytest.raises(UsageError, match="pool 'median' is not valid"):
        extract_on_devices(cfg, verbose=False, gpus=["0", "1"])
    assert list(tmp_path.iterdir()) == []


def test_out_naming_one_of_the_shards_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """Issue 23: `merge --out <a shard> --overwrite` replaced that shard with the merged cache. Any spelling of a
    shard's path, or a link to it, is refused in one line and every file stays as it was."""
    X, y = separable(4, 2, 8, seed=0)
    shards = [write_cache(tmp_path / f"x.shard{i}-of-2.h5", {"vec": X[i::2]}, y[i::2], shard=f"{i}/2")
              for i in range(2)]
    (tmp_path / "link.h5").symlink_to(shards[1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    line = fails_in_one_line(capsys, ["merge", "--shards-of", str(shards[0]), "--out", "x.shard0-of-2.h5",
                                      "--overwrite"])
    assert line == (f"error: --out 'x.shard0-of-2.h5' is shard 0 of 2 ('{shards[0]}'), an input of this merge; "
                    f"writing there would destroy it. Choose another --out, e.g. the default '{tmp_path / 'x.h5'}'.")
    with pytest.raises(UsageError, match=r"--out '.*link\.h5' is shard 1 of 2 \('.*x\.shard1-of-2\.h5'\)"):
        merge(shards[0], tmp_path / "link.h5", overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
