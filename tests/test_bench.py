"""`make bench`: each section's arithmetic on known timings and memory figures (fakes in place of the measuring
calls), and one smoke run of the real code paths on tiny inputs. The targets themselves are read from
benchmarks/results.md, not asserted here."""
from __future__ import annotations

import csv
import dataclasses
import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import heads, storage, throughput, update
from benchmarks.bench import parse_sections, run_bench
from benchmarks.common import SHIPPED_IMAGES, Sizes, Sources
from features.store import rows_per_chunk

SOURCES = Sources(SHIPPED_IMAGES, Path("lite0.keras"), False)


def _no_staging(monkeypatch, module):
    monkeypatch.setattr(module, "stage_images", lambda source, n, dest, link=False: dest)


def test_section1_ratio_is_end_to_end_over_model_only_on_known_timings(monkeypatch, tmp_path):
    """16 images in batches of 8, 0.5 s a batch model-only (16 img/s), 2 s end to end (8 img/s): ratio 0.5."""
    _no_staging(monkeypatch, throughput)
    monkeypatch.setattr(throughput, "list_images", lambda root: [])
    monkeypatch.setattr(throughput, "decode_profile", lambda paths, size: ([object()] * 16, {}))
    monkeypatch.setattr(throughput, "model_forward", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(throughput, "time_forward", lambda forward, batches: 0.5 * len(batches))
    monkeypatch.setattr(throughput, "time_to_tensor", lambda batch: 0.001)
    timings = SimpleNamespace(wall_s=2.0, write_s=0.2, wait_input_s=0.1, model_s=1.5, decode_cpu_s=0.4)
    monkeypatch.setattr(importlib.import_module("pipeline.extraction"), "extract", lambda cfg, verbose: SimpleNamespace(
        processed=16, timings=timings, engine="tf", path=Path(cfg.out)))
    monkeypatch.setattr(throughput.Case, "resolve", lambda self, sources, sizes=None, work=None: {
        "backbone": "vgg19", "layer": "block2_pool", "size": 32, "weights": "none"})
    row = throughput.measure_case(throughput.CASES[2], SOURCES, Sizes.quick(), 16, 8, tmp_path, peer=False)
    assert row["model_only_img_s"] == pytest.approx(16.0) and row["end_to_end_img_s"] == pytest.approx(8.0)
    assert row["tf_model_only_img_s"] == pytest.approx(16.0) and row["vs_tf_model_only"] == pytest.approx(0.5)
    assert row["ratio"] == pytest.approx(0.5) and row["model_ms"] == pytest.approx(62.5)
    assert row["write_ms"] == pytest.approx(12.5)


@pytest.mark.parametrize("ratios,met", [((0.95, 0.9), True), ((0.95, 0.89), False)])
def test_section1_target_needs_every_model_at_090(monkeypatch, tmp_path, ratios, met):
    rows = iter(ratios)
    monkeypatch.setattr(throughput, "measure_case", lambda case, *a, **k: {
        "model": case.name, "engine": "tf", "ratio": (r := next(rows)), "vs_tf_model_only": r})
    sizes = dataclasses.replace(Sizes.quick(), cases=("lite0", "resnet50"))
    sec = throughput.section_input_pipeline(sizes, SOURCES, tmp_path, log=lambda m: None)
    assert sec.met is met and f"lite0 (tf): {ratios[0]:.2f}" in sec.value and f"resnet50 (tf): {ratios[1]:.2f}" in \
        sec.value


def _child(images: int, seconds: float, rss: float) -> dict:
    return {"images": images, "seconds": seconds, "peak_rss_mb": rss, "growth_mb": rss - 300, "file_mb": 1.0}


@pytest.mark.parametrize("rss_4n,met", [(440.0, True), (441.0, False)])
def test_section3_rss_ratio_is_4n_over_n(monkeypatch, tmp_path, rss_4n, met):
    _no_staging(monkeypatch, storage)
    sizes = Sizes.quick()
    monkeypatch.setattr(storage, "run_child", lambda job, params: _child(
        4 * sizes.memory_images if params["out"].endswith(f"_{4 * sizes.memory_images}.h5") else sizes.memory_images,
        1.0, rss_4n if params["out"].endswith(f"_{4 * sizes.memory_images}.h5") else 400.0))
    sec = storage.section_memory(sizes, SOURCES, tmp_path, lambda m: None, {})
    n4 = next(r for r in sec.rows if r["rss_ratio_4n_n"] is not None)
    assert n4["rss_ratio_4n_n"] == pytest.approx(rss_4n / 400.0) and sec.met is met


def _fake_section2(monkeypatch, rates: dict[str, float], machine_gflop_s: float) -> list[dict]:
    """Section 2 on fake processes: T(k images) = 10 s + k / rate, except in round 2, where a busy spell adds 5 s to
    every 2N run and the model-only run is twice as fast. Returns the calls' (job, images, round) in order."""
    _no_staging(monkeypatch, throughput)
    monkeypatch.setattr(throughput.Case, "resolve", lambda self, sources, sizes=None, work=None: {
        "backbone": "vgg19", "layer": "block2_pool", "size": 32, "weights": "none"})
    forward = importlib.import_module("benchmarks.forward")
    monkeypatch.setattr(forward, "cut_model", lambda params: (None, None))
    monkeypatch.setattr(forward, "model_flops", lambda model, size: 1e9)
    monkeypatch.setattr(forward, "matmul_gflops", lambda: machine_gflop_s)
    calls, rounds = [], {"model_only": 0}

    def run_child(job, params):
        if job == "model_only":
            rounds["model_only"] += 1
            calls.append((job, 32, rounds["model_only"]))
            return {"images": 32, "seconds": 2.0 / rounds["model_only"], "peak_rss_mb": 900.0}
        name = Path(params["data"]).name
        if not name.startswith("s2_vgg19_block2_pool_") or name.endswith("warm"):  # warm-up and memory runs
            return _child(1, 1.0, 500.0)
        method = "extract_tf" if params.get("engine") == "tf" else job
        k = int(name.rsplit("_", 1)[1])
        calls.append((method, k, rounds["model_only"]))
        busy = 5.0 if rounds["model_only"] == 2 and k == max(c[1] for c in calls if c[0] == method) else 0.0
        return {**_child(k, 1.0, 500.0), "process_s": 10.0 + k / rates[method] + busy}

    monkeypatch.setattr(throughput, "run_child", run_child)
    return calls


@pytest.mark.parametrize("naive_rate,machine_gflop_s,met", [(1.0, 100.0, True), (20.0, 100.0, False),
                                                           (20.0, 40.0, True)])
def test_section2_steady_rate_from_the_fastest_of_interleaved_rounds(monkeypatch, tmp_path, naive_rate,
                                                                     machine_gflop_s, met):
    """Reference: the faster model-only round (32 img/s). Steady rates: N / (T(2N) - T(N)) from each size's fastest
    run, so round 2's busy spell changes nothing. 5x the naive loop counts where the ceiling (machine rate / 1
    GFLOP per image) is 5x the naive loop or more: 100 vs 20 img/s is, 40 vs 20 is not."""
    rates = {"naive": naive_rate, "keras": 4.0, "extract_tf": 5.0, "extract": 48.0}
    calls = _fake_section2(monkeypatch, rates, machine_gflop_s)
    sizes = dataclasses.replace(Sizes.quick(), steady_rounds=2)
    sec = throughput.section_naive(sizes, SOURCES, tmp_path, lambda m: None, {})
    assert [c[2] for c in calls if c[0] == "extract"] == [1, 1, 2, 2]  # both sizes, in each round
    by = {r["method"]: r for r in sec.rows if r["model"].startswith("vgg19")}
    assert by["TensorFlow compiled, model only (reference)"]["img_s"] == pytest.approx(32.0)
    for method, name in throughput.METHOD_NAMES.items():
        assert by[name]["img_s"] == pytest.approx(rates[method]), method
    ours = by[throughput.METHOD_NAMES["extract"]]
    assert ours["vs_tf_model_only"] == pytest.approx(1.5) and ours["speedup_vs_naive"] == pytest.approx(48 / naive_rate)
    assert sec.met is met
    assert ("compute ceiling is 2.00× naive" in sec.value) is (machine_gflop_s == 40.0)


@pytest.mark.parametrize("plus_one_percent,met", [((20.0, 13.0), True), ((20.0, 16.0), False)])
def test_section8_extra_cost_of_an_update_from_the_fastest_of_each_kind(monkeypatch, tmp_path, plus_one_percent, met):
    """Full run 100 s; updates +1% (a busy first round) and +1 (12 s, 12.5 s): (min T(+1%) - min T(+1)) / T(full)
    is 1% (met) or 4% (not met against 3%), and every update pushed exactly the added images."""
    times = iter([5.0, 100.0, plus_one_percent[0], 12.0, plus_one_percent[1], 12.5])  # the first: the warm-up export
    seen: dict = {}

    def fake_extract(data, out):
        n = len(update.list_images(data))
        processed, seen[data] = n - seen.get(data, 0), n
        return next(times), processed

    monkeypatch.setattr(update, "_extract", fake_extract)
    sizes = dataclasses.replace(Sizes.quick(), steady_rounds=2, update_images=100)
    sec = update.section_update(sizes, SOURCES, tmp_path, lambda m: None)
    assert [(r["run"], r["round"], r["added"], r["processed"]) for r in sec.rows] == [
        ("full", 1, 100, 100), ("update +1%", 1, 1, 1), ("update +1", 1, 1, 1), ("update +1%", 2, 1, 1),
        ("update +1", 2, 1, 1)]
    extra = (plus_one_percent[1] - 12.0) / 100
    assert f"(T(+1%) − T(+1)) / T(full) = {extra:.2%}" in sec.value and sec.met is met


def test_section6_scaling_exponents_from_a_known_cost(monkeypatch):
    """A fake head whose fit costs N² µs and nothing per dimension: exp_N = 2, exp_d = 0."""
    clock = SimpleNamespace(now=0.0)

    class Fit:
        def fit(self, X, y):
            clock.now += X.shape[0] ** 2 * 1e-6
            return self

    monkeypatch.setattr("classifiers.evaluate.selector", lambda spec, folds, seed: Fit())
    monkeypatch.setattr(heads.time, "perf_counter", lambda: clock.now)
    sizes = Sizes.quick()
    sec = heads.section_scaling(sizes, lambda m: None)
    for row in sec.rows:
        assert row["exp_N"] == pytest.approx(2.0) and row["exp_d"] == pytest.approx(0.0)
        assert row[f"N={sizes.scaling_samples}"] == pytest.approx(sizes.scaling_samples ** 2 * 1e-6)


def test_quick_bench_runs_the_real_code_paths(tmp_path):
    """Sections 1, 4 and 7 on tiny inputs: a real extraction beside the model-only and Keras-peer runs, real
    stores, and the result files written."""
    sections = {s.number: s for s in run_bench([1, 4, 7], quick=True, out_dir=tmp_path, log=lambda m: None,
                                                command="pytest", strict=True)}
    row = sections[1].rows[0]
    assert row["images"] == Sizes.quick().throughput_images["vgg19_block2_pool"]
    assert row["model_only_img_s"] > 0 and row["end_to_end_img_s"] > 0 and row["keras_peer_img_s"] > 0

    store = {(r["layer"], r["storage"]): r for r in sections[4].rows}  # float16 stores half the bytes,
    rows = Sizes.quick().storage_rows                                     # up to whole allocated chunks
    assert {layer for layer, _ in store} == set(storage.STORAGE_LAYERS)
    for (layer, storage_kind), row in store.items():
        if storage_kind == "float16":
            shape = tuple(int(v) for v in row["row_shape"].split("×"))
            chunk = {dt: min(rows_per_chunk(shape, dt), rows) for dt in ("float16", "float32")}
            stored = {dt: -(-rows // c) * (c * math.prod(shape) * int(dt[-2:]) // 8 + 4)  # + fletcher32 checksum
                      for dt, c in chunk.items()}
            assert row["vs_float32"] == pytest.approx(stored["float16"] / stored["float32"]), layer

    text = (tmp_path / "results.md").read_text()
    for heading in ["## Machine", "## 1.", "## 4.", "## 7."]:
        assert heading in text
    assert "CPU" in text and "TensorFlow / Keras" in text and str(SHIPPED_IMAGES) in text
    cells = list(csv.DictReader((tmp_path / "results.csv").open()))
    ratio_cells = [c for c in cells if c["section"] == "1" and c["column"] == "ratio" and c["table"] == "main"]
    assert len(ratio_cells) == len(sections[1].rows)
    assert (tmp_path / "section1_throughput.png").stat().st_size > 1000


@pytest.mark.slow  # fresh TensorFlow processes for every memory figure, and an end-to-end training: minutes
def test_quick_bench_child_process_sections(tmp_path):
    sections = {s.number: s for s in run_bench([2, 3, 5], quick=True, out_dir=tmp_path, log=lambda m: None,
                                                command="pytest", strict=True)}
    methods = {r["method"] for r in sections[2].rows}
    assert set(throughput.METHOD_NAMES.values()) <= methods
    (ceiling,) = sections[2].extra_tables[1][2]  # the quick run's one model: VGG19 block2_pool
    assert ceiling["machine_gflop_s"] > 1 and ceiling["gflop_per_image"] > 0  # the quick run's rates are noise
    assert ceiling["ceiling_img_s"] == pytest.approx(ceiling["machine_gflop_s"] / ceiling["gflop_per_image"])
    n1, n4 = sections[3].rows
    assert (n1["images"], n4["images"]) == (Sizes.quick().memory_images, 4 * Sizes.quick().memory_images)
    assert all(r["peak_rss_mb"] > 100 for r in sections[3].rows)  # real TensorFlow processes
    from classifiers.heads import resolve_heads

    rows = sections[5].rows
    assert {r["method"] for r in rows if r["method"].startswith("head: ")} == \
        {f"head: {h.name}" for h in resolve_heads("default")}
    extraction = next(r for r in rows if r["method"].startswith("extraction of the cache"))
    assert f"({2 * Sizes.quick().split_images} images, once)" in extraction["method"]


def test_model_flops_count_every_multiply_add_of_the_convolutions():
    """VGG19 to block2_pool at 256: four 3x3 convolutions, 3->64 and 64->64 at 256², 64->128 and 128->128 at 128²."""
    from benchmarks.forward import cut_model, model_flops

    macs = 256**2 * 9 * (3 * 64 + 64 * 64) + 128**2 * 9 * (64 * 128 + 128 * 128)
    _, model = cut_model({"backbone": "vgg19", "weights": "none", "size": 256, "layer": "block2_pool"})
    assert model_flops(model, 256) == 2 * macs


def test_model_flops_of_a_backbone_that_takes_any_input_size(tiny_backbone):
    """The tiny backbone's input is (None, None, 3): the spatial sizes come from the size asked for. At 32 px:
    3x3 convolutions 3->8 at 16² and 8->16 at 8², then a 1x1 convolution 16->32 at 8²."""
    from benchmarks.forward import cut_model, model_flops

    _, model = cut_model({"backbone": str(tiny_backbone), "weights": "imagenet", "size": 32, "layer": "avg_pool"})
    assert model_flops(model, 32) == 2 * (16**2 * 9 * 3 * 8 + 8**2 * 9 * 8 * 16 + 8**2 * 16 * 32)


def test_sections_argument_is_validated():
    assert parse_sections("all") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert parse_sections("3,1") == [1, 3]
    with pytest.raises(ValueError, match="'9'"):
        parse_sections("9")

