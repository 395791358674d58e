"""`--precision int8`: the export quantized by ONNX Runtime on K images of DATA, kept beside the float export under its
own hash; features of the same shapes within a bounded deviation of float32; the calibration set is part of the
cache's identity (a resume with another set is refused, an update keeps the cache's, predict names it)."""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from features.errors import UsageError
from features.quantize import calibration_rows
from features.schema import ConfigMismatch
from features.store import CacheWriter
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import write_images

K = 6


@pytest.fixture
def cfg(tiny_backbone, class_folder, tmp_path) -> ExtractConfig:
    """The tiny backbone over 20 images (two classes) in batches of 4, int8 calibrated on 6 of them."""
    return ExtractConfig(backbone=str(tiny_backbone), data=str(class_folder), batch_size=4, workers=1,
                         precision="int8", calibration_images=K, out=str(tmp_path / "c" / "int8.h5"))


def read(path) -> tuple[np.ndarray, dict]:
    with h5py.File(path) as f:
        return f["features/avg_pool"][()], dict(f.attrs)


def test_int8_features_keep_shapes_stay_close_to_float32_and_record_their_calibration(cfg, tmp_path, capsys):
    from pipeline.summary import print_extract_summary

    res = extract(cfg, verbose=False)
    q, attrs = read(res.path)
    f, f_attrs = read(extract(cfg.replace(precision="float32", out=str(tmp_path / "c" / "f32.h5")), verbose=False).path)
    assert q.shape == f.shape and q.dtype == f.dtype == np.float32
    deviation = np.linalg.norm(q - f, axis=1) / np.linalg.norm(f, axis=1)
    assert 0 < deviation.mean() < 0.1, deviation  # quantized, and close
    assert attrs["precision"] == "int8" and attrs["engine"] == "onnx"
    assert attrs["engine_reason"] == "rule: --precision int8 runs on ONNX Runtime"
    assert re.fullmatch(rf"sha256:[0-9a-f]{{64}}:K={K}", attrs["calibration"]) and f_attrs["calibration"] == ""
    assert json.loads(attrs["config_json"])["calibration"] == attrs["calibration"]  # predict reuses this graph
    folder = res.path.parent / "engines"
    int8 = list(folder.glob("*.int8.onnx"))
    assert len(int8) == 1 and len(list(folder.glob("*.onnx"))) == 2  # beside the float export, its own hash
    stamp = int8[0].stat().st_mtime_ns
    again = extract(cfg.replace(overwrite=True), verbose=False)
    assert np.array_equal(read(again.path)[0], q) and int8[0].stat().st_mtime_ns == stamp  # kept, bit-identical
    print_extract_summary(again)
    assert f"precision: int8: REDUCED-PRECISION features (ONNX Runtime static quantization, calibrated on {K} " \
           "images" in capsys.readouterr().out


def test_calibration_images_are_clean_training_views_evenly_spaced(class_folder):
    from features.catalog import discover

    catalog = discover(class_folder)  # 10 cats then 10 dogs, no splits
    assert calibration_rows(catalog, 4) == [0, 5, 10, 15]  # both classes, not the first four cats
    assert calibration_rows(catalog, 50) == list(range(20))
    views = catalog.with_views(2)  # augmented views are never calibration images
    assert [views.views[i] for i in calibration_rows(views, 60)] == [0] * 20


def test_a_resume_with_another_calibration_set_is_refused(cfg, monkeypatch):
    real_write, writes = CacheWriter.write, []

    def stop_at_second_batch(self, *args):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(CacheWriter, "write", stop_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, verbose=False)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    with pytest.raises(ConfigMismatch, match=rf"calibration: 'sha256:[0-9a-f]+:K={K}' -> 'sha256:[0-9a-f]+:K=4'"):
        extract(cfg.replace(calibration_images=4), verbose=False)
    with pytest.raises(ConfigMismatch, match="precision: 'int8' -> 'float32'"):
        extract(cfg.replace(precision="float32"), verbose=False)
    resumed = extract(cfg, verbose=False)
    assert resumed.status == "resumed"
    fresh = extract(cfg.replace(out=cfg.out.replace("int8.h5", "fresh.h5")), verbose=False)
    assert np.array_equal(read(resumed.path)[0], read(fresh.path)[0])


def test_an_update_keeps_the_calibration_of_the_cache_it_updates(cfg, class_folder):
    first = extract(cfg, verbose=False)
    calibrated = read(first.path)[1]["calibration"]
    write_images(class_folder / "ants", 6, seed=7)  # a new first class: evenly spaced picks would move
    updated = extract(cfg, verbose=False)
    assert updated.status == "updated" and read(updated.path)[1]["calibration"] == calibrated
    assert len(list((first.path.parent / "engines").glob("*.int8.onnx"))) == 1  # not quantized again
    # a fresh cache of the changed folder calibrates on its own images
    other = extract(cfg.replace(out=cfg.out.replace("int8.h5", "other.h5")), verbose=False)
    assert read(other.path)[1]["calibration"] != calibrated


def test_a_named_calibration_reuses_its_kept_graph_on_other_images_or_refuses(cfg, tmp_path):
    """What predict does: the model's config_json names the calibration; the kept graph is found by it."""
    first = extract(cfg, verbose=False)
    identity = read(first.path)[1]["calibration"]
    new = tmp_path / "new"
    write_images(new / "x", 5, seed=11)
    named = cfg.replace(data=str(new), calibration=identity, out=cfg.out.replace("int8.h5", "new.h5"))
    got = extract(named, verbose=False)
    assert read(got.path)[1]["calibration"] == identity
    assert len(list((first.path.parent / "engines").glob("*.int8.onnx"))) == 1
    with pytest.raises(UsageError, match="is not kept .* DATA's calibration images now give .*they changed"):
        extract(named.replace(out=str(tmp_path / "elsewhere" / "new.h5")), verbose=False)  # no engines/ there
    with pytest.raises(UsageError, match="calibration 'sha256:abc' is not valid"):
        extract(named.replace(calibration="sha256:abc"), verbose=False)


IDENTITY = "sha256:" + "ab" * 32 + ":K=64"
REDUCED = ("int8: REDUCED-PRECISION features (ONNX Runtime static quantization, calibrated on 64 images, "
           "sha256:abababab…); on the models measured they differ from float32 features by 2-21% (mean relative "
           "deviation; docs/engines.md)")


def test_reduced_precision_is_said_on_the_report_card_in_report_md_and_the_classify_summary(tmp_path):
    """An int8 cache written by the real writer: the first screen's Features row, report.md and the console summary
    say so in one sentence; a float32 cache's card says full precision and report.md says nothing."""
    from html import unescape

    from classifiers.report import summary
    from classifiers.testing import separable, write_cache
    from pipeline.classification import ClassifyConfig, classify

    X, y = separable(20, 2, 8, seed=1)
    split = np.where(np.arange(len(y)) % 3 == 0, "val", "train")
    for precision, calibration in (("int8", IDENTITY), ("float32", "")):
        cache = write_cache(tmp_path / f"{precision}.h5", {"vec": X}, y, split=split, precision=precision,
                            calibration=calibration, engine="onnx")
        run = classify(ClassifyConfig(features=str(cache), heads="logreg", out=str(tmp_path / f"run_{precision}")))
        card = run.joinpath("report.html").read_text().split('<section id="summary"', 1)[1].split("</section>")[0]
        features = unescape(re.sub(r"<[^>]+>", "", card.split("<dt>Features</dt><dd>", 1)[1].split("</dd>")[0]))
        report, printed = run.joinpath("report.md").read_text(), summary(run)
        if precision == "int8":
            assert features == f"{REDUCED}; stored as float32; run by onnx"
            assert f"\n- Features: {REDUCED}\n" in report and f"\nfeatures: {REDUCED}\n" in printed
        else:
            assert features == "float32: full-precision features; stored as float32; run by onnx"
            assert "REDUCED" not in report + printed and "Features:" not in report


def test_the_default_cache_name_of_an_int8_extraction_differs_and_float32_keeps_its_name(monkeypatch, tmp_path):
    from pipeline.config import default_out

    monkeypatch.setenv("FEATURE_CACHE_DIR", str(tmp_path))
    cfg = ExtractConfig(data="data/hymenoptera-small")
    assert default_out(cfg, ["avg_pool"], None) == \
        tmp_path / "hymenoptera-small__efficientnet_lite0_imagenet__avg_pool.h5"  # as before precision was a part
    assert default_out(cfg.replace(precision="int8", dtype="float16"), ["avg_pool"], (1, 2)) == \
        tmp_path / "hymenoptera-small__efficientnet_lite0_imagenet__avg_pool__int8__float16.shard1-of-2.h5"
