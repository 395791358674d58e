"""Stage one, orchestrated: resolve the configuration, decide whether a cache is reused, resumed or written, run it.

The machinery (compiled forward pass, decode -> model -> write loop) is `features.extract`; this module computes
nothing itself: it turns an ExtractConfig into a plan and the plan into a call.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from features import onnx_backbone
from features.augment import get_policy
from features.backbones import BackboneSpec, get_backbone, sha256_file
from features.catalog import Catalog, discover, manifest_source, read_manifest
from features.engines import (AUTO, ENGINE_CHOICES, MEASURE_MIN_BATCHES, PRECISIONS, EngineOptions, Graph,
                              build_forward, check_engine, engine_fits, engine_rule, export_path, export_versions,
                              kept_choice, worth_timing)
from features.errors import UsageError, check_name_lengths
from features.extract import Decoding, Timings, extract_rows
from features.images import DECODER, INTERPOLATION, RESIZE_POLICIES
from features.model import POOLS, build_base, cut, gpu_count, runtime_versions, weights_identity
from features.quantize import Calibration, calibration, check_identity, quantized_path
from features.schema import UPDATABLE, CacheAttrs, ConfigMismatch, identity_diff, names
from features.store import (COMPRESSIONS, STORAGE_DTYPES, CacheWriter, Progress, check_ours, discard_partial,
                            existing_cache, open_cache, partial_path, progress_path, read_attrs)
from features.tars import KEPT_FOLDER
from features.update import assemble, computed_rows, reusable_rows, update_path, write_linked
from pipeline import quiet
from pipeline.config import ExtractConfig, default_out, out_folder, shard_out

SHARD_ENV = [("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("JOB_COMPLETION_INDEX", "JOB_COMPLETION_COUNT")]


@dataclass
class ExtractResult:
    path: Path
    status: str  # written | resumed | updated | up-to-date
    images: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    processed: int = 0  # images pushed through the model in this run
    engine: str = ""  # what ran the model: tf | onnx
    reused: int = 0  # rows kept from the earlier cache by an update


def parse_shard(value: str | None, env: dict | None = None) -> tuple[int, int] | None:
    """'I/N' from the flag, else from a job array's environment, else None (the whole set)."""
    env = os.environ if env is None else env
    source, fix = "", "Pass --shard I/N"
    if value is None:
        for idx, count in SHARD_ENV:
            if env.get(idx) is not None and env.get(count):
                value = f"{env[idx]}/{env[count]}"
                source = f" (from the environment: {idx}={env[idx]!r}, {count}={env[count]!r})"
                fix = f"Unset {idx}/{count} or pass --shard I/N explicitly"
                break
        else:
            return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        index, count = 0, 0
    if not 0 <= index < count:
        raise UsageError(f"shard '{value}'{source} is not valid. Expected 'I/N' with 0 <= I < N, e.g. 0/4. {fix}.")
    return index, count


def shard_range(value: str | None) -> list[str | None]:
    """The shards one command runs, one after the other: `A-B/N` (a job array task that runs several, see
    pipeline/slurm.py) is A/N .. B/N, its end cut at the last shard N-1; any other value is itself (parse_shard checks
    it)."""
    found = re.fullmatch(r"(\d+)-(\d+)/(\d+)", value or "")
    if not found:
        return [value]
    first, last, count = (int(v) for v in found.groups())
    if not first <= last or not first < count:
        raise UsageError(f"shard '{value}' is not valid. Expected 'A-B/N' with A <= B and A < N (shards A to B of N), "
                         "or 'I/N'.")
    return [f"{i}/{count}" for i in range(first, min(last, count - 1) + 1)]


def check_out_file(out: str | Path, flag: str = "--out") -> None:
    """Refuse an output path that is a folder, whose folder cannot be written, or whose name (or a hidden name the
    store derives from it) is too long for its filesystem, before any model is built.

    The nearest existing folder is probed with a real temporary file, the only test that also holds for root,
    read-only mounts and network filesystems.
    """
    path = Path(out)
    # the longest derived name: the progress record of an update's scratch cache (.X.h5.update.partial.progress.json)
    check_name_lengths(flag, out, [partial_path(path), progress_path(path), progress_path(update_path(path))])
    if path.is_dir():
        raise UsageError(f"{flag} '{out}' is a folder. Expected a file path such as {path / 'features.h5'}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} '{out}': '{folder}' is a file, not a folder. Choose another {flag}.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{flag} '{out}' cannot be written: the folder '{folder}' is not writable "
                         f"({err.strerror}). Choose another {flag} or fix the folder's permissions.") from None


def validate(cfg: ExtractConfig) -> None:
    """Check every closed-set option before any model is built or image read."""
    for name, value, valid in [("pool", cfg.pool, POOLS), ("dtype", cfg.dtype, STORAGE_DTYPES),
                               ("resize", cfg.resize, tuple(RESIZE_POLICIES)),
                               ("compression", cfg.compression, COMPRESSIONS),
                               ("precision", cfg.precision, PRECISIONS),
                               ("engine", cfg.engine, ENGINE_CHOICES)]:
        if value not in valid:
            raise UsageError(f"{name} '{value}' is not valid. Expected one of: {', '.join(valid)}.")
    check_engine(cfg.engine, cfg.precision, cfg.jit)  # e.g. --engine tf --precision int8
    if cfg.calibration_images < 1:
        raise UsageError(f"calibration-images {cfg.calibration_images} is not valid. Expected the number of images "
                         "of DATA an int8 graph is calibrated on (>= 1).")
    check_identity(cfg.calibration)
    if cfg.batch_size < 1:
        raise UsageError(f"batch-size {cfg.batch_size} is not valid. Expected a positive integer.")
    if cfg.augment < 0:
        raise UsageError(f"augment {cfg.augment} is not valid. Expected the number of augmented views per training "
                         "image (0 = none).")
    if cfg.augment:
        get_policy(cfg.augment_policy)
    if cfg.workers < 0:
        raise UsageError(f"workers {cfg.workers} is not valid. Expected the number of image-decoding threads "
                         "(>= 1), or 0 for one per CPU core.")
    if cfg.out:
        check_out_file(cfg.out)
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UsageError(f"image-size {cfg.image_size} is not valid. Expected a side length in pixels (>= 8).")
    if cfg.max_pixels < 1:
        raise UsageError(f"max-pixels {cfg.max_pixels} is not valid. Expected the largest image to decode, in pixels "
                         f"(width x height, >= 1); the default is {ExtractConfig.max_pixels}.")


def plan_attrs(cfg: ExtractConfig, spec: BackboneSpec, catalog: Catalog, size: int, layers: list[str],
               shard: tuple[int, int] | None, fingerprint: str) -> CacheAttrs:
    """`fingerprint` is the whole input set's, also in a shard, so that `merge` can tell shards of one extraction.
    The engine is resolved afterwards (`engine_attrs`)."""
    from pipeline import __version__

    return CacheAttrs(
        backbone=cfg.backbone,
        backbone_file_sha256=sha256_file(spec.file) if spec.file else "",
        weights=weights_identity(spec, cfg.weights),
        weights_source=cfg.weights,
        image_size=size,
        resize=cfg.resize,
        crop_fraction=spec.crop_fraction,
        interpolation=INTERPOLATION,
        decoder=DECODER,
        preprocessing=spec.preprocess.description,
        color="RGB",
        pool=cfg.pool,
        dtype=cfg.dtype,
        compression=cfg.compression,
        precision=cfg.precision,
        engine=cfg.engine,
        batch_size=cfg.batch_size,
        layers=list(layers),
        augment=cfg.augment,
        augment_policy=cfg.augment_policy if cfg.augment else "",
        augment_seed=cfg.seed if cfg.augment else 0,
        max_pixels=cfg.max_pixels,
        data_root=str(catalog.root.resolve()),
        layout=catalog.layout,
        labels_csv=cfg.labels or "",
        source_fingerprint=fingerprint,
        shard=f"{shard[0]}/{shard[1]}" if shard else "",
        num_candidates=len(catalog),
        config_json=json.dumps(dataclasses.asdict(cfg.replace(manifest=None))),  # the listing, not the data
        tool_version=__version__,
        **runtime_versions(),
    )


@contextmanager
def ticking(what: str, show: bool = True) -> Iterator[None]:
    """One line `what: <elapsed>` that counts the seconds while a long step with no progress of its own runs (the
    ONNX export takes ~20 s), so a wait is never silent; TensorFlow's log lines from that step are filtered as at its
    import (pipeline/quiet.py), and the line is drawn on the terminal's stderr, past that filter."""
    with ExitStack() as stack:
        terminal = stack.enter_context(os.fdopen(os.dup(2), "w")) if show else None
        stack.enter_context(quiet.filtered_stderr())
        if show:
            done = threading.Event()
            bar = stack.enter_context(tqdm(desc=what, bar_format="{desc}: {elapsed}", total=None, file=terminal))
            ticker = threading.Thread(target=lambda: [bar.refresh() for _ in iter(lambda: done.wait(0.5), True)],
                                      daemon=True)
            ticker.start()
            stack.callback(ticker.join)
            stack.callback(done.set)
        yield


def engine_attrs(attrs: CacheAttrs, engine: str, reason: str | None = None) -> CacheAttrs:
    """`attrs` with the engine that runs (an identity attribute), why where `reason` is given (else as resolved) and,
    for onnx, the runtime and converter versions (no converter for a user's .onnx file: it runs as it is)."""
    versions = export_versions() if engine == "onnx" else dict.fromkeys(export_versions(), "")
    if Path(attrs.backbone).suffix == ".onnx":
        versions["tf2onnx_version"] = ""
    return dataclasses.replace(attrs, engine=engine, **versions, **({"engine_reason": reason} if reason else {}))


def recorded_attrs(out: Path) -> CacheAttrs | None:
    """The attributes of the cache at `out`, else of its partial file (None when neither is there or readable): the
    engine and calibration that a confirmation, an update or a resume of it keeps."""
    try:
        found = existing_cache(out)
    except UsageError:  # refused with its own message by `_existing`
        found = None
    if found is None and partial_path(out).exists():
        found = read_attrs(partial_path(out))
    return found


def resolve_run(cfg: ExtractConfig, attrs: CacheAttrs, export: Path, recorded: CacheAttrs | None, sharded: bool,
                candidates: int, whole: Callable[[], Catalog], onnx_file: bool = False
                ) -> tuple[CacheAttrs, Calibration | None]:
    """`attrs` with the engine and why, and the int8 calibration (None for other precisions).

    The engine: `engine_rule`'s; under auto, the engine of a cache being continued (`recorded`) with its reason, else
    a choice kept by an earlier measurement of this graph on this kind of machine, else the rule (onnx) for a shard or
    a run of fewer than MEASURE_MIN_BATCHES batches, else AUTO: timed when the forward pass is built (`_compute`).
    The calibration: the given one, else the continued cache's (same K), else K images of the whole set (`whole()`).
    """
    engine, reason = engine_rule(cfg.engine, cfg.precision, cfg.jit, gpu_count(), export, onnx_file)
    if cfg.engine == AUTO and recorded is not None and engine_fits(recorded.engine, cfg.precision, cfg.jit):
        engine = recorded.engine
        reason = recorded.engine_reason or f"recorded: the cache was written with {engine} before reasons were kept"
    elif engine == AUTO:
        untimed = sharded or not worth_timing(candidates, cfg.batch_size)  # one reason: a merge equals a whole run
        engine, reason = kept_choice(export) or (
            ("onnx", f"rule: ONNX Runtime on a CPU (untimed: shards, whose engines must agree, and runs under "
                     f"{MEASURE_MIN_BATCHES} batches do not time the engines)") if untimed else (AUTO, ""))
    calib = None
    if cfg.precision == "int8":
        identity = cfg.calibration
        if not identity and recorded is not None and recorded.precision == "int8" and \
                recorded.calibration.endswith(f":K={cfg.calibration_images}"):
            identity = recorded.calibration  # an update keeps the graph its rows were computed with
        calib = calibration(whole, cfg.calibration_images, attrs.image_size, cfg.resize, attrs.crop_fraction,
                            cfg.workers or len(os.sched_getaffinity(0)), cfg.max_pixels, identity)
        settings = {**json.loads(attrs.config_json), "calibration": calib.identity}  # predict reuses this graph
        attrs = dataclasses.replace(attrs, calibration=calib.identity, config_json=json.dumps(settings))
    return dataclasses.replace(attrs, engine=engine, engine_reason=reason), calib


def extract(cfg: ExtractConfig, verbose: bool = True, engines: Path | None = None) -> ExtractResult:
    """Write (or resume, update, or confirm) the cache that `cfg` describes and return where it is. ONNX exports are
    kept in `engines` (default: engines/ beside the cache), named by the graph, so one is never exported twice."""
    validate(cfg)
    shard = parse_shard(cfg.shard)
    if cfg.manifest:  # listed once at submit time: read this shard's rows, stat only its files (no walk of DATA)
        catalog, fingerprint = read_manifest(cfg.manifest, shard, manifest_source(
            cfg.data, cfg.labels, cfg.path_column, cfg.label_column, cfg.augment))
    else:
        kept = out_folder(cfg) / KEPT_FOLDER  # the shards' indexes, beside the caches
        full = discover(cfg.data, cfg.labels, cfg.path_column, cfg.label_column, kept).with_views(cfg.augment)
        catalog, fingerprint = full.shard(*shard) if shard else full, full.fingerprint()
    for note in catalog.notes if verbose else ():
        print(f"note: {note}")
    spec = get_backbone(cfg.backbone, cfg.preprocess)
    if spec.onnx:  # a user's ONNX graph: ONNX Runtime only (`engine_rule`), cut at its tensors (features/onnx_backbone.py)
        onnx_backbone.check_options(spec, cfg.engine, cfg.precision, cfg.jit, cfg.weights)
    size = cfg.image_size or spec.input_size
    base = None  # built only when needed (see cut_model)
    layers = cfg.layer or ([spec.default_layer] if spec.default_layer else [])
    if spec.onnx:
        layers = onnx_backbone.resolve_layers(spec, layers, size)
    compute = "mixed" if cfg.precision == "mixed" else "float32"  # int8 quantizes the float32 graph
    if not layers:
        base = build_base(spec, cfg.weights, size, compute)
        layers = [base.layers[-1].name]
    out = shard_out(Path(cfg.out), shard) if cfg.out else default_out(cfg, layers, shard)
    attrs = plan_attrs(cfg, spec, catalog, size, layers, shard, fingerprint)
    export = export_path(engines or out.parent / "engines", attrs)  # the ONNX graph, kept beside the caches

    def whole() -> Catalog:  # every shard's candidates: where int8 calibration images are chosen
        if shard is None:
            return catalog
        return read_manifest(cfg.manifest, None, manifest_source(cfg.data, cfg.labels, cfg.path_column,
                                                                 cfg.label_column, cfg.augment))[0] \
            if cfg.manifest else full

    attrs, calib = resolve_run(cfg, attrs, export, None if cfg.overwrite else recorded_attrs(out), shard is not None,
                               len(catalog), whole, spec.onnx)

    @functools.cache
    def cut_model():  # built on first use: never for a complete cache, nor to run a kept ONNX export
        return cut(base or build_base(spec, cfg.weights, size, compute), layers)

    graph = Graph(cut_model, spec.preprocess.fn, cfg.batch_size, size, cfg.pool, cfg.dtype, calib)

    state = _existing(out, attrs, cfg.overwrite)
    if state == "complete":
        if verbose:
            print(f"up to date: {out} is complete for this configuration and these {len(catalog)} files; nothing to do "
                  "(--overwrite rebuilds it).")
        return ExtractResult(out, "up-to-date")
    if spec.onnx:  # the graph that runs, kept as `export`: onnx_forward runs it as a kept export of a Keras model
        onnx_backbone.prepare(spec, layers, size, cfg.batch_size, cfg.pool, cfg.dtype, export)
    if state == "update":
        return _update(cfg, out, attrs, catalog, graph, export, verbose)
    result = _compute(cfg, out, attrs, catalog, state, graph, export, verbose)
    if result.images == 0:  # nothing was published (CacheWriter.finalize): an earlier cache at `out` stays
        raise UsageError(f"none of the {len(catalog)} files under '{cfg.data}' could be used: "
                         + "; ".join(f"{p}: {r}" for p, r in result.skipped[:5]))
    return result


def _compute(cfg: ExtractConfig, out: Path, attrs: CacheAttrs, catalog: Catalog, progress: Progress | None,
             graph: Graph, export: Path, verbose: bool) -> ExtractResult:
    """Push `catalog` through the model into `out`: a new cache, or the rest of an interrupted one (`progress`)."""
    if cfg.precision == "mixed" and verbose and not gpu_count():
        print("warning: --precision mixed without a GPU computes float16 in software (several times slower on CPU).")
    quantized = graph.int8 is not None and quantized_path(export, graph.int8.identity).exists()
    steps = [f"exporting the model to ONNX once (kept as {export})" if cfg.weights != "none" else
             "exporting the model to ONNX (random weights: not kept)"] \
        if attrs.engine in ("onnx", AUTO) and not export.exists() and not quantized else []
    steps += [f"quantizing it to int8 on {cfg.calibration_images} images"] if graph.int8 and not quantized else []
    steps += ["timing ONNX Runtime and TensorFlow (once per graph and CPU)"] if attrs.engine == AUTO else []
    with ticking("; ".join(steps), verbose and bool(steps)):
        forward, engine, reason = build_forward(cfg.engine, attrs.engine, graph,
                                                EngineOptions(cfg.jit, export, keep_export=cfg.weights != "none"),
                                                note=tqdm.write if verbose else lambda _: None)
    attrs = engine_attrs(attrs, engine, reason)  # auto: measured now, or fallen back to tf (the graph does not export)
    size = attrs.image_size
    shapes = {n: tuple(o.shape[1:])
              for n, o in zip(attrs.layers, forward(np.zeros((cfg.batch_size, size, size, 3), "uint8")))}
    if progress is None:
        writer, status = CacheWriter.create(out, attrs, shapes, catalog.paths, catalog.label_names), "written"
        progress = Progress(skipped=[list(item) for item in catalog.ignored])
    else:
        writer, status = CacheWriter.reopen(out), "resumed"
    decoding = Decoding(size, cfg.resize, cfg.augment_policy, cfg.seed, cfg.workers or len(os.sched_getaffinity(0)),
                        cfg.max_pixels, attrs.crop_fraction)
    try:
        processed, timings = extract_rows(catalog, forward, writer, progress, cfg.batch_size, decoding, verbose)
    finally:
        writer.close()
    return ExtractResult(out, status, progress.rows_written, progress.skipped, shapes, timings, processed, engine)


def _update(cfg: ExtractConfig, out: Path, attrs: CacheAttrs, catalog: Catalog, graph: Graph, export: Path,
            verbose: bool) -> ExtractResult:
    """`out` is complete for an earlier state of the folder: keep its rows of unchanged files, compute the rest into
    a cache of their own (resumable), then publish `out` in the new row order: linked to both, else rewritten
    (features/update.py)."""
    start = time.perf_counter()
    old = open_cache(out)
    reuse = reusable_rows(old, catalog)
    kept = int((reuse >= 0).sum())
    todo = catalog.subset(np.flatnonzero(reuse < 0).tolist())
    if verbose:
        print(f"update: {out} was made for an earlier state of {cfg.data}; keeping {kept} rows of "
              f"unchanged files, computing {len(todo)} new or changed candidates.")
    delta_path = update_path(out)
    computed = ExtractResult(delta_path, "up-to-date", engine=attrs.engine)
    delta, skipped = None, [list(item) for item in catalog.ignored]
    if len(todo):  # else nothing is computed, and a scratch cache left by an earlier update is stale
        delta_attrs = dataclasses.replace(attrs, source_fingerprint=todo.fingerprint(), num_candidates=len(todo))
        state = _delta_state(delta_path, delta_attrs)
        if state != "complete":
            computed = _compute(cfg, delta_path, delta_attrs, todo, state, graph, export, verbose)
        delta = open_cache(delta_path) if delta_path.exists() else None  # absent when no new file could be used
        skipped = [list(s) for s in delta.skipped] if state == "complete" else computed.skipped
    attrs = engine_attrs(attrs, computed.engine)
    computed_at = computed_rows(catalog, reuse, delta)
    linked = write_linked(out, attrs, catalog, reuse, computed_at, old, delta, skipped)
    if linked is not None:
        rows, files = linked
        if verbose and rows:
            print(f"update: no row copied; {out.name} reads its features from {len(files)} file(s) beside it "
                  f"({', '.join(f.path.name for f in files[:3])}{', ...' if len(files) > 3 else ''}): move or copy "
                  "the folder, not the file alone.")
    else:
        writer = CacheWriter.create(out, attrs, old.shapes, catalog.paths, catalog.label_names)
        try:
            rows = assemble(writer, catalog, reuse, computed_at, old, delta, skipped)
        finally:
            writer.close()
    delta_path.unlink(missing_ok=True)
    if rows == 0:
        raise UsageError(f"none of the {len(catalog)} files under '{cfg.data}' could be used; {out} is left as it was.")
    computed.timings.wall_s = time.perf_counter() - start
    return ExtractResult(out, "updated", rows, skipped, old.shapes, computed.timings, computed.processed,
                         computed.engine, reused=kept)


def _delta_state(path: Path, attrs: CacheAttrs) -> Progress | str | None:
    """An update's own cache of computed rows is this tool's scratch file: one made for another set of changes is
    discarded rather than refused."""
    try:
        state = _existing(path, attrs, overwrite=False)
    except UsageError:
        state = "other"
    if state in ("other", "update"):
        path.unlink(missing_ok=True)
        discard_partial(path)
        return None
    return state


def _existing(out: Path, attrs: CacheAttrs, overwrite: bool) -> Progress | str | None:
    """'complete' (reuse), 'update' (complete for an earlier state of the folder), a Progress to resume the partial
    file from, or None (start it anew). Anything at `out` that is not a cache of this tool is refused, --overwrite
    included (overwrite replaces caches only)."""
    if overwrite:
        check_ours(out)
        return None
    found = existing_cache(out)
    if found is not None:
        diff = identity_diff(found, attrs, ignore=names(UPDATABLE))
        if diff:
            raise ConfigMismatch(f"{out} exists with a different configuration ({'; '.join(diff[:4])}). "
                                 "Pass --overwrite to replace it, or choose another --out.")
        if found.complete:
            return "update" if identity_diff(found, attrs) else "complete"
    partial = partial_path(out)
    if not partial.exists():
        return None
    started = read_attrs(partial)
    if started is None:
        print(f"warning: {partial} cannot be opened (killed while it was being created); starting it again.")
        return None
    diff = identity_diff(started, attrs)
    if diff:
        raise ConfigMismatch(f"an interrupted extraction into {out} ({partial.name}) has a different configuration "
                         f"({'; '.join(diff[:4])}). Finish it with its own flags, or pass --overwrite to start anew.")
    if started.batch_size != attrs.batch_size:
        raise ConfigMismatch(f"{out} is half written with batch size {started.batch_size}; resume it with "
                             f"--batch-size {started.batch_size} (BATCH={started.batch_size}), or pass "
                             f"--overwrite to start anew with {attrs.batch_size}.")
    progress = Progress.load(out)
    if progress is None:
        print(f"warning: {partial} has no progress record; starting it again.")
    return progress
