"""Stage one on generated images: cached features equal a direct forward pass, and the cache survives kills."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from features.backbones import get_backbone
from features.images import load_image
from features.model import build_base
from features.store import partial_path, progress_path
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import ROOT, fails_in_one_line, run_cli, write_images

VGG = dict(backbone="vgg19", weights="none", image_size=64, batch_size=8)


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        out = {name: f[name][()] for name in ["paths", "labels", "split", "label_names"]}
        out.update({f"features/{k}": v[()] for k, v in f["features"].items()})
        out["skipped"] = f["skipped"][()]
        out["complete"] = f.attrs["complete"]
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = read(a), read(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert np.array_equal(ra[key], rb[key]), key


def direct_forward(data: Path, rel_paths, layer: str, size: int, **kw) -> np.ndarray:
    """The reference: the same truncated Keras model called eagerly on the same decoded images."""
    spec = get_backbone(kw.get("backbone", "vgg19"))
    base = build_base(spec, "none", size)
    model = keras.Model(base.input, base.get_layer(layer).output)
    pixels = np.stack([load_image(data / p, size, "crop") for p in rel_paths]).astype("float32")
    return np.asarray(model(spec.preprocess.fn(pixels), training=False))


def test_cached_features_equal_a_direct_forward_pass(class_folder, tmp_path):
    keras.utils.set_random_seed(0)
    res = extract(ExtractConfig(data=str(class_folder), layer=["block2_pool"], out=str(tmp_path / "c.h5"), **VGG),
                  verbose=False)
    keras.utils.set_random_seed(0)  # weights=none: same seed, same random weights
    with h5py.File(res.path) as f:
        paths = f["paths"].asstr()[()]
        cached = f["features/block2_pool"][()]
        assert f.attrs["complete"] and f.attrs["num_images"] == 20
        assert list(f["label_names"].asstr()[()]) == ["cats", "dogs"]
        assert list(f["labels"][()]) == [0] * 10 + [1] * 10
        assert f.attrs["preprocessing"].startswith("keras.applications.vgg19.preprocess_input")
    assert cached.shape == (20, 16, 16, 128)
    want = direct_forward(class_folder, paths, "block2_pool", 64)
    np.testing.assert_allclose(cached, want, rtol=1e-4, atol=1e-4)


def test_multi_layer_single_pass_equals_separate_runs_and_fp16_within_precision(class_folder, tmp_path):
    def run(layers, out, dtype="float32", pool="none"):
        keras.utils.set_random_seed(0)
        cfg = ExtractConfig(data=str(class_folder), layer=layers, out=str(tmp_path / out), dtype=dtype, pool=pool, **VGG)
        return read(extract(cfg, verbose=False).path)

    both = run(["block1_pool", "block3_conv2"], "both.h5")
    one = run(["block1_pool"], "one.h5")
    three = run(["block3_conv2"], "three.h5")
    assert np.array_equal(both["features/block1_pool"], one["features/block1_pool"])
    assert np.array_equal(both["features/block3_conv2"], three["features/block3_conv2"])
    half = run(["block1_pool"], "half.h5", dtype="float16")["features/block1_pool"]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), one["features/block1_pool"], rtol=1e-3, atol=1e-2)
    pooled = run(["block1_pool"], "avg.h5", pool="avg")["features/block1_pool"]
    np.testing.assert_allclose(pooled, one["features/block1_pool"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size,expected", [(None, (56, 56, 128)), (256, (64, 64, 128))])
def test_vgg19_block2_pool_shape_at_native_and_seed_article_size(tmp_path, size, expected):
    write_images(tmp_path / "d" / "x", 3, seed=1)
    cfg = ExtractConfig(backbone="vgg19", weights="none", data=str(tmp_path / "d"), layer=["block2_pool"],
                        image_size=size, out=str(tmp_path / "v.h5"), batch_size=4)
    res = extract(cfg, verbose=False)
    with h5py.File(res.path) as f:
        assert f["features/block2_pool"].shape == (3, *expected)
        assert f["features/block2_pool"].chunks == (1, *expected)  # 1.6 MiB a row: one image per chunk


def test_rerun_is_a_noop_and_other_config_is_refused(class_folder, tmp_path, capsys):
    cfg = ExtractConfig(data=str(class_folder), layer=["block1_pool"], out=str(tmp_path / "c.h5"), **VGG)
    extract(cfg, verbose=False)
    mtime = os.stat(tmp_path / "c.h5").st_mtime_ns
    assert extract(cfg, verbose=True).status == "up-to-date"
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(tmp_path / "c.h5").st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different configuration.*pool.*--overwrite"):
        extract(cfg.replace(pool="avg"), verbose=False)
    assert extract(cfg.replace(pool="avg", overwrite=True), verbose=False).status == "written"


def test_bad_files_are_skipped_and_recorded(class_folder, tmp_path):
    (class_folder / "cats" / "zero.jpg").write_bytes(b"")
    (class_folder / "dogs" / "page.jpeg").write_text("<html>not found</html>")
    (class_folder / "dogs" / "notes.txt").write_text("hello")
    res = extract(ExtractConfig(data=str(class_folder), layer=["block1_pool"], out=str(tmp_path / "c.h5"), **VGG),
                  verbose=False)
    with h5py.File(res.path) as f:
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][()]}
        assert f.attrs["num_images"] == 20 and len(f["paths"]) == 20
    assert set(skipped) == {"cats/zero.jpg", "dogs/page.jpeg"}  # notes.txt is no image by its name: ignored
    assert "empty" in skipped["cats/zero.jpg"]


RESUME_IMAGES, RESUME_AT = 160, 24  # rows in the folder; rows written before the signal is sent


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    """A folder, fixed random weights and the CLI arguments of one extraction, and its uninterrupted cache."""
    root = tmp_path_factory.mktemp("resume")
    for k, name in enumerate(["a", "b"]):
        write_images(root / "data" / name, RESUME_IMAGES // 2, seed=10 + k)
    weights = root / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 64).save_weights(weights)  # every run: the same weights
    args = ["extract", "--backbone", "vgg19", "--weights", str(weights), "--data", str(root / "data"),
            "--layer", "block2_pool", "--image-size", "64", "--batch-size", "8", "--workers", "1"]
    fresh = extract(ExtractConfig(backbone="vgg19", weights=str(weights), data=str(root / "data"),
                                  layer=["block2_pool"], image_size=64, batch_size=8, workers=1,
                                  out=str(root / "fresh.h5")), verbose=False).path
    return args, fresh


def interrupt_mid_run(args: list[str], out: Path, sig: signal.Signals) -> tuple[int, str, int]:
    """Start `python -m pipeline <args> --out out`, send `sig` once RESUME_AT rows are written, wait for the exit;
    (exit status, stderr, rows written before the process ended)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # SIGINT as at a terminal: a process started in the background inherits SIGINT ignored, so restore the default
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        progress = progress_path(out)
        if progress.exists() and json.loads(progress.read_text() or "{}").get("rows_written", 0) >= RESUME_AT:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"extraction ended before the signal: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, json.loads(progress_path(out).read_text())["rows_written"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=lambda s: s.name)
def test_interrupted_run_resumes_to_identical_contents(resume_case, tmp_path, sig):
    """A real extraction process stopped mid-run by kill -9, Ctrl-C or a scheduler's SIGTERM; rerunning the same
    command finishes the cache with the contents of an uninterrupted run."""
    args, fresh = resume_case
    out = tmp_path / "interrupted.h5"
    status, err, done_before = interrupt_mid_run(args, out, sig)
    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:  # stopped cleanly: exit 130 and one line saying how to resume
        assert status == 130 and "interrupted: partial work is kept" in err and "Traceback" not in err, err
    assert not out.exists()  # nothing at the target until the cache is complete
    with h5py.File(partial_path(out)) as f:
        assert not f.attrs["complete"]
    assert RESUME_AT <= done_before < RESUME_IMAGES

    resumed = run_cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and f"{RESUME_IMAGES - done_before} processed in this run" in resumed.stdout
    assert_same_cache(out, fresh)
    assert not progress_path(out).exists() and not partial_path(out).exists()


@pytest.mark.parametrize("args,message", [
    (["--backbone", "vgg91"], "unknown backbone 'vgg91'.*did you mean: vgg19"),
    (["--backbone", "vgg19", "--weights", "none", "--layer", "block2_pol"], "layer 'block2_pol'.*block2_pool"),
    (["--pool", "mean"], "pool 'mean' is not valid.*none, avg, max"),
    (["--data", "/nonexistent/images"], "DATA folder '/nonexistent/images' does not exist"),
    (["--data", "EMPTY"], "holds no images"),
    (["--labels", "BADCSV"], "labels CSV .* needs at least two columns"),
])
def test_user_errors_are_one_line_and_exit_nonzero(tmp_path, class_folder, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("just_one_column\nx\n")
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "bad.csv") if a == "BADCSV" else a
            for a in args]
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--out", str(tmp_path / "o.h5"), *args])
    assert re.search(message, line, flags=re.IGNORECASE), line


def test_offline_imagenet_weights_are_one_line_naming_the_file(tmp_path, class_folder):
    """In a process of its own: Keras reads KERAS_HOME when it is imported."""
    # Offline for certain: an empty Keras cache and a proxy on a closed local port refuse every download at once.
    offline = {"KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    res = run_cli("extract", "--data", str(class_folder), "--out", str(tmp_path / "o.h5"), "--backbone", "vgg19",
                  "--weights", "imagenet", env=offline)
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in err[0], err[0]


def test_mixed_precision_and_xla_paths_match_float32(class_folder, tmp_path):
    """The GPU options run on CPU too; float16 compute stays within its precision of the float32 features."""
    def run(out, **kw):
        keras.utils.set_random_seed(0)
        cfg = ExtractConfig(data=str(class_folder), layer=["block2_pool"], out=str(tmp_path / out), pool="avg", **VGG)
        return read(extract(cfg.replace(**kw), verbose=False).path)["features/block2_pool"]

    ref = run("f32.h5")
    mixed = run("mixed.h5", precision="mixed", jit=True)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_mixed_precision_does_not_leak_into_later_models(class_folder, tmp_path):
    cfg = ExtractConfig(data=str(class_folder), layer=["block1_pool"], out=str(tmp_path / "m.h5"), precision="mixed",
                        **VGG)
    extract(cfg, verbose=False)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_augmented_views_are_extra_rows_of_training_images_only(tmp_path):
    """View 0 rows equal a clean extraction; K views follow each training image; val stays clean; reruns agree."""
    for split in ["train", "val"]:
        for k, name in enumerate(["a", "b"]):
            write_images(tmp_path / "d" / split / name, 3, seed=k, size=(80, 96))
    base = dict(data=str(tmp_path / "d"), layer=["block1_pool"], pool="avg", **VGG)

    def run(out, **kw):
        keras.utils.set_random_seed(0)
        return read(extract(ExtractConfig(out=str(tmp_path / out), **base, **kw), verbose=False).path)

    clean = run("clean.h5")
    aug = run("aug.h5", augment=2)
    with h5py.File(tmp_path / "aug.h5") as f:
        view, split = f["view"][()], f["split"].asstr()[()]
        assert f.attrs["augment"] == 2 and f.attrs["augment_policy"] == "standard"
    assert list(view[split == "train"]) == [0, 1, 2] * 6 and set(view[split == "val"]) == {0}
    feats = aug["features/block1_pool"]
    np.testing.assert_array_equal(feats[view == 0], clean["features/block1_pool"])
    np.testing.assert_array_equal(aug["paths"][view == 0], clean["paths"])
    assert not np.allclose(feats[1], feats[0])  # an augmented view is another picture of the same image
    assert np.array_equal(run("again.h5", augment=2)["features/block1_pool"], feats)
    assert not np.array_equal(run("seed1.h5", augment=2, seed=1)["features/block1_pool"], feats)
