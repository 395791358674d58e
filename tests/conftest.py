"""Shared fixtures: generated images, and the real data the repository ships (data/hymenoptera-small, the
pretrained Lite0 in models/, the odd image files in tests/data), so every test runs on a plain clone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
LITE0 = ROOT / "models" / "efficientnet_lite0" / "efficientnet_lite0_imagenet.keras"
HYMENOPTERA = ROOT / "data" / "hymenoptera-small"  # 398 real photos (short side 256), train/val, ants/bees
ODD_INPUTS = ROOT / "tests" / "data" / "odd-inputs"  # odd and broken image files; README.md lists what each tests


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (48, 64)) -> list[Path]:
    """n random-texture colour JPEGs/PNGs of varying size; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        h, w = size[0] + int(rng.integers(0, 16)), size[1] + int(rng.integers(0, 16))
        img = cv2.resize(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), (w, h))
        path = folder / f"img_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        cv2.imwrite(str(path), img)
        out.append(path)
    return out


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """DATA/<class>/*: two classes, 10 images each."""
    for k, name in enumerate(["cats", "dogs"]):
        write_images(tmp_path / "data" / name, 10, seed=k)
    return tmp_path / "data"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` once per test run, also when pytest-xdist runs the suite in several worker processes: the
    first worker builds under a file lock in the run's shared temporary folder, the others wait and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's temporary folder lives in
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps({"path": str(build(folder))}))
    return Path(json.loads(done.read_text())["path"])


@pytest.fixture(scope="session")
def lite0_hymenoptera(tmp_path_factory) -> Path:
    """One extraction of the shipped photos with the pretrained Lite0, shared by every real-data test: the pooled
    features, the ImageNet predictions and the 7x7x1280 map before the pooling."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    def build(folder: Path) -> Path:
        cfg = ExtractConfig(backbone=str(LITE0), data=str(HYMENOPTERA), out=str(folder / "lite0.h5"),
                            layer=["avg_pool", "predictions", "top_activation"])
        return extract(cfg, verbose=False).path

    return built_once(tmp_path_factory, "lite0", build)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per usable core, at most 4; each worker imports TensorFlow (about 1 GiB resident), and
    the heaviest tests use two cores themselves."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """scikit-learn's array-API check needs array libraries (array-api-strict, SCIPY_ARRAY_API=1) this project does
    not use; it would only ever skip, so it is deselected rather than reported as a skip."""
    keep = [item for item in items if "check_array_api_input" not in item.nodeid]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A small random-weight `.keras` backbone with a sidecar JSON, for tests where pretrained weights are not the
    point: two weighted blocks and a `top_conv` named as keras.applications name theirs, then `avg_pool`."""
    def build(folder: Path) -> Path:
        import keras

        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((None, None, 3))
        for block, filters in [("block1", 8), ("block2", 16)]:
            x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"{block}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"{block}_bn")(x)
            x = keras.layers.ReLU(name=f"{block}_relu")(x)
        x = keras.layers.Conv2D(32, 1, activation="relu", name="top_conv")(x)
        outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        path = folder / "tiny.keras"
        keras.Model(inputs, outputs, name="tiny").save(path)
        path.with_suffix(".json").write_text(json.dumps({"preprocess": "mean=127,std=128", "input_size": 32,
                                                         "default_layer": "avg_pool"}))
        return path

    return built_once(tmp_path_factory, "tiny", build)


def fails_in_one_line(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI in this process; assert the exit code and a single 'error:' line without traceback; return it."""
    from pipeline.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]
