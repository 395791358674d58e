"""The head registry: name -> a fresh, unfitted scikit-learn estimator plus the grid its hyperparameters are
picked from (by cross-validation inside the training rows).

Heads are plain estimators or Pipelines, so `clone`, `GridSearchCV` and joblib work unchanged. Standardisation
is a Pipeline step where the head needs it, so it is fitted on training rows only. `pca+<head>` composes a PCA
step in front of any registered head; `sgd` and `mlp` also accept a RowStream and stream from HDF5.

>>> spec = get_head("pca+logreg")
>>> sorted(spec.grid)
['head__clf__C', 'pca__n_components']
>>> spec.build(0).steps[0][0]
'pca'
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted

from classifiers.data import iter_batches
from classifiers.holdout import start_streaming_fit
from features.errors import UsageError, did_you_mean


@dataclass(frozen=True)
class HeadSpec:
    """A registered head. `build(random_state)` returns an unfitted estimator; `grid` maps its parameters to
    candidate values; `streaming` heads also fit from a RowStream; `default` heads form the fast default set;
    `max_fit_rows`: a head whose fit or prediction does not scale is fitted on a stratified sample of about that
    many training rows (classifiers.evaluate.capped), with a note, rather than left running for hours."""

    name: str
    build: Callable[[int | None], BaseEstimator]
    grid: dict[str, list] = field(default_factory=dict)
    streaming: bool = False
    default: bool = False
    summary: str = ""
    max_fit_rows: int | None = None


HEADS: dict[str, HeadSpec] = {}

# Training rows past which a head is fitted on a stratified sample (docs/classify.md, "Large caches", has the timings
# on 1280-d features): knn's prediction compares every scored row with every training row; liblinear's one-vs-rest
# SVM and lbfgs grow with rows x classes x iterations; a forest of 300 trees on wide features is slower still.
KNN_MAX_ROWS = 20_000
LINSVM_MAX_ROWS = 50_000
LOGREG_MAX_ROWS = 100_000
TREES_MAX_ROWS = 20_000


def register_head(name: str, grid: dict[str, list] | None = None, streaming: bool = False, default: bool = False,
                  max_fit_rows: int | None = None):
    """Decorator: add a builder `f(random_state) -> estimator` to HEADS under `name`; its docstring is the summary."""
    def wrap(build: Callable[[int | None], BaseEstimator]) -> Callable[[int | None], BaseEstimator]:
        if name in HEADS:
            raise ValueError(f"Head {name!r} is already registered.")
        HEADS[name] = HeadSpec(name, build, dict(grid or {}), streaming, default, (build.__doc__ or "").strip(),
                               max_fit_rows)
        return build
    return wrap


def small_grid(grid: dict[str, list], keep: int = 2) -> dict[str, list]:
    """The grid of a large cache's cheaper protocol: the `keep` middle values of each parameter.

    >>> small_grid({"clf__C": [1e-3, 1e-2, 1e-1, 1.0], "n_neighbors": [1, 5, 15]})
    {'clf__C': [0.01, 0.1], 'n_neighbors': [5, 15]}
    """
    return {name: values[(len(values) - 1) // 2:][:keep] if len(values) > keep else list(values)
            for name, values in grid.items()}


def _scaled(clf: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


@register_head("logreg", grid={"clf__C": [1e-3, 1e-2, 1e-1, 1.0]}, default=True, max_fit_rows=LOGREG_MAX_ROWS)
def _logreg(random_state):
    """L2 logistic regression on standardised features; C swept on inner folds (the linear-probe protocol)."""
    return _scaled(LogisticRegression(max_iter=2000, random_state=random_state))


@register_head("linsvm", grid={"clf__C": [1e-4, 1e-3, 1e-2, 1e-1]}, default=True, max_fit_rows=LINSVM_MAX_ROWS)
def _linsvm(random_state):
    """Linear SVM (squared hinge) on standardised features; no probabilities, so no log-loss."""
    return _scaled(LinearSVC(max_iter=5000, random_state=random_state))


@register_head("ridge", grid={"clf__alpha": [1.0, 10.0, 100.0, 1000.0]}, default=True)
def _ridge(random_state):
    """Ridge regression on one-hot targets, standardised features: the fastest linear baseline."""
    return _scaled(RidgeClassifier())


@register_head("knn", grid={"n_neighbors": [1, 5, 15]}, default=True, max_fit_rows=KNN_MAX_ROWS)
def _knn(random_state):
    """k nearest neighbours by cosine distance, distance-weighted votes; no training, slow to predict at scale."""
    return KNeighborsClassifier(metric="cosine", algorithm="brute", weights="distance")


@register_head("rf", max_fit_rows=TREES_MAX_ROWS)
def _rf(random_state):
    """Random forest of 300 trees: no scaling needed, robust, slower on wide features."""
    return RandomForestClassifier(n_estimators=300, random_state=random_state)


@register_head("hgb", max_fit_rows=TREES_MAX_ROWS)
def _hgb(random_state):
    """Histogram gradient boosting with early stopping on an internal 10% split: strong on tabular, slow on wide."""
    return HistGradientBoostingClassifier(max_iter=200, early_stopping=True, random_state=random_state)


@register_head("sgd", streaming=True, default=True)
def _sgd(random_state):
    """Logistic regression by SGD with partial_fit, streamed from HDF5; alpha picked by log-loss on 20% of train."""
    return StreamingSGDClassifier(random_state=random_state)


@register_head("mlp", streaming=True)
def _mlp(random_state):
    """Small Keras dense net (256 ReLU, dropout 0.5), early stopping on a validation split; streams from HDF5."""
    from classifiers.mlp import KerasMLPClassifier
    return KerasMLPClassifier(random_state=random_state)


# prefix -> (builder of the transformer step, its grid): 'pca+logreg' puts PCA in front of logreg
TRANSFORMS: dict[str, tuple[Callable[[int | None], BaseEstimator], dict[str, list]]] = {
    "pca": (lambda random_state: PCA(random_state=random_state), {"n_components": [0.9, 0.99]}),
}


def _compose(prefix: str, head: HeadSpec) -> HeadSpec:
    build_step, step_grid = TRANSFORMS[prefix]
    grid = {f"{prefix}__{k}": v for k, v in step_grid.items()} | {f"head__{k}": v for k, v in head.grid.items()}
    return HeadSpec(f"{prefix}+{head.name}", lambda rs: Pipeline([(prefix, build_step(rs)), ("head", head.build(rs))]),
                    grid, streaming=False, summary=f"{prefix.upper()} (variance kept tuned), then {head.name}",
                    max_fit_rows=head.max_fit_rows)


def list_heads(pattern: str = "*") -> list[str]:
    """Registered head names matching a shell-style pattern, sorted; compositions are `<transform>+<head>`."""
    return sorted(fnmatch.filter(HEADS, pattern))


def get_head(name: str) -> HeadSpec:
    """The entry for `name`; `pca+<head>` is composed on request. Unknown names list the valid ones."""
    prefix, _, base = name.rpartition("+")
    if base in HEADS and (not prefix or prefix in TRANSFORMS):
        return _compose(prefix, HEADS[base]) if prefix else HEADS[base]
    valid = list_heads() + [f"{t}+<head>" for t in TRANSFORMS]
    raise UsageError(f"Unknown head {name!r}. Expected one of: {', '.join(valid)}."
                     f"{did_you_mean(name, list_heads() + [f'{t}+{h}' for t in TRANSFORMS for h in HEADS])}")


def resolve_heads(text: str | None) -> list[HeadSpec]:
    """HEADS= value -> entries: None/'default' -> the fast default set, 'all' -> every registered head,
    else comma-separated names (compositions allowed). Validated before any data is read."""
    text = (text or "default").strip()
    named = {"default": [n for n in list_heads() if HEADS[n].default], "all": list_heads()}
    names = named.get(text) or [part.strip() for part in text.split(",") if part.strip()]
    return [get_head(name) for name in dict.fromkeys(names)]


class StreamingSGDClassifier(ClassifierMixin, BaseEstimator):
    """Logistic regression by SGD, fitted with `partial_fit` over batches, so X may be a RowStream over HDF5.

    Why it looks like this: a first pass gathers standardisation statistics from the training rows; then every
    epoch trains one model per `alphas` value on the same batches and scores each on a held-out
    `validation_fraction` of the training rows as they stream past (progressive validation); the model of the
    alpha with the lowest held-out log-loss is kept, so the search costs no extra reads of a cache larger than RAM.
    Training stops before `epochs` once the best held-out log-loss has not fallen by a relative `tol` for
    `n_iter_no_change` epochs in a row (as scikit-learn's SGD does): on a large cache a few epochs are enough, and
    each costs a pass over the file.
    """

    def __init__(self, alphas=(1e-4, 1e-3, 1e-2, 1e-1), epochs: int = 20, batch_size: int = 256,
                 validation_fraction: float = 0.2, tol: float = 1e-3, n_iter_no_change: int = 3,
                 random_state: int | None = None):
        self.alphas = alphas
        self.epochs = epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        """`groups`: image id per row; the alpha is then picked on held-out images, all their views together."""
        start = start_streaming_fit(X, y, self.validation_fraction, self.random_state, groups, self.batch_size)
        y, rng, held_out, scaler, codes = np.asarray(y), start.rng, start.held_out, start.scaler, start.codes
        self.classes_ = start.classes
        models = [SGDClassifier(loss="log_loss", alpha=alpha, average=True, random_state=self.random_state)
                  for alpha in self.alphas]
        best_loss, waited = np.inf, 0
        for epoch in range(self.epochs):
            loss = np.zeros(len(models))  # summed log-loss on held-out rows, last epoch only
            for positions, batch in iter_batches(X, self.batch_size, rng):
                batch, labels, val = scaler.transform(batch), y[positions], held_out[positions]
                for i, model in enumerate(models):
                    if val.any() and hasattr(model, "coef_"):
                        proba = model.predict_proba(batch[val])[np.arange(val.sum()), codes[positions][val]]
                        loss[i] -= np.log(np.clip(proba, 1e-15, None)).sum()
                    if (~val).any():
                        model.partial_fit(batch[~val], labels[~val], classes=self.classes_)
            if held_out.any() and epoch > 0:  # the first epoch scores models that had seen no rows yet
                waited = 0 if loss.min() < best_loss * (1 - self.tol) else waited + 1
                best_loss = min(best_loss, loss.min())
                if waited >= self.n_iter_no_change:
                    break
        self.n_epochs_ = epoch + 1
        best = int(np.argmin(loss))
        self.scaler_, self.model_, self.alpha_ = scaler, models[best], self.alphas[best]
        self.validation_log_loss_ = loss[best] / max(1, held_out.sum())
        self.n_features_in_ = X.shape[1]
        return self

    def _collect(self, X, method: str) -> np.ndarray:
        check_is_fitted(self, "model_")
        out = None
        for positions, batch in iter_batches(X, max(self.batch_size, 1024)):
            values = getattr(self.model_, method)(self.scaler_.transform(batch))
            if out is None:
                out = np.empty((X.shape[0],) + values.shape[1:], dtype=values.dtype)
            out[positions] = values
        return out

    def predict_proba(self, X) -> np.ndarray:
        return self._collect(X, "predict_proba")

    def decision_function(self, X) -> np.ndarray:
        return self._collect(X, "decision_function")

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError on an unfitted head
        return self.classes_[np.argmax(proba, axis=1)]
