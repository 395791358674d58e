"""Issue 26, measured side by side: `--engine auto` against both explicit engines, and `--precision int8` against the
float32 ONNX Runtime engine (both: section 9 of `make bench`, `make bench SECTIONS=9`), and the int8 settings.
`python -m benchmarks.engines` writes them to benchmarks/engines.md (55 min on the 2-core EPYC at load average 6-11, a
fraction of that on a quiet machine; `--quick`: every code path on tiny inputs, figures meaningless).

    python -m benchmarks.engines                       # both parts, into benchmarks/engines.md
    python -m benchmarks.engines --parts int8 --rounds 3 --out /tmp/engines.md

Part "auto", per model (Lite0 -> avg_pool @224, ResNet50 @224, VGG19 -> block2_pool @256; the registry models with
seeded random weights staged as a file, so every run keeps one export): a fresh engines/ folder, one `extract --engine
auto` that times both engines on its real path (the threshold MEASURE_MIN_BATCHES is lowered to this small set, the
timing itself is untouched; its seconds are reported), then `extract --engine tf`, `--engine onnx` and `--engine auto`
(which now reads the kept choice) in rotating order, `rounds` times; each run's steady rate is the loop's (images /
seconds of `extract_rows`: start-up, model build and export excluded), the fastest of each counts. Target: auto >=
0.95x the faster explicit engine.

Part "int8", per model (Lite0 -> avg_pool on every photo of the data set, VGG19 -> block2_pool @256 on a staged set):
`extract --engine onnx` at float32 and at int8 (first runs untimed: export, calibration), then both in alternating
order `rounds` times, fastest loop rate of each; the features' mean (and largest) relative deviation per image,
||int8 - float32|| / ||float32||; for Lite0 the linear probe (the project's `logreg` head, C chosen on 5 inner folds)
in 5 x 4-fold cross-validation on both caches' features, labels ants/bees. bf16 is measured only where the CPU has it
(avx512_bf16 / amx_bf16); otherwise the part says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, Section, Sizes, find_sources, fmt, machine_facts, stage_images
from benchmarks.throughput import CASES, Case

# issue 26's targets
AUTO_TARGET = 0.95  # auto's steady rate ÷ the faster explicit engine's, for every model
INT8_TARGET = 1.5  # int8's steady rate ÷ float32's (both ONNX Runtime), for every model
PROBE_TOLERANCE = 0.02  # the linear probe's accuracy on int8 features within this of float32's
AUTO_COLUMNS = ["model", "images", "batch", "tf_img_s", "onnx_img_s", "auto_img_s", "auto_ran", "faster_explicit",
                "auto_vs_faster", "timing_s", "first_auto_run_s"]
INT8_COLUMNS = ["model", "images", "batch", "float32_img_s", "int8_img_s", "int8_vs_float32", "mean_rel_dev",
                "max_rel_dev", "export_s", "calibrate_quantize_s"]
PROBE_COLUMNS = ["model", "images", "probe_folds", "probe_float32", "probe_int8", "probe_diff", "probe_sd"]


@contextmanager
def patched(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def loop_rate(res) -> float:
    return res.processed / res.timings.wall_s if res.timings.wall_s else float("nan")


def config(case: Case, sources, data: Path, sizes: Sizes, work: Path):
    """The extraction of `case` on `data` (quick sizes shrink the registry models' input side)."""
    from pipeline.config import ExtractConfig

    params = case.resolve(sources, sizes, work)
    return ExtractConfig(backbone=params["backbone"], data=str(data), weights=params["weights"],
                         layer=[params["layer"]] if params["layer"] else [], image_size=params["size"],
                         batch_size=sizes.batch_size, overwrite=True)


def auto_case(case: Case, sources, n: int, sizes: Sizes, work: Path, log) -> dict:
    import features.engines as engines
    from pipeline.extraction import extract

    data = stage_images(sources.images, n, work / f"img_{case.name}")
    cfg = config(case, sources, data, sizes, work)
    folder = work / f"engines_{case.name}"  # fresh: the first auto run times the engines
    spent = {}

    def timed_measure(forwards, pixels):
        start = time.perf_counter()
        rates = real(forwards, pixels)
        spent["seconds"], spent["rates"] = time.perf_counter() - start, rates
        return rates

    real = engines.measure
    log(f"auto: {case.name}: the first run times both engines")
    start = time.perf_counter()
    with patched(engines, MEASURE_MIN_BATCHES=1, measure=timed_measure):
        first = extract(cfg.replace(engine="auto", out=str(work / f"{case.name}_auto.h5")), verbose=False,
                        engines=folder)
    first_s = time.perf_counter() - start
    from features.store import read_attrs

    reason = read_attrs(first.path).engine_reason
    rates: dict[str, list[float]] = {"tf": [], "onnx": [], "auto": []}
    order = list(rates)
    for r in range(sizes.steady_rounds):
        for engine in order[r % 3:] + order[:r % 3]:
            res = extract(cfg.replace(engine=engine, out=str(work / f"{case.name}_{engine}.h5")), verbose=False,
                          engines=folder)
            rates[engine].append(loop_rate(res))
            log(f"auto: {case.name} round {r + 1} {engine} ({res.engine}): {rates[engine][-1]:.1f} img/s")
    best = {k: max(v) for k, v in rates.items()}
    faster = max(("tf", "onnx"), key=best.get)
    return {"model": f"{case.name} @{cfg.image_size}", "images": n, "batch": sizes.batch_size,
            "tf_img_s": best["tf"], "onnx_img_s": best["onnx"], "auto_img_s": best["auto"], "auto_ran": first.engine,
            "faster_explicit": faster, "auto_vs_faster": best["auto"] / best[faster],
            "timing_s": spent.get("seconds", float("nan")), "first_auto_run_s": first_s, "reason": reason}


def deviation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b|| / ||b|| per row (b: the float32 reference)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


def probe(features: np.ndarray, labels: np.ndarray, repeats: int, folds: int) -> np.ndarray:
    """Accuracy of the project's logreg head (C on 5 inner folds) in `repeats` x `folds`-fold cross-validation."""
    from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold, cross_val_score

    from classifiers.heads import get_head

    spec = get_head("logreg")
    model = GridSearchCV(spec.build(0), spec.grid, cv=5)
    return cross_val_score(model, features.reshape(len(features), -1), labels,
                           cv=RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=0))


def int8_case(case: Case, sources, n: int | None, sizes: Sizes, work: Path, log, probe_repeats: int) -> dict:
    """float32 vs int8 on ONNX Runtime; with `probe_repeats`, the linear probe in that many 4-fold CVs."""
    import h5py

    from pipeline.extraction import extract

    data = sources.images if n is None else stage_images(sources.images, n, work / f"img8_{case.name}")
    cfg = config(case, sources, data, sizes, work).replace(engine="onnx")
    folder = work / f"engines8_{case.name}"
    outs = {p: str(work / f"{case.name}_{p}.h5") for p in ("float32", "int8")}
    start = time.perf_counter()
    extract(cfg.replace(precision="float32", out=outs["float32"]), verbose=False, engines=folder)  # exports
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    extract(cfg.replace(precision="int8", out=outs["int8"]), verbose=False, engines=folder)  # calibrates, quantizes
    quantize_s = time.perf_counter() - start
    rates: dict[str, list[float]] = {"float32": [], "int8": []}
    for r in range(sizes.steady_rounds):
        for precision in (["float32", "int8"] if r % 2 == 0 else ["int8", "float32"]):
            res = extract(cfg.replace(precision=precision, out=outs[precision]), verbose=False, engines=folder)
            rates[precision].append(loop_rate(res))
            log(f"int8: {case.name} round {r + 1} {precision}: {rates[precision][-1]:.1f} img/s")
    feats, labels = {}, None
    for precision, path in outs.items():
        with h5py.File(path) as f:
            layer = next(iter(f["features"]))
            feats[precision], labels = f[f"features/{layer}"][()], f["labels"][()]
    dev = deviation(feats["int8"], feats["float32"])
    best = {k: max(v) for k, v in rates.items()}
    row = {"model": f"{case.name} @{cfg.image_size}", "images": len(labels), "batch": sizes.batch_size,
           "float32_img_s": best["float32"], "int8_img_s": best["int8"],
           "int8_vs_float32": best["int8"] / best["float32"],
           "mean_rel_dev": float(dev.mean()), "max_rel_dev": float(dev.max()), "export_s": export_s,
           "calibrate_quantize_s": quantize_s}
    if probe_repeats:
        log(f"int8: {case.name}: linear probe, {probe_repeats} x 4-fold")
        acc = {p: probe(feats[p], labels, probe_repeats, 4) for p in feats}
        row.update({"probe_float32": float(acc["float32"].mean()), "probe_int8": float(acc["int8"].mean()),
                    "probe_diff": float(acc["int8"].mean() - acc["float32"].mean()),
                    "probe_sd": float(np.std(acc["int8"] - acc["float32"])),
                    "probe_folds": len(acc["int8"])})
    return row


VARIANTS = {"fixed: weights int8 per channel, 7-bit (reduce_range)": {},
            "weights int8 per channel, full 8-bit": {"reduce_range": False},
            "weights uint8 per channel, full 8-bit": {"weight_type": "QUInt8", "reduce_range": False}}


def session(path: Path, remove: bool = False):
    """An ONNX Runtime session set up as `features.engines.onnx_forward` sets it up; returns a forward pass.
    `remove`: `path` is a temporary graph, deleted once loaded."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    finally:
        if remove:
            path.unlink(missing_ok=True)
    name, sub = s.get_inputs()[0].name, s.get_inputs()[0].shape[0]
    return lambda pixels: np.concatenate([s.run(None, {name: pixels[i:i + sub]})[0]
                                          for i in range(0, len(pixels) - len(pixels) % sub, sub)])


def settings_case(sources, n: int | None, sizes: Sizes, work: Path, log) -> list[dict]:
    """Lite0 -> avg_pool: the quantization settings features/quantize.py fixes against the alternatives, on the same
    float export and calibration set: model-only rate (pre-decoded images, sessions alternating, fastest round),
    deviation from float32, linear probe."""
    from features.augment import file_loader
    from features.catalog import discover
    from features.engines import export_path
    from features.images import CROP_FRACTION  # Lite0's sidecar declares no other
    from features.quantize import DEFAULT_IMAGES, calibration, quantize
    from features.store import read_attrs
    from pipeline.extraction import extract

    lite0 = next(c for c in CASES if c.name == "lite0")
    data = sources.images if n is None else stage_images(sources.images, n, work / "img_settings")
    cfg = config(lite0, sources, data, sizes, work).replace(engine="onnx")
    folder = work / "engines_settings"
    res = extract(cfg.replace(out=str(work / "settings_f32.h5")), verbose=False, engines=folder)  # the float export
    export = export_path(folder, read_attrs(res.path))
    catalog = discover(data)
    load = file_loader(cfg.image_size, cfg.resize, CROP_FRACTION, "standard", 0, 0)
    pixels = np.stack([load(catalog.paths[i], catalog.source(i)) for i in range(len(catalog))])
    labels = np.array(catalog.labels)[: len(pixels) - len(pixels) % 16]
    calib = calibration(lambda: catalog, DEFAULT_IMAGES, cfg.image_size, cfg.resize, CROP_FRACTION, 2,
                        cfg.max_pixels)
    forwards = {"float32": session(export)}
    for label, variant in VARIANTS.items():
        log(f"settings: quantizing with {label}")
        forwards[label] = session(quantize(export, None, calib, variant), remove=True)
    outputs = {label: forward(pixels) for label, forward in forwards.items()}  # also the warm-up
    best = dict.fromkeys(forwards, float("inf"))
    for r in range(sizes.steady_rounds):
        for label in (list(forwards) if r % 2 == 0 else list(forwards)[::-1]):
            start = time.perf_counter()
            forwards[label](pixels)
            best[label] = min(best[label], time.perf_counter() - start)
    rows = []
    reference = probe(outputs["float32"], labels, sizes.probe_repeats, 4)
    for label in forwards:
        dev = deviation(outputs[label], outputs["float32"])
        acc = reference if label == "float32" else probe(outputs[label], labels, sizes.probe_repeats, 4)
        rows.append({"settings": label, "images": len(outputs[label]),
                     "model_only_img_s": len(outputs[label]) / best[label],
                     "vs_float32": best["float32"] / best[label], "mean_rel_dev": float(dev.mean()),
                     "max_rel_dev": float(dev.max()), "probe": float(acc.mean()),
                     "probe_diff": float(acc.mean() - reference.mean())})
        log(f"settings: {label}: {rows[-1]}")
    return rows


def table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]


def auto_rows(sizes: Sizes, sources, work: Path, log) -> list[dict]:
    return [auto_case(case, sources, sizes.engine_images[case.name], sizes, work, log)
            for case in CASES if case.name in sizes.engine_images]


def int8_rows(sizes: Sizes, sources, work: Path, log) -> list[dict]:
    """One row per model of `sizes.int8_images`; the first (Lite0 in a full run) with the linear probe."""
    cases = [case for case in CASES if case.name in sizes.int8_images]
    return [int8_case(case, sources, sizes.int8_images[case.name], sizes, work, log,
                      sizes.probe_repeats if i == 0 else 0) for i, case in enumerate(cases)]


def auto_met(rows: list[dict]) -> bool:
    return all(r["auto_vs_faster"] >= AUTO_TARGET for r in rows)


def int8_met(rows: list[dict]) -> bool:
    return all(r["int8_vs_float32"] >= INT8_TARGET and abs(r.get("probe_diff", 0.0)) <= PROBE_TOLERANCE for r in rows)


AUTO_TARGET_TEXT = f"auto's steady rate ≥ {AUTO_TARGET}× the faster explicit engine for every model"
INT8_TARGET_TEXT = (f"int8 ≥ {INT8_TARGET}× float32's steady rate (ONNX Runtime) for every model, the linear probe's "
                    f"accuracy within {PROBE_TOLERANCE} of float32's")


def section_engines(sizes: Sizes, sources, work: Path, log) -> Section:
    """Section 9 of `make bench`: auto against the explicit engines, int8 against float32 (issue 26)."""
    sec = Section(9, "Engines: `--engine auto` by measurement and `--precision int8` (in-process loop rates, fastest "
                     "of interleaved rounds)", f"{AUTO_TARGET_TEXT}; {INT8_TARGET_TEXT}", AUTO_COLUMNS)
    sec.rows = auto_rows(sizes, sources, work, log)
    int8 = int8_rows(sizes, sources, work, log)
    sec.extra_tables += [("int8 against float32 (ONNX Runtime); deviation per image ||int8 − float32|| / ||float32||",
                          INT8_COLUMNS, int8),
                         (f"Linear probe (logreg head, C on 5 inner folds) in {sizes.probe_repeats} × 4-fold CV on "
                          "both caches' features", PROBE_COLUMNS, int8[:1])]
    sec.met = auto_met(sec.rows) and int8_met(int8)
    sec.value = "; ".join([*(f"{r['model']}: auto {r['auto_vs_faster']:.2f}× the faster ({r['faster_explicit']})"
                             for r in sec.rows),
                           *(f"{r['model']}: int8 {r['int8_vs_float32']:.2f}× float32"
                             + (f", probe {r['probe_diff']:+.3f}" if "probe_diff" in r else "") for r in int8)])
    sec.notes += [*(f"{r['model']}: auto ran {r['auto_ran']} (`{r['reason']}`)" for r in sec.rows),
                  "How each figure is taken: benchmarks/engines.py's docstring; `python -m benchmarks.engines` also "
                  "compares the int8 settings (benchmarks/engines.md).", bf16_note()]
    return sec


def bf16_note() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        return ("bf16: this CPU has bfloat16 instructions; `--precision bf16` is not implemented yet, so nothing was "
                "measured (see docs/engines.md).")
    return ("bf16: skipped, this CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo), so bfloat16 would run "
            "emulated and cannot be faster than float32.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="auto,int8,settings",
                        help="auto,int8,settings (default) or some of them")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine or precision")
    parser.add_argument("--quick", action="store_true", help="tiny inputs: checks that the code runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "engines.md"))
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"auto", "int8", "settings"}:
        print(f"error: parts '{args.parts}' is not valid. Expected some of auto, int8, settings, comma-separated.",
              file=sys.stderr)
        return 2
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    facts = machine_facts()
    sources = find_sources(not args.quick)
    sizes = dataclasses.replace(Sizes.quick() if args.quick else Sizes.full(), steady_rounds=args.rounds)
    start = time.perf_counter()
    lines = ["# Engines: `auto` by measurement and `--precision int8` (issue 26)", "",
             f"Written by `{' '.join(['python -m benchmarks.engines', *(argv or sys.argv[1:])])}`"
             " (benchmarks/engines.py, whose docstring says how each figure is taken). Figures are fastest-of-rounds "
             "rates measured side by side in one process; on a shared machine only the ratios mean anything.", "",
             "| fact | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts.items()],
             f"| data | {sources.images} |", ""]
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as tmp:
        work = Path(tmp)
        if "auto" in parts:
            rows = auto_rows(sizes, sources, work, log)
            lines += ["## auto against the explicit engines", "",
                      f"Target: {AUTO_TARGET_TEXT}: **{'met' if auto_met(rows) else 'not met'}**.", "",
                      *table(AUTO_COLUMNS, rows), "", *[f"- {r['model']}: `{r['reason']}`" for r in rows], ""]
        if "int8" in parts:
            rows = int8_rows(sizes, sources, work, log)
            lines += ["## int8 against float32 (ONNX Runtime)", "",
                      f"Target: {INT8_TARGET_TEXT}: **{'met' if int8_met(rows) else 'not met'}**.", "",
                      *table(INT8_COLUMNS, rows), "",
                      "Linear probe (the first model's features, Lite0's in a full run; logreg head, repeated "
                      "4-fold cross-validation):", "",
                      *table(PROBE_COLUMNS, rows[:1]), "", f"- {bf16_note()}", ""]
        if "settings" in parts:
            rows = settings_case(sources, 16 if args.quick else None, sizes, work, log)
            lines += ["## int8 settings compared (Lite0 -> avg_pool, model only)", "",
                      "The same float export and calibration set quantized three ways; the first is what "
                      "`--precision int8` uses (features/quantize.py). Rates are ONNX Runtime's alone on pre-decoded "
                      "images (sessions alternating, fastest round); deviation and probe as above.", "",
                      *table(["settings", "images", "model_only_img_s", "vs_float32", "mean_rel_dev", "max_rel_dev",
                              "probe", "probe_diff"], rows), ""]
    lines += [f"Run time {time.perf_counter() - start:.0f} s; load average at end "
              f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
