"""Stage two: many cheap heads on cached features, ranked, with the best one saved for `predict`.

`classify(cfg) -> Path` is the whole stage; the CLI only builds the config. Each (cache, layer, reduce) is read
and reduced once, then every head is fitted and scored on that matrix. Example:

    >>> from pipeline.classification import ClassifyConfig, classify
    >>> run_dir = classify(ClassifyConfig(features="cache/x.h5", heads="logreg,knn"))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

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
from classifiers.report import MANIFEST, METRICS, plot_leaderboard, rank, save_model, write_leaderboard, write_report
from pipeline.page import write_index, write_page
from features.errors import UsageError, check_name_lengths
from features.schema import IDENTITY, MODEL, PER_SHARD, identity_diff, names



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
    metric: str = "accuracy"  # what the leaderboard is sorted by: accuracy | balanced_accuracy | macro_f1 | log_loss
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


@dataclass
class Experiment:
    """The selected caches of one dataset (`Cache.data_id`): ranked against each other only, written as one
    results folder with its own leaderboard, report and best model."""

    name: str  # its folder in a run of several datasets
    jobs: list[Job]
    notes: list[str]


def select_caches(caches: list[Cache], named: set[Path]) -> tuple[list[list[Cache]], list[tuple[str, str]]]:
    """The caches to rank, grouped by the data they were made from, and a note on each one passed over: (the data id
    of the cache used in its place, or "" where none is, the note).

    Different backbones, layers and reductions of the same images share a leaderboard: that comparison is the point.
    Passed over unless named explicitly (`named`): unlabelled caches (made for prediction) and shards (their merge is
    the dataset; without one they are a part of it). Always passed over: a shard whose merged cache is selected, and a
    copy of a selected cache (equal identity and rows), so no dataset counts twice.
    """
    notes, kept, seen = [], [], {}
    wholes = [c for c in caches if not c.attrs.shard]
    for cache in caches:
        explicit = cache.path in named
        merged = next((whole for whole in wholes if not identity_diff(whole.attrs, cache.attrs, ignore=names(
            PER_SHARD))), None) if cache.attrs.shard else None  # a whole cache of the same extraction: its merge
        if not (cache.labels >= 0).any() and not explicit:
            notes.append(("", f"skipped {cache.path}: it has no labels (made for prediction: make predict DATA=...)"))
        elif cache.attrs.shard and (merged or not explicit):
            notes.append((merged.data_id if merged else "", f"skipped {cache.path}: shard {cache.attrs.shard} of an "
                          + (f"extraction whose merged cache {merged.path} is used" if merged else
                             "extraction; merge its shards (make merge SHARDS_OF=...) to rank the whole dataset")))
        else:
            identity = (cache.data_id, json.dumps(cache.attrs.compared(*IDENTITY), default=str))
            if identity in seen:
                notes.append((cache.data_id, f"skipped {cache.path}: the same features as {seen[identity]} (used "
                                             "instead)"))
                continue
            seen[identity] = cache.path
            kept.append(cache)
    groups: dict[str, list[Cache]] = {}
    for cache in kept:
        groups.setdefault(cache.data_id, []).append(cache)
    return list(groups.values()), notes


def _experiment_names(groups: list[list[Cache]]) -> list[str]:
    """A folder name per dataset: its data folder's name, with the data id where two would be equal."""
    base = [Path(g[0].attrs.data_root).name or "data" for g in groups]
    return [f"{b}-{g[0].data_id[:8]}" if base.count(b) > 1 else b for b, g in zip(base, groups)]


def dataset_runs(run_dir: Path) -> list[Path]:
    """The results folder of each dataset of a classify run: the run itself for one dataset, else its subfolders."""
    if (run_dir / "leaderboard.csv").exists():
        return [run_dir]
    return sorted(p.parent for p in run_dir.glob("*/leaderboard.csv"))


def plan_jobs(cfg: ClassifyConfig) -> tuple[list[HeadSpec], list[Experiment], list[str]]:
    """Validate every name and file before any feature is read; returns heads, one experiment per dataset, and
    notes on what was passed over."""
    heads = resolve_heads(cfg.heads)
    if cfg.metric not in METRICS:
        raise UsageError(f"metric {cfg.metric!r} is not valid. Expected one of: {', '.join(METRICS)}.")
    for name in cfg.reduce:
        get_reduce(name)
    paths, notes = find_caches(cfg.features)
    caches = [open_cache(path) for path in paths]
    require_layers(caches, cfg.layer)
    named = {Path(part.strip()) for part in (cfg.features or "").split(",")
             if part.strip() and not glob.has_magic(part)}  # named explicitly: used as named
    groups, passed = select_caches(caches, named)
    ranked = {group[0].data_id for group in groups}
    notes += [note for data_id, note in passed if data_id not in ranked]  # the run's; a dataset's go in its report
    if not groups:
        raise UsageError(f"none of the {len(caches)} selected caches can be ranked: "
                         + "; ".join(note for _, note in passed[:3])
                         + ". Extract a labelled cache, or name the one to use in FEATURES.")
    experiments = []
    for name, group in zip(_experiment_names(groups), groups):
        jobs, own = [], [note for data_id, note in passed if data_id == group[0].data_id]
        for cache in group:
            layers = layers_in(cache, cfg.layer)
            if not layers:
                own.append(f"skipped {cache.name}: it has none of the layers {cfg.layer}")
                continue
            plan = plan_evaluation(cache.labels, cache.split, cache.label_names, cfg.cv, cfg.seed, source=cache.name,
                                   images=cache.images, view=cache.view)
            own += plan.notes
            for layer in layers:
                specs = {}
                for reduce in cfg.reduce or [None]:
                    spec = resolve_reduce(reduce, cache.shapes[layer])
                    specs.setdefault(spec.name, spec)
                jobs += [Job(cache, layer, spec, plan) for spec in specs.values()]
        if jobs:
            experiments.append(Experiment(name, jobs, own))
        else:
            notes += own
    return heads, experiments, notes


def _run_dir(cfg: ClassifyConfig) -> tuple[Path, Path]:
    """(the results folder, the hidden folder the run is written into first): `_publish` swaps the complete run in
    as a whole, so a rerun leaves no stale model beside the new leaderboard and a crash leaves the old run intact.

    An --out that is a file, or a non-empty folder that is not an earlier run with this same configuration
    (config.json), is refused: a results folder never mixes two runs. So is an earlier run that holds anything it
    did not write (MANIFEST), such as predict's CSVs in best/predictions/ or a user's notes: a rerun replaces only
    what classify wrote. A name too long for the filesystem is refused here too, not after the whole run.
    """
    final = Path(cfg.out) if cfg.out else Path("results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    stage = final.parent / f".{final.name}.partial-{os.getpid()}" / final.name  # same name as the results folder
    check_name_lengths("--out", final, [final, stage])
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
        _refuse_foreign(final)
    stage.mkdir(parents=True)
    return final, stage


def _foreign(folder: Path) -> list[str]:
    """What the results folder `folder` holds that its classify run did not write (by its MANIFEST; everything when
    it has none), outermost entries only, sorted."""
    try:
        own = {str(name) for name in json.loads((folder / MANIFEST).read_text())["files"]} | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        own = set()
    own |= {parent.as_posix() for name in own for parent in PurePosixPath(name).parents}  # the folders they are in
    foreign = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        foreign += [(here / name).as_posix() for name in dirs + files if (here / name).as_posix() not in own]
        dirs[:] = [name for name in dirs if (here / name).as_posix() in own]
    return sorted(foreign)


def _refuse_foreign(final: Path, kept: Path | None = None) -> None:
    """Refuse to replace the earlier run in `final` when it holds anything that run did not write; `kept`: where
    this run's complete results stay then."""
    foreign = _foreign(final)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(f"--out '{final}' holds what its earlier classify run did not write ({listed}); classify "
                         "replaces only its own run and deletes nothing else"
                         + (f", so this run is kept in '{kept}'" if kept else "")
                         + f". Choose a new --out, or move those out of '{final}' first.")


def _publish(stage: Path, final: Path) -> Path:
    """Put the complete run in place of `final`: the old run moves aside and is removed only afterwards, and only if
    it still holds nothing but its own files (predict may have written into it while this run ran)."""
    old = stage.parent / "replaced"
    if final.exists():
        final.rename(old)  # checked once moved aside: nothing can be written into it after the check
        if _foreign(old):
            old.rename(final)
            _refuse_foreign(final, kept=stage)
    stage.rename(final)
    shutil.rmtree(stage.parent)
    return final


def _clean_config(config_json: str, engine: str) -> str:
    """The cache's ExtractConfig without augmentation (predict must extract the clean view of new images) and with
    the engine that ran, not `auto`: predict's features must come from the same engine as the training features."""
    settings = json.loads(config_json or "{}")
    if not settings:
        return config_json
    if settings.get("augment"):
        settings["augment"] = 0
    settings["engine"] = engine
    return json.dumps(settings)


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
        **attrs.select(MODEL),  # how the features were made, so predict can make them again
        "config_json": _clean_config(attrs.config_json, attrs.engine),
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
    heads, experiments, notes = plan_jobs(cfg)
    final, run_dir = _run_dir(cfg)
    try:
        if len(experiments) == 1:
            _run(cfg, heads, experiments[0].jobs, notes + experiments[0].notes, run_dir, final, budget, started)
        else:
            for note in notes:
                tqdm.write(f"note: {note}", file=sys.stderr)
            for exp in experiments:
                tqdm.write(f"dataset {exp.name}: {len({j.cache.path for j in exp.jobs})} cache(s)", file=sys.stderr)
                _run(cfg, heads, exp.jobs, exp.notes, run_dir / exp.name, final / exp.name, budget, started)
            write_json(run_dir / "config.json", dataclasses.asdict(cfg))
            write_index(run_dir, [exp.name for exp in experiments], notes)
        write_json(run_dir / MANIFEST, {"files": sorted(p.relative_to(run_dir).as_posix()
                                                        for p in run_dir.rglob("*") if p.is_file())})
    except BaseException:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        raise
    return _publish(run_dir, final)


def _run(cfg: ClassifyConfig, heads: list[HeadSpec], jobs: list[Job], notes: list[str], run_dir: Path, final: Path,
         budget: int, started: float) -> None:
    """Every head on every job, written into `run_dir`, which is published as `final` (the folder the report cites,
    not the staging one). A head that fails is recorded as failed with its error (leaderboard and notes) and the run
    goes on with the others."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
                         "head": head.name, "augment": job.cache.augment, "scheme": job.plan.scheme,
                         "inner_cv": job.plan.inner_cv}
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
    table = rank(rows, correct, cfg.seed, cfg.metric)  # row 0 is the chosen one: classifiers.stats.choose
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
    write_report(run_dir, table, record, run, notes, final)
    if cfg.report:
        write_page(run_dir, table, job, head, ev, loaded, cfg.seed, budget)
