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

from benchmarks import engines, heads, scale, storage, throughput, update
from benchmarks.bench import parse_scale_images, parse_sections, run_bench
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


def _fake_section2(monkeypatch, rates: dict[str, float]) -> list[tuple]:
    """Section 2 on fake processes: T(k images) = 10 s + k / rate, except in round 2, where a busy spell adds 5 s to
    every 2N run and the CPU time one image needs grows from 20 ms to 30 ms (2 cores: a limit of 100 img/s, then 67).
    Returns the calls' (job, images, round) in order."""
    _no_staging(monkeypatch, throughput)
    monkeypatch.setattr(throughput.Case, "resolve", lambda self, sources, sizes=None, work=None: {
        "backbone": "vgg19", "layer": "block2_pool", "size": 32, "weights": "none"})
    calls, rounds = [], {"cpu_time": 0}

    def run_child(job, params):
        if job == "cpu_time":
            rounds["cpu_time"] += 1
            calls.append((job, 0, rounds["cpu_time"]))
            return {"engine": "onnx", "decode_ms": 4.0, "resize_ms": 2.0, "model_cpu_ms": 4.0 + 10 * rounds["cpu_time"],
                    "model_img_s": 32.0, "cores": 2, "peak_rss_mb": 900.0}
        name = Path(params["data"]).name
        if not name.startswith("s2_vgg19_block2_pool_") or name.endswith("warm"):  # warm-up and memory runs
            if name.endswith("warm"):
                calls.append(("warm-up", params.get("time_engines", False), rounds["cpu_time"]))
            return _child(1, 1.0, 500.0)
        method = {"tf": "extract_tf", "onnx": "extract_onnx"}.get(params.get("engine"), job)
        k = int(name.rsplit("_", 1)[1])
        calls.append((method, k, rounds["cpu_time"]))
        busy = 5.0 if rounds["cpu_time"] == 2 and k == max(c[1] for c in calls if c[0] == method) else 0.0
        return {**_child(k, 1.0, 500.0), "engine": params.get("engine", "onnx"),
                "process_s": 10.0 + k / rates[method] + busy}

    monkeypatch.setattr(throughput, "run_child", run_child)
    return calls


@pytest.mark.parametrize("keras_rate,met", [(32.0, True), (33.0, False)])
def test_section2_steady_rates_from_the_fastest_of_interleaved_rounds_against_the_peer_and_the_limits(
        monkeypatch, tmp_path, keras_rate, met):
    """Steady rates: N / (T(2N) - T(N)) from each size's fastest run, so round 2's busy spell changes nothing; the
    CPU-time limit from the round with the least CPU time: 2 cores ÷ 20 ms = 100 img/s. Ours at 48 img/s: 1.2× the
    faster explicit engine (onnx, 40), 0.48 of the limit, 12× naive, and 1.5× the peer (the VGG19 target) at 32."""
    rates = {"naive": 4.0, "keras": keras_rate, "extract_tf": 5.0, "extract_onnx": 40.0, "extract": 48.0}
    calls = _fake_section2(monkeypatch, rates)
    sizes = dataclasses.replace(Sizes.quick(), steady_rounds=2)
    sec = throughput.section_steady(sizes, SOURCES, tmp_path, lambda m: None, {})
    assert calls[:2] == [("warm-up", True, 0), ("cpu_time", 0, 1)]  # auto times the engines and keeps the choice
    assert [c[2] for c in calls if c[0] == "extract"] == [1, 1, 2, 2]  # both sizes, in each round
    by = {r["method"]: r for r in sec.rows if r["model"].startswith("vgg19")}
    limit = next(r for r in sec.rows if r["method"].startswith("CPU-time limit"))
    assert limit["img_s"] == pytest.approx(100.0) and limit["engine"] == "onnx"
    for method, name in throughput.METHOD_NAMES.items():
        assert by[name]["img_s"] == pytest.approx(rates[method]), method
    ours = by[throughput.METHOD_NAMES["extract"]]
    assert ours["vs_faster_engine"] == pytest.approx(1.2) and ours["vs_cpu_limit"] == pytest.approx(0.48)
    assert ours["speedup_vs_naive"] == pytest.approx(12.0) and ours["vs_keras_peer"] == pytest.approx(48 / keras_rate)
    (table,) = [rows for caption, _, rows in sec.extra_tables if caption.startswith("CPU-time limit")]
    assert table[0]["cpu_ms_per_image"] == pytest.approx(20.0) and table[0]["faster_engine"] == "onnx"
    assert sec.met is met and "÷ the Keras peer's ≥ 1.5 for vgg19_block2_pool;" in sec.target
    assert f"vgg19_block2_pool: {48 / keras_rate:.2f}× peer (≥ 1.5), 1.20× the faster engine (onnx)" in sec.value


@pytest.mark.parametrize("auto,int8,probe_diff,met", [(0.95, 1.5, -0.02, True), (0.94, 1.5, 0.0, False),
                                                       (1.0, 1.49, 0.0, False), (1.0, 1.6, -0.021, False)])
def test_section9_needs_auto_at_095_of_the_faster_engine_and_int8_at_15x_with_the_probe_within_002(
        monkeypatch, auto, int8, probe_diff, met):
    """Every model of the full sizes is run (auto: three, int8: two); the probe runs on the first int8 model only."""
    calls = []
    monkeypatch.setattr(engines, "auto_case", lambda case, sources, n, sizes, work, log: calls.append(
        ("auto", case.name, n)) or {"model": case.name, "auto_vs_faster": auto, "faster_explicit": "onnx",
                                    "auto_ran": "onnx", "reason": "measured: ..."})
    monkeypatch.setattr(engines, "int8_case", lambda case, sources, n, sizes, work, log, probe_repeats: calls.append(
        ("int8", case.name, n, probe_repeats)) or {"model": case.name, "int8_vs_float32": int8,
                                                   **({"probe_diff": probe_diff} if probe_repeats else {})})
    sizes = Sizes.full()
    sec = engines.section_engines(sizes, SOURCES, Path("work"), lambda m: None)
    assert calls == [("auto", "lite0", 256), ("auto", "resnet50", 96), ("auto", "vgg19_block2_pool", 96),
                     ("int8", "lite0", None, 5), ("int8", "vgg19_block2_pool", 96, 0)]
    assert sec.number == 9 and sec.met is met
    assert f"lite0: int8 {int8:.2f}× float32, probe {probe_diff:+.3f}; vgg19_block2_pool: int8 {int8:.2f}× float32" \
        in sec.value


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


@pytest.mark.slow  # fresh TensorFlow processes for every memory figure, an end-to-end training, int8: minutes
def test_quick_bench_child_process_sections(tmp_path):
    sections = {s.number: s for s in run_bench([2, 3, 5, 9], quick=True, out_dir=tmp_path, log=lambda m: None,
                                                command="pytest", strict=True)}
    methods = {r["method"] for r in sections[2].rows}
    assert set(throughput.METHOD_NAMES.values()) <= methods
    (limit,) = sections[2].extra_tables[1][2]  # the quick run's one model: VGG19 block2_pool
    assert limit["decode_ms"] > 0 and limit["resize_ms"] > 0 and limit["model_cpu_ms"] > 0  # the rates are noise
    assert limit["limit_img_s"] == pytest.approx(1e3 * limit["cores"] / limit["cpu_ms_per_image"])
    n1, n4 = sections[3].rows
    assert (n1["images"], n4["images"]) == (Sizes.quick().memory_images, 4 * Sizes.quick().memory_images)
    assert all(r["peak_rss_mb"] > 100 for r in sections[3].rows)  # real TensorFlow processes
    from classifiers.heads import resolve_heads

    rows = sections[5].rows
    assert {r["method"] for r in rows if r["method"].startswith("head: ")} == \
        {f"head: {h.name}" for h in resolve_heads("default")}
    extraction = next(r for r in rows if r["method"].startswith("extraction of the cache"))
    assert f"({2 * Sizes.quick().split_images} images, once)" in extraction["method"]
    (auto,) = sections[9].rows  # the quick run's one model: VGG19 block2_pool, real extractions
    assert auto["auto_ran"] in ("tf", "onnx") and auto["reason"].startswith("measured: ")
    (int8,) = sections[9].extra_tables[0][2]
    assert int8["int8_img_s"] > 0 and 0 < int8["mean_rel_dev"] < 0.2 and int8["probe_folds"] == 4


def test_sections_argument_is_validated():
    assert parse_sections("all") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert parse_sections("3,1") == [1, 3]
    with pytest.raises(ValueError, match="'11'.* from 1 to 10"):
        parse_sections("11")
    assert parse_scale_images("10000,100000") == (10_000, 100_000) and parse_scale_images(None) is None
    for bad in ("100000", "100000,10000", "10,100", "1e5,1e6"):
        with pytest.raises(ValueError, match=f"scale-images '{bad}' is not valid. Expected at least two ascending"):
            parse_scale_images(bad)


@pytest.mark.parametrize("classify_exponent,update_share,tar_share,met", [
    (1.0, 0.02, 0.01, True), (1.2, 0.02, 0.01, False), (1.0, 0.04, 0.01, False), (1.0, 0.01, 0.04, False)])
def test_section10_exponents_from_the_two_largest_sizes_and_the_update_share(monkeypatch, tmp_path, classify_exponent,
                                                                             update_share, tar_share, met):
    """Known costs: every stage linear in N except classify (N^k) and a shard task of constant cost; the exponents
    come from the two largest N, the update's share of the full run (the larger of the folder's and the tar shards')
    from the largest, and the target needs all."""
    def fake_measure(n, work, rng, log):
        linear = {name: (n / 1000, n / 100) for name in ["extract", "up-to-date", "listing", "extract (tar)",
                                                         "up-to-date (tar)", "merge", "merge virtual", "verify"]}
        return {**linear, "shard task": (4.0, 300.0), "classify": ((n / 1000) ** classify_exponent, 200.0),
                "update +1%": (update_share * n / 1000, n / 100), "update +1% (tar)": (tar_share * n / 1000, n / 100)}

    monkeypatch.setattr(scale, "measure", fake_measure)
    monkeypatch.setattr(scale, "stage", lambda args: (0.0, 0.0))
    sec = scale.section_scale((100, 1000, 4000), tmp_path, lambda m: None, tiny_shards=0)
    rows = {r["stage"]: r for r in sec.rows}
    assert rows["classify"]["time_exponent"] == pytest.approx(classify_exponent)
    assert rows["extract"]["time_exponent"] == pytest.approx(1.0) and rows["extract"]["rss_exponent"] == \
        pytest.approx(1.0)
    assert rows["shard task"]["time_exponent"] == pytest.approx(0.0) and rows["extract"]["s_at_4000"] == 4.0
    assert f"update +1% / full = {max(update_share, tar_share):.1%} at 100" in sec.value and sec.met is met
    assert "(up-to-date / full = 100.0% at 4000: the floor of any update; beyond it, (update - up-to-date) / full = " \
        f"{max(update_share, tar_share) - 1:.1%})" in sec.value



def test_section10_tar_shards_hold_every_image_of_the_hard_linked_folder(tmp_path, monkeypatch):
    """The folder is hard links to a few distinct JPEGs; `tarfile.add` would store every repeat as a link member,
    which extraction skips, so the tar stages would time mostly skipping (they did: 1,200 of 30,000 images read)."""
    import numpy as np

    from features.catalog import discover

    monkeypatch.setattr(scale, "DISTINCT", 5)  # 25 files, 5 distinct: each linked 5 times
    files = scale.write_images(tmp_path / "data", 25, np.random.default_rng(0))
    scale.pack_tars(files, tmp_path / "tars")
    found = discover(str(tmp_path / "tars"))
    assert len(found.paths) == 25 and not found.ignored
    assert found.label_names == sorted({f.parent.name for f in files})


@pytest.mark.slow  # some 30 whole pipeline processes on 100 and 200 images: minutes
def test_quick_scale_section_runs_every_stage_as_a_process(tmp_path):
    """Section 10 on 100 and 200 synthetic images: every stage ran as its own process (a peak RSS of its own, well
    under this test process's), the tar shards and the manifest were read, and the update found the new 1%."""
    (sec,) = run_bench([10], quick=True, out_dir=tmp_path, log=lambda m: None, strict=True)
    rows = {r["stage"]: r for r in sec.rows}
    assert list(rows) == ["extract", "up-to-date", "listing", "shard task", "extract (tar)", "up-to-date (tar)",
                          "merge", "merge virtual", "verify", "classify", "update +1%", "update +1% (tar)"]
    assert all(10 < r["mib_at_200"] < 4000 and r["s_at_200"] > 0 for r in rows.values())
    assert rows["listing"]["mib_at_200"] < rows["extract"]["mib_at_200"]  # no TensorFlow in the listing process
    (merged,) = [t for caption, _, t in sec.extra_tables if caption == "Merging 4 shards of 2 images"]
    assert [r["how"] for r in merged] == ["merge", "merge virtual"]
    assert "## 10. Scale: whole-process seconds and peak RSS per stage at N = 100, 200" in \
        (tmp_path / "results.md").read_text()
