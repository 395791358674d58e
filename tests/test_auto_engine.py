"""`--engine auto` on a CPU: both engines timed once per graph and kind of machine (fake timings here), the faster one
runs, the choice is kept beside the export and read at once later; the cache says why its engine ran; a cache being
resumed, updated or confirmed keeps the engine it records; the GPU / mixed / XLA / int8 rules decide without timing."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import features.engines as engines
from features.engines import AUTO, choice_path, engine_rule, measure
from features.errors import UsageError
from features.store import CacheWriter, partial_path
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import fails_in_one_line


@pytest.fixture
def cfg(tiny_backbone, class_folder, tmp_path) -> ExtractConfig:
    """The tiny backbone over 20 images in batches of 4 (5 batches), exports kept under tmp_path/c/engines."""
    return ExtractConfig(backbone=str(tiny_backbone), data=str(class_folder), batch_size=4, workers=1,
                         out=str(tmp_path / "c" / "auto.h5"))


def attrs_of(path) -> dict:
    with h5py.File(path) as f:
        return {k: f.attrs[k] for k in ("engine", "engine_reason", "precision", "calibration")}


class FakeClock:
    """Seconds advance only inside the wrapped forward passes: `per_call[engine]` per call."""

    def __init__(self, monkeypatch, per_call: dict[str, float]):
        self.now, self.calls = 0.0, {name: 0 for name in per_call}
        monkeypatch.setattr(engines, "clock", lambda: self.now)
        for name, seconds in per_call.items():
            monkeypatch.setitem(engines.ENGINES, name, self.wrap(name, engines.ENGINES[name], seconds))

    def wrap(self, name, build, seconds):
        def builder(graph, options):
            forward = build(graph, options)

            def timed(pixels):
                self.now += seconds
                self.calls[name] += 1
                return forward(pixels)

            return timed

        return builder


@pytest.mark.parametrize("per_call,faster", [({"tf": 0.1, "onnx": 0.4}, "tf"), ({"tf": 0.5, "onnx": 0.2}, "onnx")])
def test_auto_times_both_engines_runs_the_faster_and_keeps_the_choice(cfg, monkeypatch, per_call, faster, capsys):
    monkeypatch.setattr(engines, "MEASURE_MIN_BATCHES", 1)
    FakeClock(monkeypatch, per_call)
    res = extract(cfg, verbose=True)
    slower = ({"tf", "onnx"} - {faster}).pop()
    assert res.engine == faster
    found = attrs_of(res.path)
    rates = {name: 4 / seconds for name, seconds in per_call.items()}  # a batch of 4 images per call
    assert found["engine"] == faster
    assert found["engine_reason"].startswith(f"measured: {faster} {rates[faster]:.1f} img/s, "
                                             f"{slower} {rates[slower]:.1f} img/s on ")
    assert f"auto: {found['engine_reason']}; running {faster}" in capsys.readouterr().out
    kept = json.loads(choice_path(res.path.parent / "engines" / next(
        p.name for p in (res.path.parent / "engines").glob("*.onnx"))).read_text())
    assert kept["engine"] == faster and kept["reason"] == found["engine_reason"] and kept["cores"] >= 1

    # later runs of this graph on this machine decide at once: nothing is timed, the slower engine is never built
    monkeypatch.setattr(engines, "clock", lambda: pytest.fail("timed again"))
    monkeypatch.setitem(engines.ENGINES, slower, lambda graph, options: pytest.fail(f"{slower} built"))
    for name in ("again.h5", "third.h5"):
        again = extract(cfg.replace(out=str(res.path.with_name(name))), verbose=False)
        assert again.engine == faster and attrs_of(again.path)["engine_reason"] == found["engine_reason"]
    with h5py.File(res.path) as f, h5py.File(again.path) as g:
        assert np.array_equal(f["features/avg_pool"][()], g["features/avg_pool"][()])


def test_measure_alternates_the_order_and_counts_the_fastest_call(monkeypatch):
    now, order = [0.0], []
    monkeypatch.setattr(engines, "clock", lambda: now[0])
    monkeypatch.setattr(engines, "MEASURE_ROUNDS", (2, 3))
    monkeypatch.setattr(engines, "MEASURE_BUDGET_S", 100.0)
    took = {"a": iter([0, 3.0, 1.0, 2.0]), "b": iter([0, 1.0, 4.0, 4.0])}  # the first call of each is the warm-up

    def fake(name):
        def forward(pixels):
            order.append(name)
            now[0] += next(took[name])

        return forward

    rates = measure({"a": fake("a"), "b": fake("b")}, np.zeros((8, 1, 1, 3), np.uint8))
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then rounds in alternating order
    assert rates == {"a": 8 / 1.0, "b": 8 / 1.0}


def test_a_short_run_or_a_shard_follows_the_rule_and_keeps_nothing(cfg, monkeypatch):
    monkeypatch.setattr(engines, "clock", lambda: pytest.fail("a short run timed the engines"))
    res = extract(cfg, verbose=False)  # 20 images: fewer than MEASURE_MIN_BATCHES batches
    assert res.engine == "onnx"
    reason = attrs_of(res.path)["engine_reason"]
    assert reason == ("rule: ONNX Runtime on a CPU (untimed: shards, whose engines must agree, and runs under "
                      f"{engines.MEASURE_MIN_BATCHES} batches do not time the engines)")
    assert not list((res.path.parent / "engines").glob("*.choice.json"))
    monkeypatch.setattr(engines, "MEASURE_MIN_BATCHES", 1)
    shard = extract(cfg.replace(shard="1/2"), verbose=False)
    assert shard.engine == "onnx" and attrs_of(shard.path)["engine_reason"] == reason  # a merge equals a whole run


def test_a_cache_keeps_the_engine_it_records_when_confirmed_or_resumed_under_auto(cfg, monkeypatch):
    monkeypatch.setattr(engines, "MEASURE_MIN_BATCHES", 1)
    monkeypatch.setattr(engines, "clock", lambda: pytest.fail("a recorded engine was timed again"))
    tf_cfg = cfg.replace(engine="tf")
    done = extract(tf_cfg, verbose=False)
    assert attrs_of(done.path)["engine_reason"] == "requested: --engine tf"
    assert extract(cfg, verbose=False).status == "up-to-date"  # auto: the complete cache's tf, not a new measurement

    partial_out = cfg.replace(out=str(done.path.with_name("partial.h5")))
    real_write, writes = CacheWriter.write, []

    def stop_at_third_batch(self, *args):
        writes.append(1)
        if len(writes) == 3:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(CacheWriter, "write", stop_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(partial_out.replace(engine="tf"), verbose=False)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    assert partial_path(done.path.with_name("partial.h5")).exists()
    resumed = extract(partial_out, verbose=False)  # auto resumes with the partial file's engine
    assert (resumed.status, resumed.engine) == ("resumed", "tf")
    assert attrs_of(resumed.path) == attrs_of(done.path)
    with h5py.File(resumed.path) as f, h5py.File(done.path) as g:
        assert np.array_equal(f["features/avg_pool"][()], g["features/avg_pool"][()])
    # --overwrite starts anew: then auto decides again (here: timed, the clock refuses)
    with pytest.raises(pytest.fail.Exception, match="timed again"):
        extract(cfg.replace(overwrite=True), verbose=False)


def test_rules_decide_without_timing(tmp_path):
    path = tmp_path / "g.onnx"
    assert engine_rule("auto", "float32", False, 0, path) == (AUTO, "")
    assert engine_rule("auto", "float32", False, 1, path) == ("tf", "rule: a GPU is present (TensorFlow)")
    assert engine_rule("auto", "mixed", False, 0, path) == ("tf", "rule: --precision mixed runs on TensorFlow")
    assert engine_rule("auto", "mixed", True, 0, path) == ("tf", "rule: --precision mixed and --jit run on TensorFlow")
    assert engine_rule("auto", "int8", False, 1, path) == ("onnx", "rule: --precision int8 runs on ONNX Runtime")
    assert engine_rule("onnx", "float32", False, 1, path) == ("onnx", "requested: --engine onnx")
    engines.unsupported_marker(path).write_text("ExportError: no\n")
    assert engine_rule("auto", "float32", False, 0, path) == ("tf", "rule: this graph does not export to ONNX "
                                                                    "(g.unsupported)")
    with pytest.raises(UsageError, match="engine 'tf' does not implement --precision int8"):
        engine_rule("tf", "int8", False, 0, path)
    with pytest.raises(UsageError, match="--precision int8 runs on ONNX Runtime, --jit on TensorFlow"):
        engine_rule("auto", "int8", True, 0, path)


def test_the_summary_says_which_engine_ran_and_why(cfg, capsys):
    from pipeline.summary import print_extract_summary

    print_extract_summary(extract(cfg.replace(engine="onnx"), verbose=False))
    assert "engine: onnx (requested: --engine onnx)" in capsys.readouterr().out


def test_engine_tf_with_int8_is_one_line(capsys, class_folder, tmp_path):
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--engine", "tf", "--precision", "int8",
                                      "--out", str(tmp_path / "x.h5")])
    assert "engine 'tf' does not implement --precision int8" in line
