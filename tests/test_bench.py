"""Smoke test of `make bench`: every section's code runs on tiny inputs and its ratios are computed correctly.
The targets themselves are not checked here (they are read from benchmarks/results.md)."""
from __future__ import annotations

import csv
import math

import pytest

from benchmarks.bench import parse_sections, run_bench
from benchmarks.common import Sizes
from features.store import rows_per_chunk


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_bench_computes_the_ratios(tmp_path):
    sections = {s.number: s for s in run_bench([1, 3, 4, 6, 7], quick=True, out_dir=tmp_path, log=lambda m: None,
                                                command="pytest", strict=True)}
    for row in sections[1].rows:  # section 1: end-to-end / model-only, both measured
        assert _finite(row["model_only_img_s"]) and _finite(row["end_to_end_img_s"])
        assert row["ratio"] == pytest.approx(row["end_to_end_img_s"] / row["model_only_img_s"])
        assert row["ours_vs_peer"] == pytest.approx(row["end_to_end_img_s"] / row["keras_peer_img_s"])
        assert _finite(row["decode_img_s_per_core"])
    assert sections[1].met in (True, False)

    mem = sections[3].rows  # section 3: peak RSS at N and 4N from child processes
    n1, n4 = (r for r in mem if r["dtype"] == "float16")
    assert n4["images"] == 4 * n1["images"]
    assert n4["rss_ratio_4n_n"] == pytest.approx(n4["peak_rss_mb"] / n1["peak_rss_mb"])
    assert n1["peak_rss_mb"] > 100  # a TensorFlow process: the figure is real, not a placeholder

    store = {(r["layer"], r["storage"]): r for r in sections[4].rows}  # section 4: float16 stores half the bytes,
    rows = Sizes.quick().storage_rows                                       # up to whole allocated chunks
    for (layer, storage), row in store.items():
        if storage == "float16":
            shape = tuple(int(v) for v in row["row_shape"].split("×"))
            chunk = {dt: min(rows_per_chunk(shape, dt), rows) for dt in ("float16", "float32")}
            stored = {dt: -(-rows // c) * (c * math.prod(shape) * int(dt[-2:]) // 8 + 4)  # + fletcher32 checksum
                      for dt, c in chunk.items()}
            assert row["vs_float32"] == pytest.approx(stored["float16"] / stored["float32"]), layer

    for row in sections[6].rows:  # section 6: a fit time at every size, and the scaling exponent
        assert all(_finite(v) for k, v in row.items() if k.startswith(("N=", "d=")))
        assert row["exp_N"] is not None

    text = (tmp_path / "results.md").read_text()
    for heading in ["## Machine", "## 1.", "## 3.", "## 4.", "## 6.", "## 7."]:
        assert heading in text
    assert "CPU" in text and "TensorFlow / Keras" in text
    cells = list(csv.DictReader((tmp_path / "results.csv").open()))
    ratio_cells = [c for c in cells if c["section"] == "1" and c["column"] == "ratio" and c["table"] == "main"]
    assert len(ratio_cells) == len(sections[1].rows)
    assert (tmp_path / "section1_throughput.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_bench_naive_and_heads_sections(tmp_path):
    sections = {s.number: s for s in run_bench([2, 5], quick=True, out_dir=tmp_path, log=lambda m: None,
                                                command="pytest", strict=True)}
    rows = sections[2].rows
    naive = next(r for r in rows if r["method"] == "naive loop")
    assert naive["speedup_vs_naive"] == pytest.approx(1.0)
    assert all(_finite(r["img_s"]) and _finite(r["peak_rss_mb"]) for r in rows)
    heads = [r for r in sections[5].rows if r["method"].startswith("head: ")]
    assert heads and all(0 <= r["val_accuracy"] <= 1 for r in heads)
    assert "heads ÷ epoch" in sections[5].value


def test_sections_argument_is_validated():
    assert parse_sections("all") == [1, 2, 3, 4, 5, 6, 7]
    assert parse_sections("3,1") == [1, 3]
    with pytest.raises(ValueError, match="'9'"):
        parse_sections("9")
