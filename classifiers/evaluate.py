"""Honest evaluation as pure functions: which rows fit, which rows score, and the numbers that come out.

With train/val/test splits in the cache the head is fitted on `train`, its hyperparameters are picked by
cross-validation inside `train`, and it is scored once on `test` if present, else on `val`; the scored split
never takes part in any choice. Without splits: stratified k-fold CV, mean ± std over folds, with the same
inner selection inside each training fold. Unlabelled rows (label -1) are never used.

A cache with augmented views (docs/augment.md) has several rows per training image. Every fold, outer or inner,
is drawn over *images* and then expanded to rows: a training part takes every view of its images, a scored part
only their clean views (view 0). So no image is on both sides of a split, and scores count each image once.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, log_loss,
                             top_k_accuracy_score)
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold
from sklearn.utils.validation import has_fit_parameter
from threadpoolctl import threadpool_limits

from classifiers.data import take_rows
from classifiers.heads import HeadSpec, small_grid
from features.errors import UsageError

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5", "log_loss")
MIN_IMAGES_PER_CLASS = 2  # fewer: some CV training fold lacks the class entirely; the class is dropped with a note
# Above this many labelled images (or training images, with a held-out split in the cache) k-fold CV x inner grid is
# replaced by one stratified held-out fifth and a smaller grid picked on one held-out fifth of the training images.
# Why: 5 folds x (4 C x 5 inner folds + 1) = 105 logreg fits took 68 s at 10k x 1280 on 2 cores (docs/classify.md,
# "Large caches"); the fits grow at least linearly with the rows, so 100k would take hours for one head.
LARGE_IMAGES = 20_000
HOLDOUT_FOLDS = 5  # the held-out part of the large protocol is one fold of this many: a fifth


@dataclass
class Plan:
    """Rows (indices into the cache) for each fold, the rows a final model is fitted on, and why."""

    scheme: str  # 'val', 'test' (held-out split), 'cv5' (k-fold) or 'holdout' (one held-out fifth: a large cache)
    folds: list[tuple[np.ndarray, np.ndarray]]  # (fit rows: every view, scored rows: clean views only)
    fit_rows: np.ndarray
    inner_cv: int  # folds of the hyperparameter search; 1: a single held-out fifth (large caches)
    images: np.ndarray  # image id per cache row: the views of one image share it
    clean: np.ndarray  # per cache row: True for the clean view (view 0), the only rows ever scored
    notes: list[str] = field(default_factory=list)
    large: bool = False  # over LARGE_IMAGES: one inner split and a smaller grid (heads.small_grid)

    def inner_folds(self, fit_rows: np.ndarray, y_fit: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The hyperparameter search's folds inside `fit_rows` (positions into it, `y_fit` aligned with it),
        grouped by image and scored on clean views, like the outer folds."""
        if self.inner_cv == 1:
            return image_folds(y_fit, self.images[fit_rows], self.clean[fit_rows], HOLDOUT_FOLDS, seed)[:1]
        return image_folds(y_fit, self.images[fit_rows], self.clean[fit_rows], self.inner_cv, seed)

    @property
    def rows(self) -> np.ndarray:
        """Every row any fold touches, sorted: the rows to reduce once per run."""
        return np.unique(np.concatenate([np.concatenate(fold) for fold in self.folds]))


def _small_classes(y: np.ndarray, folds: int, names: list[str], where: str) -> list[str]:
    small = {names[c]: n for c, n in sorted(Counter(y.tolist()).items()) if n < folds}
    if not small:
        return []
    listed = ", ".join(f"{name!r} ({n})" for name, n in small.items())
    return [f"{len(small)} class(es) in {where} have fewer images than the {folds} folds: {listed}. "
            f"They are missing from some folds, so their scores are noisy; add images or lower CV."]


def image_folds(y: np.ndarray, images: np.ndarray, clean: np.ndarray, n_splits: int, seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over images, expanded to rows: (every view of the training images, the clean views of the
    test images), as positions into `y`. Without augmented views this is exactly StratifiedKFold over the rows."""
    first = np.sort(np.unique(images, return_index=True)[1])  # one row per image (its clean view), in row order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny-class case is reported by plan_evaluation
        splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
        folds = []
        for _, test in splitter.split(first, y[first]):
            held = np.isin(images, images[first[test]])
            folds.append((np.flatnonzero(~held), np.flatnonzero(held & clean)))
    return folds


def plan_evaluation(labels: np.ndarray, split: np.ndarray, names: list[str], cv: int, seed: int,
                    source: str = "the cache", images: np.ndarray | None = None,
                    view: np.ndarray | None = None, large: int = LARGE_IMAGES) -> Plan:
    """Decide held-out split or k-fold CV for one cache; warn (not fail) on imbalance and tiny classes.

    `images` (image id per row) and `view` (0 = clean) describe augmented views; None means one clean row per image.
    Class counts, fold counts and warnings are about images, not rows. Over `large` images to fit on, the cheaper
    protocol of a large cache: scheme 'holdout' (one stratified fifth scored) instead of k-fold CV, and one inner
    split with a smaller grid; a note says so.
    """
    if cv < 2:
        raise UsageError(f"CV must be at least 2 folds. Received: cv={cv}.")
    images = np.arange(len(labels)) if images is None else np.asarray(images)
    clean = np.ones(len(labels), dtype=bool) if view is None else np.asarray(view) == 0
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise UsageError(f"{source} has no labelled images (every label is -1, layout "
                         f"'unlabelled'): classify needs labels. Extract class folders (DATA/<class>/*.jpg) "
                         f"or pass LABELS=<csv> to `make extract`.")
    present = np.unique(labels[labelled])
    if len(present) < 2:
        raise UsageError(f"{source} has a single labelled class ({names[present[0]]!r}); classify needs at least two.")
    labelled, notes = _drop_small_classes(labels, split, labelled, clean, names, source)
    counts = np.bincount(labels[labelled[clean[labelled]]])
    counts = counts[counts > 0]
    if counts.max() > 3 * counts.min():
        notes.append(f"{source}: classes are imbalanced ({counts.min()} to {counts.max()} images); "
                     f"read balanced_accuracy and macro_f1, not only accuracy.")
    split = split[labelled]
    train = labelled[split == "train"]
    held_name = "test" if np.any(split == "test") else "val"
    held = labelled[(split == held_name) & clean[labelled]]
    if len(train) and len(held):
        n_train = int(clean[train].sum())
        if n_train > large:
            inner, note = 1, [_large_note(source, n_train, large, f"'{held_name}' split", cv)]
        else:
            inner, note = _inner_folds([labels[train[clean[train]]]], min(cv, 5), f"{source} train")
        notes += note
        missing = sorted(set(labels[held].tolist()) - set(labels[train].tolist()))
        if missing:
            notes.append(f"{source}: classes {[names[c] for c in missing]} occur in {held_name} but not in train; "
                         f"no head can predict them.")
        if held_name == "test" and np.any(split == "val"):
            notes.append(f"{source}: scored on 'test'; the 'val' rows are not used.")
        return Plan(held_name, [(train, held)], train, inner, images, clean, notes, large=inner == 1)
    n_images = int(clean[labelled].sum())
    if n_images > large:
        fit, score = image_folds(labels[labelled], images[labelled], clean[labelled], HOLDOUT_FOLDS, seed)[0]
        notes.append(_large_note(source, n_images, large, f"stratified held-out 1/{HOLDOUT_FOLDS} of the images "
                                 f"(scheme 'holdout'), not {cv}-fold CV", cv))
        return Plan("holdout", [(labelled[fit], labelled[score])], labelled[fit], 1, images, clean, notes, large=True)
    largest = int(counts.max())
    folds_n = min(cv, largest)
    if folds_n < 2:
        raise UsageError(f"{source}: every class has a single image; k-fold CV needs at least 2 images in some class.")
    if folds_n < cv:
        notes.append(f"{source}: CV={cv} exceeds the largest class ({largest} images); using {folds_n} folds.")
    labelled_images = labels[labelled[clean[labelled]]]
    notes += _small_classes(labelled_images, folds_n, names, source)
    folds = [(labelled[a], labelled[b])
             for a, b in image_folds(labels[labelled], images[labelled], clean[labelled], folds_n, seed)]
    inner, note = _inner_folds([labels[fit[clean[fit]]] for fit, _ in folds], min(folds_n, 5), source)
    return Plan(f"cv{folds_n}", folds, labelled, inner, images, clean, notes + note)


def _large_note(source: str, n: int, large: int, scored: str, cv: int) -> str:
    return (f"{source}: {n} images to fit on, over {large}: the large-cache protocol: scored once on the {scored}; "
            f"hyperparameters picked on one held-out 1/{HOLDOUT_FOLDS} of the training images (not {min(cv, 5)}-fold "
            f"inner CV) from a smaller grid (at most 2 values per parameter); the saved model is the scored one.")


def _drop_small_classes(labels: np.ndarray, split: np.ndarray, labelled: np.ndarray, clean: np.ndarray,
                        names: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """Labelled rows without the classes that have fewer than MIN_IMAGES_PER_CLASS images to fit on (the 'train'
    split when there is a held-out split, else every labelled image), and a note naming each dropped class.
    Refused when fewer than two classes would remain."""
    in_split = split[labelled]
    held_out = np.any(in_split == "train") and np.any(np.isin(in_split, ["val", "test"]))
    pool = labelled[in_split == "train"] if held_out else labelled
    counts = Counter(labels[pool[clean[pool]]].tolist())
    small = sorted(c for c in np.unique(labels[labelled]).tolist() if 0 < counts[c] < MIN_IMAGES_PER_CLASS)
    if not small:
        return labelled, []
    where = " in 'train'" if held_out else ""
    listed = ", ".join(f"{names[c]!r} ({counts[c]} image{'s' if counts[c] != 1 else ''})" for c in small)
    kept = labelled[~np.isin(labels[labelled], small)]
    remaining = [names[c] for c in np.unique(labels[kept]).tolist()]
    if len(remaining) < 2:
        raise UsageError(f"{source}: only {len(remaining)} class(es) ({', '.join(map(repr, remaining))}) have at "
                         f"least {MIN_IMAGES_PER_CLASS} images{where}; too few: {listed}. classify needs two classes; "
                         "add images to the small classes.")
    return kept, [f"{source}: dropped class(es) {listed}: a class needs at least {MIN_IMAGES_PER_CLASS} images"
                  f"{where} so that every training fold holds one; add images to keep it."]


def _inner_folds(fit_images: list[np.ndarray], wanted: int, where: str) -> tuple[int, list[str]]:
    """Inner CV folds for hyperparameter selection, and a note when they are fewer than `wanted`: no more than the
    smallest class has images in a training part (`fit_images`: the class of each training image, one array per
    outer fold), so that every inner fold can hold every class; at least 2.

    Why: a grid search whose inner folds outnumber a class's images fails inside scikit-learn for every head
    (e.g. 2 classes x 4 images: 3 training images per class under 4-fold CV)."""
    smallest = min(int(counts[counts > 0].min()) for counts in map(np.bincount, fit_images))
    folds = max(2, min(wanted, smallest))
    if folds == wanted:
        return folds, []
    return folds, [f"{where}: inner CV reduced to {folds} folds (from {wanted}): the smallest class has {smallest} "
                   f"training image{'s' if smallest != 1 else ''}{' in some fold' if len(fit_images) > 1 else ''}."]


def selector(spec: HeadSpec, inner_cv: int | list[tuple[np.ndarray, np.ndarray]], seed: int,
             large: bool = False) -> BaseEstimator:
    """The head with its hyperparameter search: GridSearchCV over `spec.grid` (`small_grid` of it for a `large`
    plan) inside the training rows. `inner_cv` is a number of stratified folds, or the folds themselves
    (Plan.inner_folds, grouped by image)."""
    estimator, grid = spec.build(seed), small_grid(spec.grid) if large else spec.grid
    if len(ParameterGrid(grid)) <= 1:
        return estimator.set_params(**{k: v[0] for k, v in grid.items()})
    inner = StratifiedKFold(inner_cv, shuffle=True, random_state=seed) if isinstance(inner_cv, int) else inner_cv
    return GridSearchCV(estimator, grid, cv=inner, scoring="accuracy", error_score=np.nan)


def capped(spec: HeadSpec, y: np.ndarray, images: np.ndarray, seed: int) -> tuple[np.ndarray, str | None]:
    """Positions (into `y`/`images`, the training rows) that `spec` is fitted on: all of them, or for a head that
    does not scale past `spec.max_fit_rows` rows, every view of a class-stratified random sample of images holding
    about that many rows; with a note saying so."""
    cap = spec.max_fit_rows
    if cap is None or len(y) <= cap:
        return np.arange(len(y)), None
    ids, first = np.unique(images, return_index=True)
    share = cap / len(y)  # the same share of every class's images, at least one each
    rng, chosen = np.random.default_rng(seed), []
    for c in np.unique(y[first]):
        members = ids[y[first] == c]
        chosen.append(rng.choice(members, size=max(1, int(share * len(members))), replace=False))
    keep = np.flatnonzero(np.isin(images, np.concatenate(chosen)))
    return keep, (f"fitted on a class-stratified random sample of {len(keep)} of its {len(y)} training rows: "
                  f"{spec.name} does not scale past {cap} rows (heads.py max_fit_rows); every held-out image is "
                  f"still scored")


def _fit(model: BaseEstimator, X, y: np.ndarray, images: np.ndarray) -> BaseEstimator:
    """model.fit, passing the image ids to heads whose own validation split must keep an image's views together."""
    return model.fit(X, y, groups=images) if has_fit_parameter(model, "groups") else model.fit(X, y)


def class_scores(model, X, n_classes: int) -> tuple[np.ndarray | None, bool]:
    """(scores in columns 0..n_classes-1, are they probabilities); classes unseen in training score 0 / -inf."""
    fitted = np.asarray(model.classes_)
    if hasattr(model, "predict_proba"):
        out = np.zeros((X.shape[0], n_classes))
        out[:, fitted] = model.predict_proba(X)
        return out, True
    if hasattr(model, "decision_function"):
        raw = model.decision_function(X)
        raw = np.c_[-raw, raw] if raw.ndim == 1 else raw
        out = np.full((X.shape[0], n_classes), -np.inf)
        out[:, fitted] = raw
        return out, False
    return None, False


def metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, is_proba: bool,
            n_classes: int) -> dict[str, float]:
    """accuracy, balanced accuracy, macro-F1; top-5 when there are more than 5 classes; log-loss with probabilities."""
    labels = np.arange(n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # y_pred may hold classes absent from this fold's y_true
        out = {"accuracy": accuracy_score(y_true, y_pred),
               "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
               "macro_f1": f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0),
               "top5": np.nan, "log_loss": np.nan}
        if scores is not None and n_classes > 5:
            out["top5"] = top_k_accuracy_score(y_true, np.nan_to_num(scores, neginf=-1e30), k=5, labels=labels)
        if is_proba:
            out["log_loss"] = log_loss(y_true, np.clip(scores, 1e-15, 1), labels=labels)
    return {k: float(v) for k, v in out.items()}


@dataclass
class Evaluation:
    """What one head scored under one plan, plus what is needed to save it."""

    scores: dict[str, float]  # '<metric>' = mean over folds, '<metric>_std'
    fit_s: float
    predict_s: float
    params: list[dict]  # hyperparameters chosen in each fold
    predictions: np.ndarray  # predicted class per evaluated row (out-of-fold for CV), aligned with eval_rows
    probabilities: np.ndarray | None
    eval_rows: np.ndarray  # cache rows behind `predictions`
    model: BaseEstimator  # the last fold's fitted model: the held-out model, or the last CV fold's
    notes: list[str]


def fitted_head(model: BaseEstimator) -> tuple[BaseEstimator, dict]:
    """Unwrap a fitted GridSearchCV: (best estimator, chosen parameters)."""
    if isinstance(model, GridSearchCV):
        return model.best_estimator_, model.best_params_
    return model, {}


def evaluate(spec: HeadSpec, X, y: np.ndarray, rows: np.ndarray, plan: Plan, n_classes: int,
             seed: int) -> Evaluation:
    """Fit and score `spec` on every fold of `plan`. `X[i]` holds cache row `rows[i]`; `y` is per cache row."""
    index = {row: i for i, row in enumerate(rows.tolist())}
    per_fold, params, fit_s, predict_s = [], [], 0.0, 0.0
    preds, probs, eval_rows, notes = [], [], [], Counter()
    for fit_rows, score_rows in plan.folds:
        keep, note = capped(spec, y[fit_rows], plan.images[fit_rows], seed)
        notes.update([note] if note else [])
        fit_rows = fit_rows[keep]
        fit_pos = np.array([index[r] for r in fit_rows])
        score_pos = np.array([index[r] for r in score_rows])
        model = selector(spec, plan.inner_folds(fit_rows, y[fit_rows], seed), seed, plan.large)
        # one BLAS thread, like the rest of the evaluation: heads make many small solves, and a second thread on a
        # busy 2-core machine made each logreg fit 7x slower (docs/classify.md, "Large caches")
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("always")
            start = time.perf_counter()
            _fit(model, take_rows(X, fit_pos), y[fit_rows], plan.images[fit_rows])
            fit_s += time.perf_counter() - start
            start = time.perf_counter()
            X_score = take_rows(X, score_pos)
            scores, is_proba = class_scores(model, X_score, n_classes)
            predicted = np.argmax(scores, axis=1) if scores is not None else model.predict(X_score)
            predict_s += time.perf_counter() - start
        notes.update(f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught)
        per_fold.append(metrics(y[score_rows], predicted, scores, is_proba, n_classes))
        params.append(fitted_head(model)[1])
        preds.append(predicted)
        probs.append(scores if is_proba else None)
        eval_rows.append(score_rows)
    summary = {}
    for name in METRICS:
        values = np.array([fold[name] for fold in per_fold])
        summary[name] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values)) if len(values) > 1 else np.nan
    has_proba = all(p is not None for p in probs)
    return Evaluation(summary, fit_s, predict_s, params, np.concatenate(preds),
                      np.concatenate(probs) if has_proba else None, np.concatenate(eval_rows),
                      fitted_head(model)[0], [f"{msg} (x{n})" for msg, n in notes.items()])


def fit_final(spec: HeadSpec, X, y: np.ndarray, plan: Plan, seed: int) -> tuple[BaseEstimator, dict]:
    """The model to save after CV: selection and fit on every labelled row (X and y hold exactly plan.fit_rows),
    with the same row cap and grid as the evaluation, and one BLAS thread as in `evaluate`.

    Why the thread limit here too: this refit ran outside the evaluation's limit, and at 10k x 1280 its 21 logreg
    fits took 77 s against 68 s for the evaluation's 105 (two BLAS threads fighting other work for 2 cores)."""
    keep, _ = capped(spec, y, plan.images[plan.fit_rows], seed)
    fit_rows = plan.fit_rows[keep]
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # the same warnings were already recorded during evaluation
        model = selector(spec, plan.inner_folds(fit_rows, y[keep], seed), seed, plan.large)
        _fit(model, take_rows(X, keep) if len(keep) < len(y) else X, y[keep], plan.images[fit_rows])
    return fitted_head(model)
