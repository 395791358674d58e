"""Fine-tuning stage: the stage-two winner and its backbone as one Keras network, trained end to end in two phases.

Why it starts from the saved head: the network is the same backbone (weights, cut layer, pooling) followed by the
head converted exactly (classifiers/convert.py), so before any step it predicts what stage two predicted and the
leaderboard shows what fine-tuning bought and what it cost. Phase 1 trains the head on augmented views with the
base frozen; phase 2 unfreezes the top blocks (BatchNorm layers stay frozen and in inference mode) with a low,
cosine-decayed learning rate. Both phases stop early and keep their best weights by loss on a monitor split
carved from `train`, so the scored split never takes part in a choice. Example:

    >>> from pipeline.finetune import FinetuneConfig, finetune
    >>> out = finetune(FinetuneConfig(model="results/20240101-120000/best", unfreeze="2"))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers import saved
from classifiers.convert import HEAD_PREFIX, NotConvertible, check_classes, to_keras
from classifiers.evaluate import metrics
from classifiers.holdout import holdout_mask
from classifiers.report import plot_confusion, plot_leaderboard, rank, write_leaderboard
from features.augment import file_loader, get_policy
from features.backbones import BackboneSpec, get_backbone
from features.catalog import Catalog, discover
from features.errors import UsageError, did_you_mean
from features.images import decode_stream
from features.model import build_base, cut
from pipeline.config import ExtractConfig, recorded_config

MODEL_FILE = saved.NETWORK_FILE
PRECISIONS = ("auto", "float32", "mixed")
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
class Images:
    """Images of one role (fit, monitor, score, predict): paths relative to `root`, and one integer each that travels
    with the pixels (the model's class code, or the row for prediction)."""

    root: Path
    paths: list[str]
    codes: np.ndarray


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


def resolve_precision(precision: str) -> str:
    import tensorflow as tf

    if precision not in PRECISIONS:
        raise UsageError(f"precision '{precision}' is not valid. Expected one of: {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "mixed" if tf.config.list_physical_devices("GPU") else "float32"
    return precision


# extraction-time pooling (cache attribute `pool`) -> the Keras layer that does the same
POOL_LAYERS = {"avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}


def build_network(spec: BackboneSpec, weights: str, size: int, layer: str, pool: str, head, n_classes: int,
                  precision: str = "float32"):
    """(model, trunk, how the head started): preprocessed pixels -> trunk (training=False: BatchNorm always uses its
    moving statistics) -> extraction pooling -> converted head -> softmax. A head without an exact Keras form
    (knn, rf, hgb) is replaced by a new Dense layer after the converted reduce step; phase 1 then trains it."""
    import keras

    trunk = cut(build_base(spec, weights, size, precision), [layer])
    pixels = keras.Input((size, size, 3), name="pixels")
    x = trunk(pixels, training=False)[0]
    if pool in POOL_LAYERS and len(x.shape) > 2:
        x = getattr(keras.layers, POOL_LAYERS[pool])(name="pool")(x)
    try:
        check_classes(head, n_classes)
        logits, start = to_keras(head, x), "converted"
    except NotConvertible as err:
        print(f"note: {err} A new linear head is trained in phase 1.")
        reduced = to_keras(head.named_steps["reduce"], x, f"{HEAD_PREFIX}reduce_")
        logits, start = keras.layers.Dense(n_classes, name=f"{HEAD_PREFIX}new_logits", dtype="float32")(reduced), "new"
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(pixels, probabilities, name="finetuned"), trunk, start


def block_of(layer_name: str) -> str:
    """Keras applications name layers `<block>_<what>` (block6d_dwconv, conv5_block3_out, top_conv, block5_pool)."""
    return layer_name.split("_")[0]


def unfrozen_layers(trunk, unfreeze: str) -> list:
    """Layers phase 2 trains: the last N blocks that hold weights (UNFREEZE=N) or every layer from the named one on;
    BatchNorm layers excluded (fine-tuning on a small set would wreck their statistics and scale)."""
    import keras

    weighted = [layer for layer in trunk.layers if layer.weights]
    names = [layer.name for layer in trunk.layers]
    if unfreeze.isdigit():
        blocks = list(dict.fromkeys(block_of(layer.name) for layer in reversed(weighted)))[:int(unfreeze)]
        chosen = [layer for layer in weighted if block_of(layer.name) in blocks]
    elif unfreeze in names:
        chosen = weighted[next(i for i, layer in enumerate(weighted) if names.index(layer.name) >= names.index(unfreeze)):]
    else:
        top = list(dict.fromkeys(block_of(layer.name) for layer in reversed(weighted)))[:6]
        raise UsageError(f"unfreeze '{unfreeze}' is not valid. Expected a number of top blocks (e.g. 2; the top blocks "
                         f"are {', '.join(top)}) or a layer name of the cut backbone.{did_you_mean(unfreeze, names)}")
    return [layer for layer in chosen if not isinstance(layer, keras.layers.BatchNormalization)]


def set_phase(model, trunk, phase: int, unfreeze: str) -> list[str]:
    """Phase 1: only the head's trainable layers; phase 2: also the unfrozen trunk layers. Returns the trunk layers
    that train."""
    trunk.trainable = phase == 2
    train = unfrozen_layers(trunk, unfreeze) if phase == 2 else []
    for layer in trunk.layers:
        layer.trainable = layer in train
    return [layer.name for layer in train]


def image_batches(images: Images, size: int, load: Callable[[str, Path], np.ndarray], batch_size: int,
                 order: np.ndarray, workers: int, failed: list[tuple[str, str]] | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 pixels, codes) batches in `order`, decoded by stage one's thread pool; unreadable files are dropped
    (and listed in `failed` as (path, reason) when given)."""
    root, paths = images.root, images.paths
    todo = ((i, root / paths[i]) for i in order)
    stream = decode_stream(todo, lambda path: load(path.relative_to(root).as_posix(), path),
                           workers or os.cpu_count() or 1, lookahead=3 * batch_size)
    pixels, codes = [], []
    for item in stream:
        if item.pixels is not None:
            pixels.append(item.pixels)
            codes.append(images.codes[item.index])
        elif failed is not None:
            failed.append((paths[item.index], item.reason))
        if len(pixels) == batch_size:
            yield np.stack(pixels), np.asarray(codes, np.int32)
            pixels, codes = [], []
    if pixels:
        yield np.stack(pixels), np.asarray(codes, np.int32)


class EpochViews:
    """The training stream: epoch e shows augmented view e+1 of every image in a seeded order, so a resumed run
    replays the same batches. `epoch` is set by a callback at the start of each epoch."""

    def __init__(self, images: Images, size: int, resize: str, policy: str, seed: int, batch_size: int, workers: int):
        self.images, self.size, self.resize, self.policy = images, size, resize, policy
        self.seed, self.batch_size, self.workers, self.epoch = seed, batch_size, workers, 0

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images.paths))
        load = file_loader(self.size, self.resize, self.policy, self.seed, self.epoch + 1)
        yield from image_batches(self.images, self.size, load, self.batch_size, order, self.workers)


def dataset(generator: Callable[[], Iterator], size: int, preprocess: Callable):
    """tf.data around a batch generator: preprocessing in the graph, one batch prefetched."""
    import tensorflow as tf

    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32))
    return (tf.data.Dataset.from_generator(generator, output_signature=signature)
            .map(lambda x, y: (preprocess(tf.cast(x, tf.float32)), y)).prefetch(2))


def clean(images: Images, size: int, resize: str, batch_size: int, workers: int,
          failed: list[tuple[str, str]] | None = None) -> Callable[[], Iterator]:
    """Clean views (the stage-one resize) in file order: what is monitored, scored and predicted."""
    load = file_loader(size, resize, "", 0, 0)
    return lambda: image_batches(images, size, load, batch_size, np.arange(len(images.paths)), workers, failed)


def probabilities(model, batches: Iterator, preprocess: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, codes) of every decodable image."""
    import tensorflow as tf

    probs, codes = [], []
    for pixels, code in batches:
        probs.append(np.asarray(model(preprocess(tf.cast(pixels, tf.float32)), training=False)))
        codes.append(code)
    return np.concatenate(probs), np.concatenate(codes)


def _subset(catalog_root: Path, paths: list[str], codes: np.ndarray, rows: np.ndarray) -> Images:
    return Images(catalog_root, [paths[i] for i in rows], codes[rows])


def _codes(catalog: Catalog, class_names: list[str]) -> np.ndarray:
    """Catalog labels -> the model's class indices; classes the model does not know become -1 (unused)."""
    index = {name: i for i, name in enumerate(class_names)}
    mapping = np.array([index.get(name, -1) for name in catalog.label_names] + [-1])
    return mapping[np.asarray(catalog.labels)]


def _train_phase(model, phase: int, train_ds, monitor_ds, epochs: int, out: Path, patience: int, views: EpochViews,
                 start_loss: float) -> tuple[float, int]:
    """One phase with resume (BackupAndRestore), early stopping, and the best weights by monitor loss kept on disk;
    the phase's weights at the start count as a candidate, so a phase never ends worse on the monitor split."""
    import keras

    best = out / f"phase{phase}_best.weights.h5"
    log = out / f"history_phase{phase}.csv"
    if not best.exists():
        model.save_weights(best)
    seen = pd.read_csv(log)["val_loss"].min() if log.exists() and log.stat().st_size else np.inf
    started = time.perf_counter()
    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: setattr(views, "epoch", epoch)),
        keras.callbacks.BackupAndRestore(str(out / "backup" / f"phase{phase}")),
        keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=float(min(start_loss, seen))),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
        keras.callbacks.CSVLogger(str(log), append=True),
    ]
    with quiet_keras():
        history = model.fit(train_ds, validation_data=monitor_ds, epochs=epochs, callbacks=callbacks, shuffle=False,
                            verbose=1)
        model.load_weights(best)
    return time.perf_counter() - started, len(history.epoch)


@contextmanager
def quiet_keras():
    """The image stream has no known length (unreadable files are dropped), so Keras warns when an epoch's data
    ends; the best-weights file holds no optimizer state worth restoring. Neither warning is actionable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        yield


def _compile(model, learning_rate):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def finetune(cfg: FinetuneConfig, verbose: bool = True) -> Path:
    """Build, train (phase 1 then phase 2, each resumable) and score the network; returns the output directory
    holding model.keras and model.json (what `predict` needs); appends a row to the run's leaderboard."""
    import keras

    model_dir = Path(cfg.model)
    record = saved.load_record(model_dir)
    if saved.is_network(record):
        raise UsageError(f"MODEL {cfg.model!r} is not a stage-two model (model_file {record['model_file']!r}). "
                         f"Expected a directory written by `make classify`, e.g. results/<run>/best.")
    head = saved.load_head(model_dir, record, cfg.trust_pickle)  # a bad or untrusted head fails before any work
    get_policy(cfg.augment_policy)
    xcfg = recorded_config(record, model_dir)
    spec = get_backbone(xcfg.backbone, xcfg.preprocess)
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
    keras.utils.set_random_seed(cfg.seed)
    model, trunk, start = build_network(spec, xcfg.weights, size, record["layer"], record["pool"], head,
                                        len(class_names), precision)
    preprocess = spec.preprocess.fn
    views = EpochViews(fit, size, xcfg.resize, cfg.augment_policy, cfg.seed, cfg.batch_size, cfg.workers)
    train_ds = dataset(views, size, preprocess)
    monitor_ds = dataset(clean(monitor, size, xcfg.resize, cfg.batch_size, cfg.workers), size, preprocess)
    score_batches = clean(score, size, xcfg.resize, cfg.batch_size, cfg.workers)

    before = _score(model, score_batches, preprocess, len(class_names))
    if verbose:
        print(f"start ({start} {record['head']} head, before any step): accuracy {before['accuracy']:.4f} on "
              f"{len(score.paths)} '{plan.scheme}' images (stage two reported {record['metrics']['accuracy']:.4f})")
    phases = {}
    for phase, epochs, lr in [(1, cfg.head_epochs, cfg.head_lr), (2, cfg.epochs, cfg.lr)]:
        trained = set_phase(model, trunk, phase, cfg.unfreeze)
        steps = -(-len(fit.paths) // cfg.batch_size) * max(epochs, 1)
        _compile(model, lr if phase == 1 else keras.optimizers.schedules.CosineDecay(lr, steps))
        if epochs == 0:
            phases[phase] = {"seconds": 0.0, "epochs": 0, "trained_layers": trained}
            continue
        with quiet_keras():
            start_loss = float(model.evaluate(monitor_ds, verbose=0, return_dict=True)["loss"])
        seconds, ran = _train_phase(model, phase, train_ds, monitor_ds, epochs, out, cfg.patience, views, start_loss)
        phases[phase] = {"seconds": seconds, "epochs": ran, "trained_layers": trained,
                         "accuracy": _score(model, score_batches, preprocess, len(class_names))["accuracy"]}
        if verbose:
            print(f"phase {phase}: {ran} epoch(s) in {seconds:.0f} s; accuracy {phases[phase]['accuracy']:.4f}")
    t0 = time.perf_counter()
    probs, truth = probabilities(model, score_batches(), preprocess)
    predict_s = time.perf_counter() - t0
    scores = metrics(truth, probs.argmax(1), probs, True, len(class_names))
    rec = saved.save_network(out, model, _finetune_record(record, cfg, xcfg, size, plan, scores, before, phases,
                                                           start, precision, len(fit.paths), len(score.paths)))
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
    keep = ("backbone", "backbone_file_sha256", "weights", "weights_source", "layer", "pool", "resize", "preprocessing",
            "color", "class_names", "source_fingerprint", "data_root")
    return {
        "model_file": MODEL_FILE, "kind": "finetuned", "head": f"finetune:{record['head']}",
        **{key: record.get(key) for key in keep},
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
    backbone = Path(rec["backbone"]).stem if rec["backbone"].endswith(".keras") else rec["backbone"]
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
    batches = clean(images, size, xcfg.resize, batch_size or 32, 0, failed)()
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
