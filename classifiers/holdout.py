"""Held-out rows for early stopping and model selection inside a head's own `fit`: split by image, stratified."""
from __future__ import annotations

import numpy as np


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
