"""Data problems the cache makes cheap to find, from pooled features alone (no retraining of the backbone).

- near-duplicate pairs: cosine similarity of feature vectors above a threshold; a pair across splits is leakage
  (the same picture trained on and scored), a pair with two labels is a contradiction;
- likely label errors: out-of-fold probabilities of a logistic regression, judged by cleanlab's
  `find_label_issues` (confident learning) rather than hand-written rules;
- outliers: images far from their nearest neighbours (robust z-score of the mean neighbour distance).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from classifiers.data import READ_SHARE, Cache, layers_in, load_reduced
from classifiers.reduce import resolve_reduce
from features.errors import UsageError

DUPLICATE_SIMILARITY = 0.88  # Lite0 avg_pool: planted re-encoded 90% copies score 0.90-0.93, distinct photos < 0.85
NEIGHBOURS = 5
OUTLIER_Z = 3.5
# Above this many images the audit runs on a stratified random sample of them, with a note. Why: the neighbour search
# compares every pair (N^2 x dim: 11 s at 10k x 1280 on 2 cores, so ~18 min at 100k and ~30 h at 1M), and the label
# check fits five logistic regressions on all of them.
AUDIT_MAX_IMAGES = 20_000


@dataclass
class Audit:
    """What was found; each table has one row per finding, the most suspicious first."""

    duplicates: pd.DataFrame  # path_a, path_b, split_a, split_b, label_a, label_b, similarity, cross_split
    label_issues: pd.DataFrame  # path, split, label, suggested, p_label
    outliers: pd.DataFrame  # path, split, label, distance, z
    layer: str
    n_images: int
    notes: list[str] = field(default_factory=list)  # e.g. that only a sample of a large cache was audited

    def summary(self) -> str:
        leaks = int(self.duplicates["cross_split"].sum()) if len(self.duplicates) else 0
        return (f"audit of {self.n_images} images ({self.layer}): {len(self.duplicates)} near-duplicate pair(s), "
                f"{leaks} across splits (leakage); {len(self.label_issues)} likely label error(s); "
                f"{len(self.outliers)} outlier(s)" + "".join(f" ({note})" for note in self.notes))


def neighbours(X: np.ndarray, k: int = NEIGHBOURS, budget: int = 2 << 30) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, index) of each row's k most cosine-similar other rows, computed in blocks of rows whose
    similarities (float32) and partition indices (int64) stay under budget / READ_SHARE."""
    unit = (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    k = min(k, len(X) - 1)
    sims, index = np.empty((len(X), k), np.float32), np.empty((len(X), k), np.int64)
    step = max(1, budget // (READ_SHARE * 16 * len(X)))
    for start in range(0, len(X), step):
        block = unit[start:start + step] @ unit.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf  # not its own neighbour
        top = np.argpartition(block, -k, axis=1)[:, -k:]
        index[start:start + len(block)] = top
        sims[start:start + len(block)] = np.take_along_axis(block, top, axis=1)
    return sims, index


def near_duplicates(sims: np.ndarray, index: np.ndarray, meta: pd.DataFrame,
                    threshold: float = DUPLICATE_SIMILARITY) -> pd.DataFrame:
    """Pairs (each once) whose similarity reaches `threshold`; cross-split pairs first, then by similarity."""
    rows, cols = np.nonzero(sims >= threshold)
    a, b = np.minimum(rows, index[rows, cols]), np.maximum(rows, index[rows, cols])
    pairs = pd.DataFrame({"a": a, "b": b, "similarity": sims[rows, cols]}).drop_duplicates(["a", "b"])
    left, right = meta.iloc[pairs["a"]].reset_index(drop=True), meta.iloc[pairs["b"]].reset_index(drop=True)
    table = pd.DataFrame({"path_a": left["path"], "path_b": right["path"], "split_a": left["split"],
                          "split_b": right["split"], "label_a": left["label"], "label_b": right["label"],
                          "similarity": pairs["similarity"].to_numpy().round(4)})
    table["cross_split"] = table["split_a"] != table["split_b"]
    return table.sort_values(["cross_split", "similarity"], ascending=False, kind="stable").reset_index(drop=True)


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image's class probabilities from a standardised logistic regression that never saw it."""
    folds = int(min(5, np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        raise UsageError("The label audit needs at least 2 images in every class.")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    # one BLAS thread, as for the heads: with two on a busy 2-core machine these 5 fits took 21 s instead of 4 s
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        return cross_val_predict(model, X, y, cv=cv, method="predict_proba")


def label_issues(X: np.ndarray, meta: pd.DataFrame, label_names: list[str], seed: int = 0) -> pd.DataFrame:
    """Labelled images whose label cleanlab's confident learning doubts, the least self-confident first."""
    from cleanlab.filter import find_label_issues  # imported here: only the audit needs it

    labelled = np.flatnonzero(meta["y"].to_numpy() >= 0)
    y = meta["y"].to_numpy()[labelled]
    present, y_dense = np.unique(y, return_inverse=True)  # cleanlab wants classes 0..K-1, all present
    if len(present) < 2:  # unlabelled or single-class data: no label can be doubted
        return pd.DataFrame(columns=["path", "split", "label", "suggested", "p_label"])
    probs = out_of_fold_probabilities(X[labelled], y_dense, seed)
    # n_jobs=1: cleanlab's default forks a multiprocessing pool, and a fork of a process whose TensorFlow / ONNX
    # Runtime threads hold locks can hang forever (seen here); one process gives the same result (cleanlab's docs)
    found = find_label_issues(y_dense, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    table = meta.iloc[labelled[found]][["path", "split", "label"]].reset_index(drop=True)
    table["suggested"] = [label_names[c] for c in present[probs[found].argmax(axis=1)]]
    table["p_label"] = probs[found, y_dense[found]].round(4)
    return table


def outliers(sims: np.ndarray, meta: pd.DataFrame, z: float = OUTLIER_Z) -> pd.DataFrame:
    """Images whose mean distance to their nearest neighbours is far above the typical (robust z > `z`)."""
    distance = 1 - sims.mean(axis=1)
    mad = 1.4826 * np.median(np.abs(distance - np.median(distance))) or 1e-12
    scores = (distance - np.median(distance)) / mad
    flagged = np.flatnonzero(scores > z)
    table = meta.iloc[flagged][["path", "split", "label"]].reset_index(drop=True)
    table["distance"], table["z"] = distance[flagged].round(4), scores[flagged].round(2)
    return table.sort_values("z", ascending=False).reset_index(drop=True)


def audit(X: np.ndarray, meta: pd.DataFrame, label_names: list[str], layer: str = "", seed: int = 0,
          threshold: float = DUPLICATE_SIMILARITY, budget: int = 2 << 30) -> Audit:
    """Every check on one feature matrix; `meta` has path, split, label (name) and y (class index, -1 none)."""
    sims, index = neighbours(X, budget=budget)
    return Audit(near_duplicates(sims, index, meta, threshold), label_issues(X, meta, label_names, seed),
                 outliers(sims, meta), layer, len(X))


def audit_cache(cache: Cache, layer: str | None = None, reduce: str | None = None, budget: int = 2 << 30,
                seed: int = 0, threshold: float = DUPLICATE_SIMILARITY) -> Audit:
    """Audit the clean view of every image of a cache at `layer` (default: its last), pooled by `reduce`
    (default: avg for spatial maps)."""
    layer = layer or cache.attrs.layers[-1]  # the file lists layers alphabetically
    if not layers_in(cache, [layer]):
        raise UsageError(f"Layer {layer!r} is not in {cache.name}; it has: {', '.join(cache.shapes)}.")
    rows, notes = sample_images(cache.labels, np.flatnonzero(cache.view == 0), AUDIT_MAX_IMAGES, seed)
    spec = resolve_reduce(reduce, cache.shapes[layer])
    loaded = load_reduced(cache, layer, spec, rows, rows[cache.labels[rows] >= 0], budget, desc=layer)
    if loaded.streamed:
        raise UsageError(f"The reduced {layer!r} features of {cache.name} exceed the memory budget; audit a pooled "
                         f"layer (e.g. --reduce avg) or raise --memory-budget.")
    names = np.array(cache.label_names + [""])
    meta = pd.DataFrame({"path": cache.paths[rows], "split": cache.split[rows], "label": names[cache.labels[rows]],
                         "y": cache.labels[rows]})
    found = audit(loaded.X, meta, cache.label_names, f"{layer}/{spec.name}", seed, threshold, budget)
    found.notes += notes
    return found


def sample_images(labels: np.ndarray, rows: np.ndarray, most: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`rows` (sorted), or a random sample of `most` of them stratified by label (unlabelled rows count as one
    class) with a note saying what that leaves out."""
    if len(rows) <= most:
        return rows, []
    rng, share, chosen = np.random.default_rng(seed), most / len(rows), []
    for label in np.unique(labels[rows]):
        members = rows[labels[rows] == label]
        chosen.append(rng.choice(members, size=max(1, int(share * len(members))), replace=False))
    sample = np.sort(np.concatenate(chosen))
    return sample, [f"a class-stratified random sample of {len(sample)} of the {len(rows)} images: over "
                    f"{most}, the all-pairs neighbour search would take hours, so near-duplicates and outliers are "
                    f"searched within the sample only and most duplicate pairs of the cache go unseen"]
