"""A cache larger than the memory budget goes through the streaming path, and RSS stays under the budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil  # a dev dependency (pyproject.toml): installed by make test, never skipped
import pytest

from classifiers.testing import separable, write_cache
from pipeline.classification import ClassifyConfig, classify

BUDGET = 16 * 2**20
N, SIDE, CHANNELS = 4000, 8, 64  # 16 KiB per row: a 62.5 MiB layer, about 4x the budget


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    X, y = separable(N // 2, 2, CHANNELS, seed=11)
    order = np.random.default_rng(0).permutation(N)
    X, y = X[order], y[order]
    maps = np.lib.format.open_memmap(folder / "maps.npy", mode="w+", dtype=np.float32,
                                     shape=(N, SIDE, SIDE, CHANNELS))
    rng = np.random.default_rng(1)
    for start in range(0, N, 500):  # written block by block: the test process never holds the layer
        maps[start:start + 500] = X[start:start + 500, None, None, :] + 0.5 * rng.normal(
            size=(len(X[start:start + 500]), SIDE, SIDE, CHANNELS)).astype(np.float32)
    split = np.where(np.arange(N) % 5 == 0, "val", "train")
    path = write_cache(folder / "big.h5", {"block": maps}, y, split=split)
    del maps
    (folder / "maps.npy").unlink()
    small = write_cache(folder / "small.h5", {"block": np.zeros((40, 2, 2, 4), np.float32) + y[:40, None, None, None]},
                        y[:40], split=split[:40])
    return path, small


def _peak_growth(run) -> tuple[int, object]:
    """Run `run()` while sampling this process's RSS with psutil every 2 ms; return (peak - start, result)."""
    process, stop, peak = psutil.Process(), threading.Event(), [0]
    start = process.memory_info().rss

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = run()
    finally:
        stop.set()
        thread.join()
    return max(0, peak[0] - start), result


def measure(cfg_json: str) -> None:
    """Run in a fresh process: warm the libraries up (their first-use caches are no part of the budget), then
    classify under the RSS sampler, and print {"growth": bytes, "run": dir} as the last line."""
    cfg = json.loads(cfg_json)
    warm = cfg.pop("warm")
    classify(ClassifyConfig(features=warm, heads="default", reduce=["flatten", "avg"], out=cfg["out"] + "-warm"))
    # report=False: the page's plots and audit are not the streamed feature data this budget is about
    growth, run = _peak_growth(lambda: classify(ClassifyConfig(**cfg, report=False)))
    print(json.dumps({"growth": growth, "run": str(run)}))


def _classify_in_fresh_process(big_cache, **cfg) -> tuple[int, Path]:
    """A process that ran other tests keeps their heap (arenas, fragmentation); RSS is only meaningful in a new one."""
    path, warm = big_cache
    arg = json.dumps({**cfg, "features": str(path), "warm": str(warm), "memory_budget": str(BUDGET)})
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", f"from tests.test_classify_stream import measure; measure({arg!r})"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return record["growth"], Path(record["run"])


@pytest.mark.slow
def test_flattened_maps_over_the_budget_stream_through_sgd(big_cache, tmp_path):
    cache_bytes = N * SIDE * SIDE * CHANNELS * 4
    assert cache_bytes > 3 * BUDGET
    growth, run = _classify_in_fresh_process(big_cache, heads="sgd,logreg", reduce=["flatten"],
                                             out=str(tmp_path / "run"))
    board = pd.read_csv(run / "leaderboard.csv")
    assert board["head"].tolist() == ["sgd"] and bool(board["streamed"].iloc[0])  # logreg needs RAM: skipped
    assert board["accuracy"].iloc[0] >= 0.95 and board["dim"].iloc[0] == SIDE * SIDE * CHANNELS
    assert "skipped head 'logreg'" in (run / "report.md").read_text()
    assert growth < BUDGET, f"peak RSS grew by {growth / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB"


def test_pooling_streams_the_reduction_and_then_every_head_runs_in_memory(big_cache, tmp_path):
    growth, run = _classify_in_fresh_process(big_cache, heads="default", out=str(tmp_path / "run"))
    board = pd.read_csv(run / "leaderboard.csv")
    assert len(board) == 5 and set(board["reduce"]) == {"avg"} and not board["streamed"].any()
    assert board["accuracy"].iloc[0] == 1.0
    assert growth < BUDGET, f"peak RSS grew by {growth / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB"
