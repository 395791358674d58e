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
from tests.conftest import ROOT

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
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert_same(contents(tmp_path / "x.h5"), contents(tmp_path / "fresh.h5"))
