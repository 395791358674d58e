"""Held-out rows for early stopping and model selection inside a head's own `fit`: split by image, stratified."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.preprocessing import StandardScaler

from classifiers.data import iter_batches


def holdout_mask(y: np.ndarray, fraction: float, rng: np.random.Generator,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Stratified boolean mask of rows held out for validation; a class keeps at least one training image.

    `groups` (image id per row) holds out whole images, so the augmented views of a held-out image never train
    the model they validate; None: every row is its own image.
    """
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    first = np.unique(groups, return_index=True)[1]  # one row per image stands for its class
    mask = np.zeros(len(y), dtype=bool)
    for cls in np.unique(y):
        images = rng.permutation(groups[first[y[first] == cls]])
        mask |= np.isin(groups, images[:min(len(images) - 1, int(round(fraction * len(images))))])
    return mask


@dataclass(frozen=True)
class StreamingStart:
    """Where a streaming head's `fit` starts: its classes, y as indices into them, the held-out rows, a scaler fitted
    on the training rows only, and the generator the rest of the fit draws from."""

    classes: np.ndarray
    codes: np.ndarray
    held_out: np.ndarray
    scaler: StandardScaler
    rng: np.random.Generator


def start_streaming_fit(X, y, fraction: float, random_state: int | None, groups: np.ndarray | None,
                        scaler_batch: int) -> StreamingStart:
    """The common first steps of the heads that stream X (an array or a RowStream over HDF5): check the row counts,
    hold out validation images, then one pass for the standardisation statistics of the rows that train."""
    y = np.asarray(y)
    if len(y) != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {len(y)} labels.")
    rng = np.random.default_rng(random_state)
    classes, codes = np.unique(y, return_inverse=True)
    held_out = holdout_mask(codes, fraction, rng, groups)
    scaler = StandardScaler()
    for positions, batch in iter_batches(X, scaler_batch):
        keep = ~held_out[positions]
        if keep.any():
            scaler.partial_fit(batch[keep])
    return StreamingStart(classes, codes, held_out, scaler, rng)
