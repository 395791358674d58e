"""Fine-tuning stage: the stage-two winner and its backbone as one Keras network, trained end to end in two phases.

Why it starts from the saved head: the network (classifiers/network.py) is the same backbone followed by the head
converted exactly, so before any step it predicts what stage two predicted and the leaderboard shows what
fine-tuning bought and what it cost. This module only orchestrates: it reads the saved model and its record, chooses
the images (the scored split is the one stage two scored; the monitor split for early stopping is carved from
`train`, so the scored split never takes part in a choice), runs phase 1 then phase 2, and writes the model, its
record, the predictions and the leaderboard row. Example:

    >>> from pipeline.finetune import FinetuneConfig, finetune
    >>> out = finetune(FinetuneConfig(model="results/20240101-120000/best", unfreeze="2"))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers import saved
from classifiers.evaluate import metrics
from classifiers.holdout import holdout_mask
from classifiers.network import (EpochViews, Images, TwoPhaseFit, build_network, clean, dataset, probabilities,
                                 resolve_precision, set_seed)
from classifiers.report import plot_confusion, plot_leaderboard, rank, write_leaderboard
from features.augment import get_policy
from features.backbones import get_backbone
from features.catalog import Catalog, discover
from features.errors import UsageError
from features.schema import MODEL, backbone_label, names, recipe
from pipeline.config import ExtractConfig, recorded_config

MODEL_FILE = saved.NETWORK_FILE
SCORE_FRACTION = 0.2  # data without splits: share of labelled images held out for scoring


@dataclass
class FinetuneConfig:
    """Everything `finetune` needs. Field names are the CLI flags (`--head-epochs` ↔ `head_epochs`)."""

    model: str  # a stage-two model directory (results/<run>/best)
    data: str | None = None  # None: the images its features were extracted from
    out: str | None = None  # None: <model>/finetune
    unfreeze: str = "2"  # phase 2: number of top blocks, or the first layer name to train (every later one too)
    head_epochs: int = 5  # phase 1 (base frozen); 0 skips it
    epochs: int = 10  # phase 2 at most (early stopping); 0 skips it
    head_lr: float = 1e-3  # Adam, constant
    lr: float = 1e-4  # Adam, cosine decay from this to 0 over phase 2
    patience: int = 3  # epochs without a lower monitor loss before a phase stops
    batch_size: int = 16
    image_size: int | None = None  # None: as the features were extracted (the exact start needs that)
    augment_policy: str = "standard"  # policy of the training views (features/augment.py)
    monitor_fraction: float = 0.15  # share of `train` held out for early stopping and checkpoint selection
    precision: str = "auto"  # auto (mixed on GPU) | float32 | mixed
    workers: int = 0  # decoder threads; 0: one per core
    seed: int = 0
    overwrite: bool = False
    trust_pickle: bool = False  # load a legacy model.joblib (a pickle can run code: only for folders you trust)


@dataclass(frozen=True)
class RowPlan:
    scheme: str  # 'test' | 'val' | 'holdout': which images are scored
    fit: np.ndarray
    monitor: np.ndarray
    score: np.ndarray


def plan_rows(codes: np.ndarray, splits: list[str], monitor_fraction: float, seed: int) -> RowPlan:
    """Score on `test` if present, else `val` (as stage two), else a stratified 20% hold-out; the monitor rows for
    early stopping always come out of the training rows."""
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(codes >= 0)
    split = np.asarray(splits)[labelled]
    scheme = next((s for s in ("test", "val") if np.any(split == s) and np.any(split == "train")), "holdout")
    if scheme == "holdout":
        held = holdout_mask(codes[labelled], SCORE_FRACTION, rng)
        score, train = labelled[held], labelled[~held]
    else:
        score, train = labelled[split == scheme], labelled[split == "train"]
    monitor = holdout_mask(codes[train], monitor_fraction, rng)
    return RowPlan(scheme, train[~monitor], train[monitor], score)


def _subset(catalog_root: Path, paths: list[str], codes: np.ndarray, rows: np.ndarray) -> Images:
    return Images(catalog_root, [paths[i] for i in rows], codes[rows])


def _codes(catalog: Catalog, class_names: list[str]) -> np.ndarray:
    """Catalog labels -> the model's class indices; classes the model does not know become -1 (unused)."""
    index = {name: i for i, name in enumerate(class_names)}
    mapping = np.array([index.get(name, -1) for name in catalog.label_names] + [-1])
    return mapping[np.asarray(catalog.labels)]


def finetune(cfg: FinetuneConfig, verbose: bool = True) -> Path:
    """Build, train (phase 1 then phase 2, each resumable) and score the network; returns the output directory
    holding model.keras and model.json (what `predict` needs); appends a row to the run's leaderboard."""
    model_dir = Path(cfg.model)
    record = saved.load_record(model_dir)
    if saved.is_network(record):
        raise UsageError(f"MODEL {cfg.model!r} is not a stage-two model (model_file {record['model_file']!r}). "
                         f"Expected a directory written by `make classify`, e.g. results/<run>/best.")
    head = saved.load_head(model_dir, record, cfg.trust_pickle)  # a bad or untrusted head fails before any work
    get_policy(cfg.augment_policy)
    xcfg = recorded_config(record, model_dir)
    spec = get_backbone(xcfg.backbone, xcfg.preprocess)
    if spec.onnx:
        raise UsageError(f"MODEL {cfg.model!r} was trained on features of the ONNX graph {spec.name!r}, which runs on "
                         "ONNX Runtime in extraction only; fine-tuning needs a Keras model (a registered backbone or a "
                         ".keras file). Extract and classify with one to fine-tune.")
    size = cfg.image_size or int(record["image_size"])
    out = Path(cfg.out) if cfg.out else model_dir / "finetune"
    if (out / MODEL_FILE).exists() and not cfg.overwrite:
        if verbose:
            print(f"up to date: {out / MODEL_FILE} exists (--overwrite trains it again).")
        return out
    if cfg.overwrite and out.exists():
        for path in [*out.glob("phase*"), *out.glob("history_phase*.csv"), out / MODEL_FILE]:
            path.unlink(missing_ok=True)
        shutil.rmtree(out / "backup", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    catalog = discover(cfg.data or record["data_root"], None if cfg.data else xcfg.labels,
                       xcfg.path_column, xcfg.label_column)
    class_names = list(record["class_names"])
    codes = _codes(catalog, class_names)
    plan = plan_rows(codes, catalog.splits, cfg.monitor_fraction, cfg.seed)
    fit, monitor, score = (_subset(catalog.root, catalog.paths, codes, rows)
                           for rows in (plan.fit, plan.monitor, plan.score))
    precision = resolve_precision(cfg.precision)
    set_seed(cfg.seed)
    network = build_network(spec, xcfg.weights, size, record["layer"], record["pool"], head, len(class_names),
                            precision)
    model, preprocess = network.model, spec.preprocess.fn
    crop = recipe(record)["crop_fraction"]
    views = EpochViews(fit, size, xcfg.resize, crop, cfg.augment_policy, cfg.seed, cfg.batch_size, cfg.workers)
    train_ds = dataset(views, size, preprocess)
    monitor_ds = dataset(clean(monitor, size, xcfg.resize, crop, cfg.batch_size, cfg.workers), size, preprocess)
    two_phases = TwoPhaseFit(network, views, train_ds, monitor_ds, cfg.unfreeze, out, cfg.patience)
    score_batches = clean(score, size, xcfg.resize, crop, cfg.batch_size, cfg.workers)

    before = _score(model, score_batches, preprocess, len(class_names))
    if verbose:
        print(f"start ({network.start} {record['head']} head, before any step): accuracy {before['accuracy']:.4f} on "
              f"{len(score.paths)} '{plan.scheme}' images (stage two reported {record['metrics']['accuracy']:.4f})")
    phases = {}
    for phase, epochs, lr in [(1, cfg.head_epochs, cfg.head_lr), (2, cfg.epochs, cfg.lr)]:
        phases[phase] = result = two_phases.phase(phase, epochs, lr)
        if epochs == 0:
            continue
        result["accuracy"] = _score(model, score_batches, preprocess, len(class_names))["accuracy"]
        if verbose:
            print(f"phase {phase}: {result['epochs']} epoch(s) in {result['seconds']:.0f} s; "
                  f"accuracy {result['accuracy']:.4f}")
    t0 = time.perf_counter()
    probs, truth = probabilities(model, score_batches(), preprocess)
    predict_s = time.perf_counter() - t0
    scores = metrics(truth, probs.argmax(1), probs, True, len(class_names))
    rec = saved.save_network(out, model, _finetune_record(record, cfg, xcfg, size, plan, scores, before, phases,
                                                           network.start, precision, len(fit.paths), len(score.paths)))
    names = np.array(class_names)
    pd.DataFrame({"path": score.paths, "label": names[truth], "predicted": names[probs.argmax(1)],
                  **{f"p_{n}": probs[:, i] for i, n in enumerate(names)}}).to_csv(out / "eval_predictions.csv",
                                                                                 index=False)
    plot_confusion(out, class_names)
    append_leaderboard(model_dir, rec, predict_s)
    return out


def _score(model, batches: Callable[[], Iterator], preprocess: Callable, n_classes: int) -> dict[str, float]:
    probs, truth = probabilities(model, batches(), preprocess)
    return metrics(truth, probs.argmax(1), probs, True, n_classes)


def _finetune_record(record: dict, cfg: FinetuneConfig, xcfg: ExtractConfig, size: int, plan: RowPlan, scores: dict,
                     before: dict, phases: dict, start: str, precision: str, n_fit: int, n_eval: int) -> dict:
    """model.json of the fine-tuned model: what predict needs (backbone, preprocessing, size, resize, classes) and
    what it cost; the stage-two record it started from is kept under `stage_two`."""
    return {
        "model_file": MODEL_FILE, "kind": "finetuned", "head": f"finetune:{record['head']}",
        **{key: record.get(key) for key in names(MODEL)},  # how the stage-two features were made (the cache schema's)
        "layer": record["layer"], "class_names": record["class_names"],
        # where the .keras backbone was found; saved.save_network checks its hash and records it relocatably
        **({"backbone_abspath": str(Path(xcfg.backbone).resolve())} if record.get("backbone_file_sha256") else {}),
        "image_size": size, "reduce": record["reduce"], "scheme": plan.scheme, "n_fit": n_fit, "n_eval": n_eval,
        "n_monitor": len(plan.monitor), "metrics": {**scores, "start_accuracy": before["accuracy"],
                                                    "fit_s": sum(p["seconds"] for p in phases.values())},
        "head_start": start, "phases": phases, "precision": precision,
        "config_json": json.dumps(dataclasses.asdict(xcfg.replace(image_size=size))),
        "finetune_config": dataclasses.asdict(cfg),
        "schedule": {"phase1": f"Adam, constant {cfg.head_lr}", "phase2": f"Adam, cosine decay {cfg.lr} -> 0"},
        "stage_two": {"head": record["head"], "params": record.get("params"), "metrics": record["metrics"]},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append_leaderboard(model_dir: Path, rec: dict, predict_s: float) -> None:
    """Add (or replace) the fine-tuned model's row in the leaderboard of the classify run that saved the model
    (results/<run>/best or results/<run>/models/<name>), beside the frozen-feature heads."""
    run_dir = next((d for d in (model_dir.parent, model_dir.parent.parent) if (d / "leaderboard.csv").exists()), None)
    if run_dir is None:
        return
    board = run_dir / "leaderboard.csv"
    table = pd.read_csv(board).drop(columns="rank")
    table = table[table["head"] != rec["head"]]
    backbone = backbone_label(rec["backbone"])
    row = {"backbone": backbone, "layer": rec["layer"],
           "reduce": rec["reduce"], "head": rec["head"], "scheme": rec["scheme"],
           **{k: v for k, v in rec["metrics"].items() if k != "start_accuracy"},
           "predict_s": predict_s, "n_fit": rec["n_fit"], "n_eval": rec["n_eval"], "streamed": False,
           "params": json.dumps({"unfreeze": rec["finetune_config"]["unfreeze"], "image_size": rec["image_size"],
                                 "start_accuracy": rec["metrics"]["start_accuracy"],
                                 **{f"phase{k}_s": round(v["seconds"], 1) for k, v in rec["phases"].items()}}),
           "cache": ""}
    write_leaderboard(rank(table.to_dict("records") + [row]), run_dir)
    plot_leaderboard(run_dir)


def predict_images(record: dict, model_dir: Path, data: Path, batch_size: int | None = None
                   ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """`make predict` for a fine-tuned model: clean views of every image under `data` through model.keras. Returns
    predict's table (path, predicted, p_<class>…, label when the folder has labels) and the files it could not use
    as (path, reason)."""
    model = saved.load_network(model_dir / record["model_file"])
    xcfg = recorded_config(record, model_dir)
    preprocess = get_backbone(xcfg.backbone, xcfg.preprocess).preprocess.fn
    catalog = discover(data)
    images = Images(catalog.root, catalog.paths, np.arange(len(catalog)))
    size, failed = int(record["image_size"]), list(catalog.ignored)
    batches = clean(images, size, xcfg.resize, recipe(record)["crop_fraction"], batch_size or 32, 0, failed)()
    first = next(batches, None)  # None: every file failed (and `failed` now names them all)
    if first is None:
        raise UsageError(f"none of the {len(failed)} files under '{data}' could be used: "
                         + "; ".join(f"{p}: {r}" for p, r in failed[:5]))
    probs, rows = probabilities(model, chain([first], batches), preprocess)
    names, root = np.array(record["class_names"]), catalog.root.resolve()
    table = pd.DataFrame({"path": [str(root / catalog.paths[r]) for r in rows],
                          "predicted": names[probs.argmax(1)], **{f"p_{n}": probs[:, i] for i, n in enumerate(names)}})
    if any(label >= 0 for label in catalog.labels):
        table["label"] = np.array(catalog.label_names + [""])[np.asarray(catalog.labels)[rows]]
    return table, [(str(root / path), reason) for path, reason in failed]
