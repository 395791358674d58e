"""Stage two: many cheap heads on cached features, ranked, with the best one saved for `predict`.

`classify(cfg) -> Path` is the whole stage; the CLI only builds the config. Each (cache, layer, reduce) is read
and reduced once, then every head is fitted and scored on that matrix. Example:

    >>> from pipeline.classification import ClassifyConfig, classify
    >>> run_dir = classify(ClassifyConfig(features="cache/x.h5", heads="logreg,knn"))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from classifiers.data import (READ_SHARE, Cache, find_caches, layers_in, load_reduced, open_cache, require_layers,
                              take_rows)
from classifiers.evaluate import Evaluation, Plan, evaluate, fit_final, plan_evaluation
from classifiers.heads import HeadSpec, resolve_heads
from classifiers.memory import PeakMemory, parse_bytes
from classifiers.reduce import ReduceSpec, get_reduce, resolve_reduce
from classifiers.saved import write_json
from classifiers.report import plot_leaderboard, rank, save_model, write_leaderboard, write_report
from pipeline.page import write_page
from features.errors import UsageError

# cache attributes copied into model.json: how the features were made, so predict can make them again
SOURCE_ATTRS = ("source_fingerprint", "backbone", "backbone_file_sha256", "weights", "weights_source", "image_size",
                "resize", "interpolation", "preprocessing", "color", "pool", "dtype", "precision", "config_json",
                "data_root", "layout", "schema_version", "tool_version", "keras_version", "tensorflow_version")


@dataclass
class ClassifyConfig:
    """Everything `classify` needs. Field names are the CLI flags (`--memory-budget` ↔ `memory_budget`)."""

    features: str | None = None  # file, comma-separated files, or a glob; None: every complete cache in cache/
    layer: list[str] = field(default_factory=list)  # empty: every layer of each cache
    heads: str = "default"  # default | all | comma-separated names (pca+<head> composes)
    reduce: list[str] = field(default_factory=list)  # empty: avg for spatial maps, none for vectors
    cv: int = 5
    seed: int = 0
    out: str | None = None  # None: results/<UTC timestamp>/
    memory_budget: str = "2GiB"
    save_all: bool = False
    report: bool = True  # report.html with learning curve and data audit (pipeline/page.py)


@dataclass
class Job:
    """One feature matrix of the run: a cache, one of its layers, one reduction, and the evaluation plan."""

    cache: Cache
    layer: str
    reduce: ReduceSpec
    plan: Plan

    @property
    def key(self) -> str:
        return f"{self.cache.name}__{self.layer}__{self.reduce.name}"


def plan_jobs(cfg: ClassifyConfig) -> tuple[list[HeadSpec], list[Job], list[str]]:
    """Validate every name and file before any feature is read; returns heads, jobs and notes."""
    heads = resolve_heads(cfg.heads)
    for name in cfg.reduce:
        get_reduce(name)
    paths, notes = find_caches(cfg.features)
    caches = [open_cache(path) for path in paths]
    require_layers(caches, cfg.layer)
    jobs = []
    for cache in caches:
        layers = layers_in(cache, cfg.layer)
        if not layers:
            notes.append(f"skipped {cache.name}: it has none of the layers {cfg.layer}")
            continue
        plan = plan_evaluation(cache.labels, cache.split, cache.label_names, cfg.cv, cfg.seed, source=cache.name,
                               images=cache.images, view=cache.view)
        notes += plan.notes
        for layer in layers:
            specs = {}
            for name in cfg.reduce or [None]:
                spec = resolve_reduce(name, cache.shapes[layer])
                specs.setdefault(spec.name, spec)
            jobs += [Job(cache, layer, spec, plan) for spec in specs.values()]
    return heads, jobs, notes


def _run_dir(cfg: ClassifyConfig) -> tuple[Path, Path]:
    """(the results folder, the hidden folder the run is written into first): `_publish` swaps the complete run in
    as a whole, so a rerun leaves no stale model beside the new leaderboard and a crash leaves the old run intact.

    An --out that is a file, or a non-empty folder that is not an earlier run with this same configuration
    (config.json), is refused: a results folder never mixes two runs, and nothing else is ever replaced.
    """
    final = Path(cfg.out) if cfg.out else Path("results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if final.exists() and not final.is_dir():
        raise UsageError(f"--out '{final}' is a file. Expected a results folder (new, empty, or an earlier run of "
                         "this same command).")
    if final.is_dir() and any(final.iterdir()):
        try:
            earlier = json.loads((final / "config.json").read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier != json.loads(json.dumps(dataclasses.asdict(cfg))):
            what = ("an earlier classify run with another configuration" if isinstance(earlier, dict)
                    else "not a classify results folder")
            raise UsageError(f"--out '{final}' is not empty and is {what}; it is left as it is. Choose a new --out, "
                             "or rerun with that run's exact flags to replace it.")
    stage = final.parent / f".{final.name}.partial-{os.getpid()}" / final.name  # same name: reports cite it
    stage.mkdir(parents=True)
    return final, stage


def _publish(stage: Path, final: Path) -> Path:
    """Put the complete run in place of `final`: the old run moves aside and is removed only afterwards."""
    old = stage.parent / "replaced"
    if final.exists():
        final.rename(old)
    stage.rename(final)
    shutil.rmtree(stage.parent)
    return final


def _clean_config(config_json: str) -> str:
    """The cache's ExtractConfig without augmentation: predict must extract the clean view of new images."""
    settings = json.loads(config_json or "{}")
    if settings.get("augment"):
        settings["augment"] = 0
    return json.dumps(settings) if settings else config_json


def _record(job: Job, head: HeadSpec, ev: Evaluation, params: dict, cfg: ClassifyConfig, n_fit: int) -> dict:
    """model.json: the source cache's identity and settings, the reduction, the head, classes and scores.
    The training views (augment) are recorded apart; `config_json` is how predict extracts: clean."""
    attrs = job.cache.attrs
    return {
        "head": head.name, "params": params, "layer": job.layer, "reduce": job.reduce.name,
        "row_shape": list(job.cache.shapes[job.layer]), "feature_dim": job.reduce.dim(job.cache.shapes[job.layer]),
        "class_names": job.cache.label_names, "scheme": job.plan.scheme, "n_fit": n_fit,
        "metrics": {**ev.scores, "fit_s": ev.fit_s, "predict_s": ev.predict_s},
        "seed": cfg.seed, "cv": cfg.cv, "source_file": str(job.cache.path.resolve()),
        **{key: attrs.get(key, "") for key in SOURCE_ATTRS},
        "config_json": _clean_config(attrs.get("config_json", "")),
        "augment": int(attrs.get("augment", 0) or 0), "augment_policy": attrs.get("augment_policy", ""),
        "augment_seed": int(attrs.get("augment_seed", 0) or 0),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "scikit-learn": sklearn.__version__},
    }


def _eval_table(job: Job, ev: Evaluation) -> pd.DataFrame:
    """The scored rows (held-out, or out-of-fold for CV) with their predictions: what the confusion matrix shows."""
    names = np.array(job.cache.label_names)
    table = pd.DataFrame({"path": job.cache.paths[ev.eval_rows], "split": job.cache.split[ev.eval_rows],
                          "label": names[job.cache.labels[ev.eval_rows]], "predicted": names[ev.predictions]})
    if ev.probabilities is not None:
        for i, name in enumerate(names):
            table[f"p_{name}"] = ev.probabilities[:, i]
    return table


def _save(model_dir: Path, job: Job, head: HeadSpec, ev: Evaluation, loaded, cfg: ClassifyConfig) -> None:
    """Save one head: the scored model for a held-out split, or a refit on every labelled row after CV."""
    if job.plan.scheme.startswith("cv"):
        positions = np.searchsorted(loaded.rows, job.plan.fit_rows)
        model, params = fit_final(head, take_rows(loaded.X, positions), job.cache.labels[job.plan.fit_rows],
                                  job.plan, cfg.seed)
    else:
        model, params = ev.model, ev.params[0]
    pipeline = Pipeline([("reduce", loaded.reducer), ("head", model)])
    save_model(model_dir, pipeline, _record(job, head, ev, params, cfg, len(job.plan.fit_rows)),
               _eval_table(job, ev))


def _correct(job: Job, ev: Evaluation) -> pd.Series:
    """Per scored image, whether the head got it right, keyed by data and path: what the paired tests compare."""
    keys = [f"{job.cache.data_id}:{path}" for path in job.cache.paths[ev.eval_rows]]
    return pd.Series(ev.predictions == job.cache.labels[ev.eval_rows], index=keys)


def classify(cfg: ClassifyConfig) -> Path:
    """Run every head on every (cache, layer, reduce); write the leaderboard, plots, report and best model."""
    started = time.perf_counter()
    budget = parse_bytes(cfg.memory_budget)
    heads, jobs, notes = plan_jobs(cfg)
    final, run_dir = _run_dir(cfg)
    try:
        _run(cfg, heads, jobs, notes, run_dir, budget, started)
    except BaseException:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        raise
    return _publish(run_dir, final)


def _run(cfg: ClassifyConfig, heads: list[HeadSpec], jobs: list[Job], notes: list[str], run_dir: Path, budget: int,
         started: float) -> None:
    """Every head on every job, written into `run_dir`. A head that fails is recorded as failed with its error
    (leaderboard and notes) and the run goes on with the others."""
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    for note in notes:
        tqdm.write(f"warning: {note}", file=sys.stderr)
    rows, correct, evaluated = [], {}, {}
    # working_memory (MiB) caps sklearn's chunked pairwise work (knn distances) to a share of the budget
    with PeakMemory() as memory, sklearn.config_context(working_memory=max(1, budget // READ_SHARE // 2**20)), \
            tqdm(total=len(jobs) * len(heads), desc="classify", unit="head") as bar:
        for job in jobs:
            bar.set_postfix_str(job.key[-60:])
            loaded = load_reduced(job.cache, job.layer, job.reduce, job.plan.rows, job.plan.fit_rows, budget,
                                  desc=job.layer)
            for head in heads:
                bar.update()
                if loaded.streamed and not head.streaming:
                    notes.append(f"{job.key}: skipped head {head.name!r}; the reduced matrix exceeds the memory "
                                 f"budget, so only streaming heads (sgd, mlp) run. Use a pooling reduce or a larger "
                                 f"--memory-budget.")
                    continue
                where = {"backbone": job.cache.backbone, "layer": job.layer, "reduce": job.reduce.name,
                         "head": head.name, "augment": job.cache.augment, "scheme": job.plan.scheme}
                try:
                    # heads make many small fits, where multithreaded BLAS costs more in overhead than it saves
                    with threadpool_limits(limits=1, user_api="blas"):
                        ev = evaluate(head, loaded.X, job.cache.labels, loaded.rows, job.plan,
                                      len(job.cache.label_names), cfg.seed)
                    if cfg.save_all:
                        _save(run_dir / "models" / f"{job.key}__{head.name}", job, head, ev, loaded, cfg)
                except Exception as err:  # noqa: BLE001  (one head's failure must not lose the others)
                    error = f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]
                    notes.append(f"{job.key}: head {head.name!r} failed ({error}); recorded as failed.")
                    tqdm.write(f"warning: {notes[-1]}", file=sys.stderr)
                    rows.append({**where, "status": "failed", "error": error, "cache": str(job.cache.path),
                                 "data_id": job.cache.data_id})
                    continue
                notes += [f"{job.key} {head.name}: {note}" for note in ev.notes]
                rows.append({**where, "status": "ok", "error": "", **ev.scores,
                             "fit_s": ev.fit_s, "predict_s": ev.predict_s, "reduce_s": loaded.seconds,
                             "dim": job.reduce.dim(job.cache.shapes[job.layer]), "n_fit": len(job.plan.fit_rows),
                             "n_fit_images": int(job.plan.clean[job.plan.fit_rows].sum()),
                             "n_eval": len(ev.eval_rows), "streamed": loaded.streamed,
                             "params": json.dumps(ev.params, default=str), "cache": str(job.cache.path),
                             "data_id": job.cache.data_id})
                correct[len(rows) - 1] = _correct(job, ev)
                evaluated[(str(job.cache.path), job.layer, job.reduce.name, head.name)] = (job, head, ev)
    if not evaluated and rows:
        failed = "; ".join(f"{r['head']}: {r['error']}" for r in rows[:3])
        raise UsageError(f"every head failed: {failed}. "
                         "Rerun with --debug for the traceback, or choose other --heads.")
    if not evaluated:
        raise UsageError(f"No head could run: every reduced matrix exceeded --memory-budget {cfg.memory_budget} and "
                         f"none of the heads {[h.name for h in heads]} streams. Add HEADS=sgd or mlp, use a pooling "
                         f"reduce (avg, grid4), or raise the budget.")
    table = rank(rows, correct, cfg.seed)  # row 0 is the best: classifiers.stats.choose
    best_job, head, ev = evaluated[tuple(table.loc[0, ["cache", "layer", "reduce", "head"]])]
    if best_job is not job:  # the best features are not the last ones read, still in memory: read them again
        job = best_job
        loaded = load_reduced(job.cache, job.layer, job.reduce, job.plan.rows, job.plan.fit_rows, budget)
    _save(run_dir / "best", job, head, ev, loaded, cfg)
    write_leaderboard(table, run_dir)
    plot_leaderboard(run_dir)
    run = {"seconds": time.perf_counter() - started, "peak_bytes": memory.peak_growth, "budget_bytes": budget,
           "seed": cfg.seed, "notes": notes}
    write_json(run_dir / "run.json", run)
    record = json.loads((run_dir / "best" / "model.json").read_text())
    write_report(run_dir, table, record, run, notes)
    if cfg.report:
        write_page(run_dir, table, job, head, ev, loaded, cfg.seed, budget)
