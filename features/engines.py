"""Engines: what runs the forward pass of stage one. A registry (name -> builder); every builder returns a `Forward`.

All engines compute the same `Graph` (uint8 pixels -> preprocess -> cut model -> global pool -> storage dtype) on
batches of one fixed shape, so the batch-slot design of `features.extract` keeps every exactness guarantee within an
engine. `tf` runs it as a compiled TensorFlow function (the only engine for mixed precision and XLA, and the choice
on a GPU); `onnx` exports it once to ONNX and runs it with ONNX Runtime, 1.5-3.8x faster on CPU (docs/engines.md).
The export is kept under the hash of what determines it, beside the caches, so only the first run pays for it.
ONNX Runtime computes a batch in sub-batches whose largest activation fits ACTIVATION_BUDGET (`onnx_batch`).

`auto` decides by rule where one engine is the only one that implements an option or runs on a GPU (`engine_rule`);
on a CPU it times both engines on a few batches the first time a graph runs on a kind of machine and keeps the choice
beside the export (`measured_forward`), so later runs decide at once and every cache of that graph agrees. With
`--precision int8` the onnx engine runs the export quantized by ONNX Runtime (`features.quantize`), kept beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock

from features.errors import UsageError
from features.model import installed_version, pool_features
from features.schema import GRAPH, CacheAttrs

if TYPE_CHECKING:
    from features.quantize import Calibration

# uint8 pixels (batch, size, size, 3) -> one array per cut layer, (batch, *row_shape), in the storage dtype
Forward = Callable[[np.ndarray], list[np.ndarray]]

# Bytes of one layer's output for the images ONNX Runtime computes at once. Past it, a larger batch only slows the CPU
# down: extract of VGG19 -> block2_pool @256 (16 MiB per image) ran faster with batches of 8 than of 32 in each of 6
# interleaved rounds (by up to 33%), and with sub-batches of 8 in a batch of 32 about 5% faster than in one call
# (docs/engines.md); Lite0 (4.6 MiB) showed no difference.
ACTIVATION_BUDGET = 128 << 20


@dataclass(frozen=True)
class Graph:
    """The computation every engine runs: one fixed-shape batch of uint8 pixels in, one array per cut layer out."""

    build: Callable[[], object]  # returns the cut keras.Model, the same one each call; called only where TensorFlow
    #                              runs, so a kept ONNX export runs without building it (or importing TensorFlow)
    preprocess: Callable  # RGB float [0, 255] -> model input, in TensorFlow ops
    batch_size: int
    size: int
    pool: str = "none"
    dtype: str = "float32"
    int8: Calibration | None = None  # --precision int8: the onnx engine runs the export quantized on these images

    @property
    def model(self):
        import tensorflow as tf

        with tf.init_scope():  # built eagerly even when first used inside a trace, where weights would not be loaded
            return self.build()

    def __call__(self, pixels):
        import tensorflow as tf

        outs = self.model(self.preprocess(tf.cast(pixels, tf.float32)), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [tf.cast(pool_features(o, self.pool), self.dtype) for o in outs]

    def input_spec(self):
        import tensorflow as tf

        return tf.TensorSpec((self.batch_size, self.size, self.size, 3), tf.uint8)


@dataclass(frozen=True)
class EngineOptions:
    jit: bool = False  # tf: compile with XLA
    export: Path | None = None  # onnx: where the exported graph is kept (and a failure to export is noted)
    keep_export: bool = True  # False (random weights: each process has its own): export to a temporary file
    threads: int = 0  # onnx: intra-op threads; 0: the cores this process may use


def tf_forward(graph: Graph, options: EngineOptions) -> Forward:
    """One compiled TensorFlow call per batch (XLA with options.jit)."""
    import tensorflow as tf

    if graph.int8 is not None:
        raise UsageError("engine 'tf' does not implement --precision int8 (ONNX Runtime's quantization). "
                         "Use --engine onnx.")

    compiled = tf.function(graph, jit_compile=options.jit, autograph=False, input_signature=[graph.input_spec()])

    def forward(pixels: np.ndarray) -> list[np.ndarray]:
        return [o.numpy() for o in compiled(pixels)]

    return forward


def peak_activation_bytes(graph: Graph) -> int:
    """The largest float32 tensor the graph makes for one image, from a trace at batch 1 (every shape is known there,
    even for a model saved with free input sides); weights are not activations."""
    import tensorflow as tf

    one = dataclasses.replace(graph, batch_size=1)
    traced = tf.function(one, autograph=False).get_concrete_function(one.input_spec()).graph
    return 4 * max(out.shape.num_elements() for op in traced.get_operations()
                   if op.type not in ("ReadVariableOp", "VarHandleOp", "Const") for out in op.outputs
                   if out.shape.is_fully_defined())


def onnx_batch(graph: Graph) -> int:
    """The images ONNX Runtime computes at once: the largest divisor of the batch whose largest activation fits
    ACTIVATION_BUDGET. Each slot of a batch still lands in the same place of the same sub-batch every run."""
    peak = peak_activation_bytes(graph)
    fits = [d for d in range(1, graph.batch_size + 1) if graph.batch_size % d == 0 and d * peak <= ACTIVATION_BUDGET]
    return max(fits, default=1)


def onnx_forward(graph: Graph, options: EngineOptions) -> Forward:
    """ONNX Runtime on the exported graph (exported now unless kept from an earlier run): fixed sub-batch shape, fixed
    threads, so a batch slot's result is the same in every process on the same machine."""
    import onnxruntime as ort

    keep = options.keep_export and options.export is not None
    path = (int8_graph(graph, options, keep) if graph.int8 is not None else
            options.export if keep and options.export.exists() else
            export_onnx(dataclasses.replace(graph, batch_size=onnx_batch(graph)), options.export if keep else None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]  # onnxruntime-gpu
    try:
        session = ort.InferenceSession(str(path), so, providers=providers + ["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime raises its own Fail/InvalidGraph types
        raise UsageError(f"{path} cannot be loaded by ONNX Runtime ({str(err).splitlines()[0][:200]}); "
                         "delete it to export the model again.") from None
    finally:
        if not keep:
            path.unlink(missing_ok=True)
    name, sub = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]  # a kept export: its own sub-batch
    if not isinstance(sub, int) or graph.batch_size % sub:
        raise UsageError(f"{path} computes batches of {sub}, which do not divide the batch size {graph.batch_size}; "
                         "delete it to export the model again.")

    def forward(pixels: np.ndarray) -> list[np.ndarray]:
        parts = [session.run(None, {name: pixels[i : i + sub]}) for i in range(0, len(pixels), sub)]
        return parts[0] if len(parts) == 1 else [np.concatenate(outs) for outs in zip(*parts)]

    return forward


def int8_graph(graph: Graph, options: EngineOptions, keep: bool) -> Path:
    """The export quantized on graph.int8's images: kept beside the float export under its own hash
    (`features.quantize.quantized_path`), made now from the float export (kept, or exported now) when absent."""
    from features.quantize import quantize, quantized_path

    target = quantized_path(options.export, graph.int8.identity) if options.export is not None else None
    if keep and target.exists():
        return target
    floating = (options.export if keep and options.export.exists() else
                export_onnx(dataclasses.replace(graph, batch_size=onnx_batch(graph), int8=None),
                            options.export if keep else None))
    try:
        return quantize(floating, target if keep else None, graph.int8)
    finally:
        if not keep:
            floating.unlink(missing_ok=True)


ENGINES: dict[str, Callable[[Graph, EngineOptions], Forward]] = {"tf": tf_forward, "onnx": onnx_forward}
AUTO = "auto"  # `engine_rule`'s answer where only a measurement can decide (CPU, no option that one engine owns)
ENGINE_CHOICES = (AUTO, *ENGINES)
PRECISIONS = ("float32", "mixed", "int8")
TF_ONLY = {"precision": "mixed", "jit": True}  # options that only the tf engine implements
ONNX_ONLY = {"precision": "int8"}  # options that only the onnx engine implements (ONNX Runtime's quantization)


def reduced_precision(precision: str, calibration: str = "") -> str | None:
    """The warning that features were computed in reduced precision (`PRECISIONS` other than
    float32), said wherever a person looks (extract summary, report.html's first screen, report.md, classify summary):
    such features differ from float32 ones, and a model trained on them predicts well only on features made alike.
    None for full precision. A cache does not record its own deviation; the figure is the one docs/engines.md
    measured."""
    if precision == "int8":
        return (f"int8: REDUCED-PRECISION features (ONNX Runtime static quantization, calibrated on "
                f"{calibration.rsplit(':K=', 1)[-1]} images, {calibration[:15]}…); on the models measured they "
                "differ from float32 features by 2-21% (mean relative deviation; docs/engines.md)")
    if precision == "mixed":
        return "mixed: REDUCED-PRECISION features (float16 compute)"
    return None


# auto on a CPU: both engines are timed once per graph and kind of machine, on synthetic batches of the run's shape
# (one untimed call each, then rounds of one call each in alternating order, the fastest call counting), only for runs
# of at least MEASURE_MIN_BATCHES batches: the timing costs about 5 batches' compute, once; a shorter run follows the
# rule (onnx) and keeps nothing. Shards never time (one extraction's shards must agree): they follow a kept choice or
# the rule.
MEASURE_MIN_BATCHES = 32
MEASURE_ROUNDS = (2, 5)  # at least, at most
MEASURE_BUDGET_S = 3.0  # timed seconds after which no round past the minimum starts
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")  # /proc/cpuinfo flags that change which engine's kernels are fastest
clock = time.perf_counter  # what `measure` times with (tests replace it)


class ExportError(RuntimeError):
    """The graph could not be converted to ONNX (an operation the converter does not support)."""


@functools.cache
def _convert_erfc() -> None:
    """Teach tf2onnx TensorFlow's Erfc (as 1 - Erf), which it lacks: the exact GELU of Keras 3 on TensorFlow computes
    with it, so vision transformers (KerasHub's ViT, DINOv2) would otherwise export an invalid graph."""
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):  # Erf is an ONNX operation from opset 9
            node.type = "Erf"
            one = ctx.make_const(utils.make_name("erfc_one"),
                                 np.array(1, utils.map_onnx_to_numpy_type(ctx.get_dtype(node.output[0]))))
            minus = ctx.insert_new_node_on_output("Sub", node.output[0], inputs=[one.output[0], node.output[0]])
            ctx.copy_shape(node.output[0], minus.output[0])


def export_onnx(graph: Graph, path: Path | None) -> Path:
    """Write `graph` as ONNX to `path` (atomically: a temporary file renamed into place), or to a temporary file when
    `path` is None. Raises ExportError with the converter's first line when the graph does not convert."""
    import keras

    class Wrapped(keras.Model):
        """Keras' exporter takes a Model; this one is the whole graph, preprocessing and pooling included."""

        def __init__(self):
            super().__init__(name="extract_graph")
            self.cut = graph.model
            self.built = True

        def call(self, pixels):
            return graph(pixels)

    folder = path.parent if path else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=folder)
    os.close(fd)
    _convert_erfc()
    try:
        with warnings.catch_warnings():  # Keras' numpy-2 patch of tf2onnx touches np.object
            warnings.simplefilter("ignore", FutureWarning)
            Wrapped().export(tmp, format="onnx", input_signature=[graph.input_spec()], verbose=False)
    except Exception as err:  # tf2onnx raises plain exceptions for unsupported operations
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
    if path is None:
        return Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the shared cache folder's exports private
    os.replace(tmp, path)
    return path


def export_versions() -> dict[str, str]:
    """The converter and runtime versions an exported graph and an onnx cache record."""
    return {f"{name}_version": installed_version(name) for name in ("onnxruntime", "tf2onnx", "onnx")}


def export_path(folder: Path, attrs: CacheAttrs) -> Path:
    """<folder>/<hash>.onnx, the hash over what determines the graph (the schema's `graph` attributes, the converter
    versions and the activation budget that sets its sub-batch)."""
    identity = attrs.compared(GRAPH)  # a user's model file by its hash: predict spells its path otherwise
    identity.update({k: v for k, v in export_versions().items() if k != "onnxruntime_version"})
    identity["activation_budget"] = ACTIVATION_BUDGET  # decides the exported sub-batch
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return folder / f"{digest}.onnx"


def unsupported_marker(path: Path) -> Path:
    """Beside an export that failed: the reason, so `auto` chooses tf at once next time (and the cache agrees)."""
    return path.with_suffix(".unsupported")


def _given(options: dict, precision: str, jit: bool) -> list[str]:
    """Which of `options` (TF_ONLY, ONNX_ONLY) the run asks for, as flags."""
    return [f"--{k} {v}" if v is not True else f"--{k}" for k, v in options.items()
            if {"precision": precision, "jit": jit}[k] == v]


def check_engine(name: str, precision: str, jit: bool) -> None:
    """Refuse, in one line, an engine name that is not one, and options no single engine implements."""
    if name not in ENGINE_CHOICES:
        raise UsageError(f"engine '{name}' is not valid. Expected one of: {', '.join(ENGINE_CHOICES)}.")
    tf_only, onnx_only = _given(TF_ONLY, precision, jit), _given(ONNX_ONLY, precision, jit)
    if tf_only and onnx_only:
        raise UsageError(f"{' and '.join(onnx_only)} runs on ONNX Runtime, {' and '.join(tf_only)} on TensorFlow: no "
                         f"engine implements both. Drop {' and '.join(tf_only)}.")
    if name == "onnx" and tf_only:
        raise UsageError(f"engine '{name}' does not implement {' and '.join(tf_only)}. Use --engine tf, or drop "
                         f"{' and '.join(tf_only)}.")
    if name == "tf" and onnx_only:
        raise UsageError(f"engine 'tf' does not implement {' and '.join(onnx_only)} (ONNX Runtime's static "
                         f"quantization). Use --engine onnx or auto, or drop {' and '.join(onnx_only)}.")


def engine_rule(name: str, precision: str, jit: bool, gpus: int, export: Path | None,
                onnx_file: bool = False) -> tuple[str, str]:
    """(engine, why) decided without running anything: an explicit name; for auto, ONNX Runtime for a user's `.onnx`
    backbone (`onnx_file`: the only engine that runs it), the engine that alone implements an option, TensorFlow on a
    GPU or for a graph known not to export; else AUTO (a measurement decides, see `measured_forward`) with no reason
    yet."""
    check_engine(name, precision, jit)
    if name != AUTO:
        return name, f"requested: --engine {name}"
    if onnx_file:
        return "onnx", "rule: an ONNX file as the backbone runs on ONNX Runtime only"
    tf_only, onnx_only = _given(TF_ONLY, precision, jit), _given(ONNX_ONLY, precision, jit)
    if onnx_only:
        return "onnx", f"rule: {' and '.join(onnx_only)} runs on ONNX Runtime"
    if tf_only:
        return "tf", f"rule: {' and '.join(tf_only)} {'runs' if len(tf_only) == 1 else 'run'} on TensorFlow"
    if gpus:
        return "tf", "rule: a GPU is present (TensorFlow)"
    if export is not None and unsupported_marker(export).exists():
        return "tf", f"rule: this graph does not export to ONNX ({unsupported_marker(export).name})"
    return AUTO, ""


def resolve_engine(name: str, precision: str, jit: bool, gpus: int, export: Path | None) -> str:
    """`engine_rule`'s engine, onnx where only a measurement could decide (what auto picks without timing)."""
    engine = engine_rule(name, precision, jit, gpus, export)[0]
    return "onnx" if engine == AUTO else engine


def engine_fits(engine: str, precision: str, jit: bool) -> bool:
    """Whether `engine` implements the options (a cache's recorded engine is kept only where it does)."""
    return engine in ENGINES and not (_given(TF_ONLY, precision, jit) and engine != "tf") and \
        not (_given(ONNX_ONLY, precision, jit) and engine != "onnx")


def cpu_facts() -> dict[str, object]:
    """What an engine choice is kept for: the CPU model, the cores this process may use, the instruction sets that
    change which kernels are fastest, and the runtime versions (the graph's own hash covers the converters)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not flags:
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "isa": [f for f in ISA_FLAGS if f in flags],
            "onnxruntime": installed_version("onnxruntime"), "tensorflow": installed_version("tensorflow")}


def cpu_words(facts: dict[str, object]) -> str:
    return f"{facts['cpu']} ({facts['cores']} cores{', ' if facts['isa'] else ''}{' '.join(facts['isa'])})"


def choice_path(export: Path) -> Path:
    """<export stem>.cpu-<hash of cpu_facts>.choice.json: one kept choice per graph and kind of machine, so machines
    sharing a cache folder do not overwrite each other's."""
    key = hashlib.sha256(json.dumps(cpu_facts(), sort_keys=True).encode()).hexdigest()[:12]
    return export.with_name(f"{export.stem}.cpu-{key}.choice.json")


def kept_choice(export: Path | None) -> tuple[str, str] | None:
    """(engine, why) kept by an earlier measurement of this graph on this kind of machine, or None."""
    if export is None:
        return None
    try:
        record = json.loads(choice_path(export).read_text())
        engine, reason = record["engine"], record["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (engine, reason) if engine in ENGINES and isinstance(reason, str) else None


def worth_timing(images: int, batch_size: int) -> bool:
    """Whether a run of `images` is long enough to time both engines (about 5 batches' compute) for auto."""
    return images >= MEASURE_MIN_BATCHES * batch_size


def measure(forwards: dict[str, Forward], pixels: np.ndarray) -> dict[str, float]:
    """Images per second of each forward pass on `pixels`: one untimed call each (TensorFlow compiles, ONNX Runtime
    allocates), then rounds of one call each, the order alternating, MEASURE_ROUNDS[0] of them and more while the
    timed calls took under MEASURE_BUDGET_S (at most MEASURE_ROUNDS[1]); the fastest call of each counts."""
    for forward in forwards.values():
        forward(pixels)
    names, best, spent, rounds = list(forwards), dict.fromkeys(forwards, float("inf")), 0.0, 0
    while rounds < MEASURE_ROUNDS[0] or (rounds < MEASURE_ROUNDS[1] and spent < MEASURE_BUDGET_S):
        for name in names if rounds % 2 == 0 else names[::-1]:
            start = clock()
            forwards[name](pixels)
            took = clock() - start
            best[name], spent = min(best[name], took), spent + took
        rounds += 1
    return {name: len(pixels) / max(seconds, 1e-9) for name, seconds in best.items()}


def measured_forward(graph: Graph, options: EngineOptions, note: Callable[[str], None]) -> tuple[Forward, str, str]:
    """auto on a CPU: the forward pass of the faster engine on this graph and machine, the engine and why. Timed once
    and kept as `choice_path(options.export)` (under a lock, so concurrent runs time once and agree); a kept choice is
    used at once."""
    path = choice_path(options.export) if options.export is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))) if path is not None else nullcontext():
        kept = kept_choice(options.export)
        if kept is not None:
            forward, engine, fallback = build_forward(AUTO, kept[0], graph, options, note)
            return forward, engine, fallback or kept[1]
        try:
            forwards = {"onnx": ENGINES["onnx"](graph, options)}
        except ExportError as err:
            return _fall_back(err, AUTO, graph, options, note)
        forwards["tf"] = ENGINES["tf"](graph, options)
        pixels = np.random.default_rng(0).integers(0, 256, (graph.batch_size, graph.size, graph.size, 3), np.uint8)
        rates = measure(forwards, pixels)
        engine = max(rates, key=rates.get)
        facts = cpu_facts()
        reason = ("measured: " + ", ".join(f"{name} {rates[name]:.1f} img/s" for name in sorted(rates, key=rates.get,
                                                                                               reverse=True))
                  + f" on {cpu_words(facts)}")
        if path is not None:
            record = {"engine": engine, "reason": reason, "img_s": rates, "batch_size": graph.batch_size,
                      "graph": options.export.name, **facts}
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, path)
        note(f"auto: {reason}; running {engine}" + (f" (kept in {path})" if path is not None else ""))
    return forwards[engine], engine, reason


def _fall_back(err: ExportError, requested: str, graph: Graph, options: EngineOptions,
               note: Callable[[str], None]) -> tuple[Forward, str, str]:
    """The graph does not export to ONNX: mark it, so auto chooses tf at once next time; an explicit --engine onnx
    (or --precision int8, which needs the export) is a one-line error, auto falls back to tf."""
    if options.export is not None:
        options.export.parent.mkdir(parents=True, exist_ok=True)
        unsupported_marker(options.export).write_text(f"{err}\n")
    if requested != AUTO or graph.int8 is not None:
        raise UsageError(f"engine 'onnx': this model does not export to ONNX ({err}). "
                         + ("Use --engine tf." if graph.int8 is None else "Drop --precision int8 and use --engine tf."))
    note(f"note: this model does not export to ONNX ({err}); running it with TensorFlow (--engine tf).")
    return ENGINES["tf"](graph, options), "tf", f"fallback: this graph does not export to ONNX ({err})"


def build_forward(requested: str, engine: str, graph: Graph, options: EngineOptions,
                  note: Callable[[str], None] = print) -> tuple[Forward, str, str | None]:
    """The forward pass of `engine` (`requested` resolved by `engine_rule`; AUTO: measured here), the engine that runs
    it, and why where that was decided here (a measurement, a fallback; else None): when the graph does not export to
    ONNX, an explicit --engine onnx is a one-line error and auto falls back to tf."""
    if engine == AUTO:
        return measured_forward(graph, options, note)
    try:
        return ENGINES[engine](graph, options), engine, None
    except ExportError as err:
        return _fall_back(err, requested, graph, options, note)
