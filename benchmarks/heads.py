"""Sections 5 and 6: stage two against end-to-end training, and how each head's fit time scales.

Heads come from the registry in `classifiers/heads.py` (`resolve_heads("default")`, `list_heads()`), fitted the way
`make classify` fits them: `classifiers.evaluate.evaluate`, i.e. GridSearchCV over the head's grid on inner folds
of the training rows, then scored on the held-out split.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Section, Sizes, Sources, ratio


def _split_dirs(root: Path) -> tuple[Path, Path]:
    train, val = root / "train", root / "val"
    if not (train.is_dir() and val.is_dir()):
        raise FileNotFoundError(f"section 5 needs {root}/train and {root}/val class folders; they are missing.")
    return train, val


def fit_default_heads(path: Path, layer: str, seed: int = 0) -> tuple[list[dict], float]:
    """Every default head fitted with its hyperparameter search and scored on val; (rows, total wall seconds)."""
    from classifiers.evaluate import evaluate, plan_evaluation
    from classifiers.heads import resolve_heads
    from features.store import open_cache

    cache = open_cache(path)
    X, y, split, names = cache.read(layer).astype("float32"), cache.labels, cache.split, cache.label_names
    plan = plan_evaluation(y, split, names, cv=5, seed=seed)
    rows, start = [], time.perf_counter()
    for spec in resolve_heads("default"):
        t0 = time.perf_counter()
        ev = evaluate(spec, X, y, np.arange(len(y)), plan, len(names), seed)
        rows.append({"method": f"head: {spec.name}", "fit_s": ev.fit_s, "fit_and_score_s": time.perf_counter() - t0,
                     "val_accuracy": ev.scores["accuracy"], "chosen": str(ev.params[0]) if ev.params[0] else ""})
    return rows, time.perf_counter() - start


def train_end_to_end(spec, base, train: Path, val: Path, size: int, epochs: int, batch: int,
                     seed: int = 0) -> tuple[list[float], float]:
    """The seed articles' approach: frozen base + augmentation + dense head trained end to end on the images.
    Returns each epoch's wall seconds and the val accuracy after the last epoch."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)

    def load(folder: Path, shuffle: bool):
        ds = keras.utils.image_dataset_from_directory(folder, image_size=(size, size), batch_size=batch,
                                                      shuffle=shuffle, seed=seed, verbose=False)
        n_classes = len(ds.class_names)
        return ds.map(lambda x, y: (spec.preprocess.fn(x), y), num_parallel_calls=tf.data.AUTOTUNE
                      ).prefetch(tf.data.AUTOTUNE), n_classes

    train_ds, n_classes = load(train, True)
    val_ds, _ = load(val, False)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.RandomFlip("horizontal")(inputs)
    x = base(x, training=False)  # frozen, BatchNorm in inference mode
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])

    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(train_ds, epochs=epochs, verbose=0, callbacks=[EpochTimer()])
    _, accuracy = model.evaluate(val_ds, verbose=0)
    return times, float(accuracy)


def section_heads_vs_training(sizes: Sizes, sources: Sources, work: Path, log) -> Section:
    import keras

    from features.backbones import get_backbone
    from features.model import build_base
    from pipeline.config import ExtractConfig
    from pipeline.extraction import extract

    sec = Section(5, "Heads vs end-to-end training (pretrained Lite0, real train/val split)",
                  "wall time of ALL default heads (with their search) ÷ ONE epoch of end-to-end training ≤ 0.1, "
                  "accuracy comparable", ["method", "fit_s", "fit_and_score_s", "epoch_s", "val_accuracy", "chosen"])
    from benchmarks.common import stage_images

    root = sources.images
    if sizes.split_images:  # quick mode: a few staged copies per split
        for split in ("train", "val"):
            stage_images(sources.images / split, sizes.split_images, work / "s5_data" / split)
        root = work / "s5_data"
    train, val = _split_dirs(root)
    log(f"section 5: extracting the Lite0 cache of {root}")
    layer = "avg_pool"
    res = extract(ExtractConfig(backbone=str(sources.lite0), data=str(root), layer=[layer],
                                batch_size=sizes.batch_size, out=str(work / "s5.h5"), overwrite=True), verbose=False)
    log("section 5: fitting the default heads")
    head_rows, heads_s = fit_default_heads(res.path, layer)
    log(f"section 5: end-to-end training, {sizes.head_epochs} epochs")
    spec = get_backbone(str(sources.lite0))
    full = build_base(spec, "imagenet", spec.input_size)
    base = keras.Model(full.input, full.get_layer(layer).output)  # one output tensor, frozen like `full`
    epoch_times, e2e_acc = train_end_to_end(spec, base, train, val, spec.input_size, sizes.head_epochs,
                                            sizes.batch_size)
    epoch_s = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else epoch_times[0]
    sec.rows = head_rows + [
        {"method": "ALL default heads (total)", "fit_and_score_s": heads_s,
         "val_accuracy": max(r["val_accuracy"] for r in head_rows), "chosen": "best head's accuracy"},
        {"method": f"end-to-end, one epoch (median of epochs 2..{len(epoch_times)}; epoch 1 = "
                   f"{epoch_times[0]:.1f} s incl. tracing)", "epoch_s": epoch_s, "val_accuracy": e2e_acc,
         "chosen": f"accuracy after {len(epoch_times)} epochs"},
        {"method": f"extraction of the cache ({res.processed} images, once)", "fit_and_score_s": res.timings.wall_s},
    ]
    r = ratio(heads_s, epoch_s)
    best = max(r_["val_accuracy"] for r_ in head_rows)
    sec.met = r <= 0.1 and best >= e2e_acc - 0.03
    sec.value = (f"heads ÷ epoch = {r:.3f}; val accuracy: best head {best:.3f}, end-to-end after "
                 f"{len(epoch_times)} epochs {e2e_acc:.3f}")
    k = len(epoch_times)
    sec.notes.append(f"Amortised: extraction once + all heads = {res.timings.wall_s + heads_s:.1f} s, versus "
                     f"{k} end-to-end epochs = {sum(epoch_times):.1f} s for a single head.")
    return sec


def _synthetic(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (post-ReLU-like) features with a class signal in a few directions, float32."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = rng.normal(0, 1, (classes, d)) * (rng.random(d) < min(1.0, 32 / d))
    X = np.maximum(rng.normal(0, 1, (n, d)) + centers[y], 0).astype("float32")
    return X, y


def section_scaling(sizes: Sizes, log, classes: int = 5, seed: int = 0) -> Section:
    from classifiers.evaluate import selector
    from classifiers.heads import get_head, list_heads

    n0, dims = sizes.scaling_samples, sizes.scaling_dims
    d0 = 1280 if 1280 in dims else dims[-1]
    ns = [n0, 2 * n0, 4 * n0]
    cols = ["head"] + [f"N={n}" for n in ns] + ["exp_N"] + [f"d={d}" for d in dims] + ["exp_d"]
    sec = Section(6, f"Scaling of stage two: fit seconds (incl. the head's grid search, 5 inner folds) on synthetic "
                     f"{classes}-class features, at N={ns} (d={d0}) and d={list(dims)} (N={2 * n0})",
                  "report; shows which heads scale", cols)
    budget = sizes.scaling_budget_s
    series: dict[str, dict] = {}
    names = list_heads() if sizes.scaling_heads == "all" else sizes.scaling_heads.split(",")
    for name in names:
        spec = get_head(name)
        row: dict = {"head": name}
        for label, points in [("N", [(n, d0) for n in ns]), ("d", [(2 * n0, d) for d in dims])]:
            over = False
            for n, d in points:
                key = f"N={n}" if label == "N" else f"d={d}"
                if over:
                    row[key] = f"skipped (> {budget:.0f} s)"
                    continue
                X, y = _synthetic(n, d, classes, seed)
                log(f"section 6: {name} N={n} d={d}")
                start = time.perf_counter()
                try:
                    selector(spec, 5, seed).fit(X, y)
                except Exception as err:  # a head under development must not stop the others; its error is reported
                    row[key], over = f"error: {type(err).__name__}: {str(err)[:80]}", True
                    sec.notes.append(f"{name} failed at N={n}, d={d}: {type(err).__name__}: {err}")
                    continue
                row[key] = time.perf_counter() - start
                over = row[key] > budget
            first, last = row[f"N={ns[0]}" if label == "N" else f"d={dims[0]}"], \
                row[f"N={ns[-1]}" if label == "N" else f"d={dims[-1]}"]
            span = (ns[-1] / ns[0]) if label == "N" else (dims[-1] / dims[0])
            row[f"exp_{label}"] = (math.log(last / first) / math.log(span)
                                   if isinstance(last, float) and isinstance(first, float) and first > 0 else None)
        sec.rows.append(row)
        series[name] = row
    sec.notes.append("exp_N / exp_d: the exponent k in time ∝ size^k between the smallest and largest size run "
                     "(1 = linear). A head slower than the budget at one size is not run at larger sizes.")
    sec.value = "see table and plot"
    return sec
