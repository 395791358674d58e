"""The stage-two head on its backbone as one Keras network, and the two training phases of a fine-tune.

Why here, beside classifiers/convert.py: the network is the same backbone (weights, cut layer, pooling) followed by
the head converted exactly, so before any step it predicts what stage two predicted. Phase 1 trains the head on
augmented views with the base frozen; phase 2 unfreezes the top blocks (BatchNorm layers stay frozen and in
inference mode) with a low, cosine-decayed learning rate. Both phases stop early and keep their best weights by loss
on a monitor split. Choosing the images and writing the outputs is `pipeline.finetune`'s job. Example:

    >>> network = build_network(spec, "imagenet", 224, "avg_pool", "none", head, n_classes=2)  # doctest: +SKIP
    >>> views = EpochViews(fit_images, 224, "crop", "standard", seed=0, batch_size=16, workers=0)  # doctest: +SKIP
    >>> fit = TwoPhaseFit(network, views, dataset(views, 224, spec.preprocess.fn),  # doctest: +SKIP
    ...                   dataset(clean(monitor_images, 224, "crop", 16, 0), 224, spec.preprocess.fn), "2", out, 3)
    >>> fit.phase(1, epochs=5, learning_rate=1e-3)  # doctest: +SKIP
    {'seconds': 41.2, 'epochs': 5, 'trained_layers': []}
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from classifiers.convert import HEAD_PREFIX, NotConvertible, check_classes, to_keras
from features.augment import file_loader
from features.backbones import BackboneSpec
from features.errors import UsageError, did_you_mean
from features.images import decode_stream
from features.model import build_base, cut

PRECISIONS = ("auto", "float32", "mixed")
# extraction-time pooling (cache attribute `pool`) -> the Keras layer that does the same
POOL_LAYERS = {"avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}


def resolve_precision(precision: str) -> str:
    """'auto' becomes mixed float16 where TensorFlow sees a GPU, float32 elsewhere."""
    import tensorflow as tf

    if precision not in PRECISIONS:
        raise UsageError(f"precision '{precision}' is not valid. Expected one of: {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "mixed" if tf.config.list_physical_devices("GPU") else "float32"
    return precision


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow before the network is built, so a new head's initial weights and the run
    repeat."""
    import keras

    keras.utils.set_random_seed(seed)


class Network(NamedTuple):
    """The whole model, the cut backbone inside it (the layers the phases freeze and unfreeze), and how the head
    started: 'converted' (exactly the stage-two head) or 'new' (a Dense layer phase 1 trains)."""

    model: Any
    trunk: Any
    start: str


def build_network(spec: BackboneSpec, weights: str, size: int, layer: str, pool: str, head, n_classes: int,
                  precision: str = "float32") -> Network:
    """Preprocessed pixels -> trunk (training=False: BatchNorm always uses its moving statistics) -> extraction
    pooling -> converted head -> softmax. A head without an exact Keras form (knn, rf, hgb) is replaced by a new
    Dense layer after the converted reduce step; phase 1 then trains it."""
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
    return Network(keras.Model(pixels, probabilities, name="finetuned"), trunk, start)


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


@dataclass(frozen=True)
class Images:
    """Images of one role (fit, monitor, score, predict): paths relative to `root`, and one integer each that travels
    with the pixels (the model's class code, or the row for prediction)."""

    root: Path
    paths: list[str]
    codes: np.ndarray


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

    def __init__(self, images: Images, size: int, resize: str, crop: float, policy: str, seed: int, batch_size: int,
                 workers: int):
        self.images, self.size, self.resize, self.crop, self.policy = images, size, resize, crop, policy
        self.seed, self.batch_size, self.workers, self.epoch = seed, batch_size, workers, 0

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images.paths))
        load = file_loader(self.size, self.resize, self.crop, self.policy, self.seed, self.epoch + 1)
        yield from image_batches(self.images, self.size, load, self.batch_size, order, self.workers)


def dataset(generator: Callable[[], Iterator], size: int, preprocess: Callable):
    """tf.data around a batch generator: preprocessing in the graph, one batch prefetched."""
    import tensorflow as tf

    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32))
    return (tf.data.Dataset.from_generator(generator, output_signature=signature)
            .map(lambda x, y: (preprocess(tf.cast(x, tf.float32)), y)).prefetch(2))


def clean(images: Images, size: int, resize: str, crop: float, batch_size: int, workers: int,
          failed: list[tuple[str, str]] | None = None) -> Callable[[], Iterator]:
    """Clean views (the stage-one resize) in file order: what is monitored, scored and predicted."""
    load = file_loader(size, resize, crop, "", 0, 0)
    return lambda: image_batches(images, size, load, batch_size, np.arange(len(images.paths)), workers, failed)


def probabilities(model, batches: Iterator, preprocess: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, codes) of every decodable image."""
    import tensorflow as tf

    probs, codes = [], []
    for pixels, code in batches:
        probs.append(np.asarray(model(preprocess(tf.cast(pixels, tf.float32)), training=False)))
        codes.append(code)
    return np.concatenate(probs), np.concatenate(codes)


@contextmanager
def quiet_keras():
    """The image stream has no known length (unreadable files are dropped), so Keras warns when an epoch's data
    ends; the best-weights file holds no optimizer state worth restoring. Neither warning is actionable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        yield


@dataclass(frozen=True)
class TwoPhaseFit:
    """What both phases share: the network, its training stream (`views`, also fed as the tf.data `train`), the
    clean `monitor` dataset that early stopping and checkpoints read, and `out`, where each phase keeps its best
    weights, its epoch backups (for resuming) and its history."""

    network: Network
    views: EpochViews
    train: Any
    monitor: Any
    unfreeze: str
    out: Path
    patience: int

    def phase(self, phase: int, epochs: int, learning_rate: float) -> dict:
        """Phase 1: the head alone, Adam at a constant `learning_rate`; phase 2: also the `unfreeze` trunk layers,
        Adam with cosine decay from `learning_rate` to 0 over `epochs`. Returns seconds, epochs run and the trunk
        layers trained. With 0 epochs the network is only set up (and compiled) for the phase."""
        import keras

        model = self.network.model
        trained = set_phase(model, self.network.trunk, phase, self.unfreeze)
        steps = -(-len(self.views.images.paths) // self.views.batch_size) * max(epochs, 1)
        schedule = learning_rate if phase == 1 else keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        if epochs == 0:
            return {"seconds": 0.0, "epochs": 0, "trained_layers": trained}
        with quiet_keras():
            start_loss = float(model.evaluate(self.monitor, verbose=0, return_dict=True)["loss"])
        seconds, ran = self._fit(phase, epochs, start_loss)
        return {"seconds": seconds, "epochs": ran, "trained_layers": trained}

    def _fit(self, phase: int, epochs: int, start_loss: float) -> tuple[float, int]:
        """One phase with resume (BackupAndRestore), early stopping, and the best weights by monitor loss kept on
        disk; the phase's weights at the start count as a candidate, so a phase never ends worse on the monitor split."""
        import keras

        model, out = self.network.model, self.out
        best = out / f"phase{phase}_best.weights.h5"
        log = out / f"history_phase{phase}.csv"
        if not best.exists():
            model.save_weights(best)
        seen = pd.read_csv(log)["val_loss"].min() if log.exists() and log.stat().st_size else np.inf
        started = time.perf_counter()
        callbacks = [
            keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: setattr(self.views, "epoch", epoch)),
            keras.callbacks.BackupAndRestore(str(out / "backup" / f"phase{phase}")),
            keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True, save_weights_only=True,
                                            initial_value_threshold=float(min(start_loss, seen))),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience),
            keras.callbacks.CSVLogger(str(log), append=True),
        ]
        with quiet_keras():
            history = model.fit(self.train, validation_data=self.monitor, epochs=epochs, callbacks=callbacks,
                                shuffle=False, verbose=1)
            model.load_weights(best)
        return time.perf_counter() - started, len(history.epoch)
