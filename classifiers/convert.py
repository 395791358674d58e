"""Saved stage-two models as Keras layers, so the fine-tuning stage starts exactly where stage two ended.

Why exact: a fine-tune is only worth its cost if it is measured against the head it started from, so the
converted network must reproduce that head's predictions before any training step. Each fitted estimator type has
a converter `f(estimator, x) -> x` (Keras tensors) in one registry: reductions become pooling layers, scalers a fixed
Normalization, PCA a fixed Dense, and linear classifiers a trainable Dense whose softmax equals the head's
probabilities (logistic heads) or whose argmax equals its decision (SVM, ridge).

>>> sorted(c.__name__ for c in CONVERTERS)[:3]
['IncrementalPCA', 'KerasMLPClassifier', 'LinearSVC']
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.decomposition import PCA, IncrementalPCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from classifiers.heads import StreamingSGDClassifier
from classifiers.mlp import KerasMLPClassifier
from classifiers.reduce import SpatialReduce
from features.errors import UsageError

HEAD_PREFIX = "head_"  # every converted layer is named head_<i>_<what>: the fine-tuning stage finds them by name

CONVERTERS: dict[type, Callable] = {}


class NotConvertible(UsageError):
    """The estimator has no exact Keras equivalent (e.g. knn, rf, hgb)."""


def register_converter(*types: type):
    """Decorator: `f(estimator, x, name) -> x` builds the Keras layers equivalent to a fitted `estimator`."""
    def wrap(fn: Callable) -> Callable:
        for cls in types:
            CONVERTERS[cls] = fn
        return fn
    return wrap


def to_keras(estimator, x, name: str = HEAD_PREFIX):
    """Apply the layers equivalent to fitted `estimator` to Keras tensor `x`; returns the output tensor
    (class logits for a classifier). Unknown types raise NotConvertible listing the convertible ones."""
    for cls in type(estimator).__mro__:
        if cls in CONVERTERS:
            return CONVERTERS[cls](estimator, x, name)
    raise NotConvertible(f"{type(estimator).__name__} has no exact Keras equivalent. Convertible: "
                         f"{', '.join(sorted(c.__name__ for c in CONVERTERS))} (heads logreg, linsvm, ridge, sgd, "
                         f"mlp and pca+<those>).")


@register_converter(Pipeline)
def _pipeline(est: Pipeline, x, name: str):
    for step, part in est.steps:
        if part not in (None, "passthrough"):
            x = to_keras(part, x, f"{name}{step}_")
    return x


@register_converter(SpatialReduce)
def _spatial(est: SpatialReduce, x, name: str):
    import keras

    layers = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    if est.mode in ("none", "flatten"):
        return keras.layers.Flatten(name=f"{name}flatten")(x) if len(x.shape) > 2 else x
    if est.mode == "avgmax":
        return keras.layers.Concatenate(name=f"{name}avgmax")([_spatial(SpatialReduce(m), x, f"{name}{m}_")
                                                               for m in ("avg", "max")])
    if est.mode not in layers or len(x.shape) != 4:
        raise NotConvertible(f"reduce {est.mode!r} on features of shape {tuple(x.shape[1:])} has no Keras "
                             f"equivalent here. Convertible reduces: none, flatten, avg, max, avgmax (on maps).")
    return layers[est.mode](name=f"{name}{est.mode}")(x)


@register_converter(StandardScaler)
def _scaler(est: StandardScaler, x, name: str):
    import keras

    mean = est.mean_ if est.with_mean else np.zeros(est.n_features_in_)
    scale = est.scale_ if est.with_std else np.ones(est.n_features_in_)
    return keras.layers.Normalization(mean=mean, variance=np.square(scale), name=f"{name}scale")(x)


@register_converter(PCA, IncrementalPCA)
def _pca(est, x, name: str):
    """(x - mean) @ components.T [/ sqrt(explained variance)] as a fixed Dense layer."""
    import keras

    kernel = est.components_.T
    if est.whiten:
        kernel = kernel / np.sqrt(est.explained_variance_)
    layer = keras.layers.Dense(kernel.shape[1], trainable=False, name=f"{name}pca")
    out = layer(x)
    layer.set_weights([kernel, -est.mean_ @ kernel])
    return out


@register_converter(LogisticRegression, LinearSVC, RidgeClassifier, SGDClassifier)
def _linear(est, x, name: str):
    """A trainable Dense of class logits. Two classes: sklearn keeps one decision z; logits (-z/2, z/2) have the same
    argmax and a softmax equal to sigmoid(z), i.e. logistic regression's predict_proba."""
    import keras

    coef, bias = np.atleast_2d(est.coef_), np.atleast_1d(est.intercept_)
    if coef.shape[0] == 1:
        coef, bias = np.r_[-coef, coef] / 2, np.r_[-bias, bias] / 2
    layer = keras.layers.Dense(coef.shape[0], name=f"{name}logits", dtype="float32")
    out = layer(x)
    layer.set_weights([coef.T, bias])
    return out


@register_converter(StreamingSGDClassifier)
def _streaming_sgd(est: StreamingSGDClassifier, x, name: str):
    return to_keras(est.model_, to_keras(est.scaler_, x, name), name)


@register_converter(KerasMLPClassifier)
def _mlp(est: KerasMLPClassifier, x, name: str):
    """The fitted net's layers, copied with their weights; the last Dense emits logits (softmax comes after)."""
    import keras

    x = to_keras(est.scaler_, x, name)
    layers = [layer for layer in est.model_.layers if not isinstance(layer, keras.layers.InputLayer)]
    for i, layer in enumerate(layers):
        config = {**layer.get_config(), "name": f"{name}mlp{i}_{layer.name}"}
        if i == len(layers) - 1:
            config["activation"] = "linear"
        copy = layer.__class__.from_config(config)
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return x


def check_classes(estimator, n_classes: int) -> None:
    """The converted logits are columns 0..n-1 of the class list, so the head must have seen every class."""
    fitted = np.asarray(estimator.classes_)
    if not np.array_equal(fitted, np.arange(n_classes)):
        raise NotConvertible(f"the head was fitted on classes {fitted.tolist()} of {n_classes}; a converted head "
                             f"needs every class in its training rows.")
