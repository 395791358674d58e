"""Reductions: how a spatial map (N, H, W, C) becomes one vector per image, as sklearn transformers.

Each name the user types (`REDUCE=avg`, `grid4`, `pca64`) maps to a registry entry that builds a fresh,
unfitted transformer. The same fitted transformer is applied chunk by chunk while reading the cache and is
saved in front of the head, so `predict` reduces new features exactly as training did.

>>> import numpy as np
>>> SpatialReduce("avgmax").transform(np.ones((2, 7, 7, 8))).shape
(2, 16)
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import IncrementalPCA
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import validate_data

from features.errors import UsageError, did_you_mean


_FLOATS = (np.float32, np.float64, np.float16)  # kept as stored: no float64 copy of a float16 block


def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32, copy=False)


def _avg(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=tuple(range(1, x.ndim - 1)), dtype=np.float32)


def _max(x: np.ndarray) -> np.ndarray:
    return x.max(axis=tuple(range(1, x.ndim - 1))).astype(np.float32, copy=False)


def _avgmax(x: np.ndarray) -> np.ndarray:
    return np.concatenate([_avg(x), _max(x)], axis=1)


def _grid(x: np.ndarray, cells: int) -> np.ndarray:
    """Adaptive average pooling to cells×cells (bins as in torch's AdaptiveAvgPool2d: never empty, may overlap)."""
    if x.ndim != 4:
        raise UsageError(f"Reduce 'grid{cells}' needs spatial maps of shape (H, W, C). Received rows of shape {x.shape[1:]}.")
    h, w = x.shape[1:3]
    bins = lambda size: [(i * size // cells, -(-(i + 1) * size // cells)) for i in range(cells)]  # noqa: E731
    return np.concatenate([x[:, r0:r1, c0:c1].mean(axis=(1, 2), dtype=np.float32)
                           for r0, r1 in bins(h) for c0, c1 in bins(w)], axis=1)


# mode -> pure function (n, ..., C) -> (n, D) float32; 'grid<k>' is parsed by pool_function
_POOLS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": _flatten, "flatten": _flatten, "avg": _avg, "max": _max, "avgmax": _avgmax,
}


def pool_function(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    match = re.fullmatch(r"grid([1-9][0-9]*)", mode)
    if match:
        return functools.partial(_grid, cells=int(match.group(1)))
    if mode not in _POOLS:
        raise UsageError(f"Unknown pooling mode {mode!r}. Expected one of {sorted(_POOLS)} or 'grid<k>'.")
    return _POOLS[mode]


class SpatialReduce(TransformerMixin, BaseEstimator):
    """Stateless transformer wrapping `pool_function(mode)`: (n, ..., C) -> (n, D) float32. It learns nothing,
    so it also transforms unfitted (features are reduced while they are read, before any head is fitted)."""

    def __init__(self, mode: str = "avg"):
        self.mode = mode

    def fit(self, X, y=None):
        pool_function(self.mode)
        validate_data(self, X, allow_nd=True, dtype=_FLOATS)
        return self

    def transform(self, X) -> np.ndarray:
        return pool_function(self.mode)(validate_data(self, X, allow_nd=True, dtype=_FLOATS, reset=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


@dataclass(frozen=True)
class ReduceSpec:
    """A registered reduction. `spatial` ones reduce maps only and leave vectors alone ('none')."""

    name: str
    summary: str
    build: Callable[[], Pipeline]
    dim: Callable[[tuple[int, ...]], int]
    spatial: bool = True
    components: int = 0  # > 0: learns an IncrementalPCA from the training rows (needs that many rows in the first chunk)


def _stateless(mode: str) -> Callable[[], Pipeline]:
    return lambda: Pipeline([("pool", SpatialReduce(mode))])


def _pooled_dim(shape: tuple[int, ...], factor: int = 1) -> int:
    return shape[-1] * factor


_FIXED: dict[str, ReduceSpec] = {spec.name: spec for spec in [
    ReduceSpec("none", "vectors as stored (the default for 2-D features)", _stateless("none"), math.prod, spatial=False),
    ReduceSpec("avg", "global average pooling over H, W (the default for maps)", _stateless("avg"), _pooled_dim),
    ReduceSpec("max", "global max pooling", _stateless("max"), _pooled_dim),
    ReduceSpec("avgmax", "average and max pooling, concatenated (2C values)", _stateless("avgmax"),
               functools.partial(_pooled_dim, factor=2)),
    ReduceSpec("flatten", "every value of the map (H*W*C): large; streams when over the budget", _stateless("flatten"),
               math.prod, spatial=False),
]}


def _grid_spec(cells: int) -> ReduceSpec:
    return ReduceSpec(f"grid{cells}", f"average pooling on a {cells}x{cells} grid ({cells * cells}C values)",
                      _stateless(f"grid{cells}"), functools.partial(_pooled_dim, factor=cells * cells))


def _pca_spec(k: int) -> ReduceSpec:
    def build() -> Pipeline:
        return Pipeline([("pool", SpatialReduce("flatten")), ("pca", IncrementalPCA(n_components=k))])
    return ReduceSpec(f"pca{k}", f"flatten, then IncrementalPCA to {k} components fitted on the training rows",
                      build, lambda shape: k, spatial=False, components=k)


# prefix -> builder of a parametrised entry: 'grid4', 'pca128'
_FAMILIES: dict[str, Callable[[int], ReduceSpec]] = {"grid": _grid_spec, "pca": _pca_spec}


def list_reduces() -> list[str]:
    return sorted(_FIXED) + [f"{prefix}<k>" for prefix in sorted(_FAMILIES)]


def get_reduce(name: str) -> ReduceSpec:
    """'avg' -> its entry; 'grid4'/'pca64' are built from their family. Unknown names list the valid ones."""
    if name in _FIXED:
        return _FIXED[name]
    match = re.fullmatch(r"([a-z]+)([0-9]+)", name)
    if match and match.group(1) in _FAMILIES and int(match.group(2)) > 0:
        return _FAMILIES[match.group(1)](int(match.group(2)))
    raise UsageError(f"Unknown reduce {name!r}. Expected one of: {', '.join(list_reduces())} "
                     f"(e.g. grid2, grid4, pca64).{did_you_mean(name, list(_FIXED) + ['grid2', 'grid4', 'pca64'])}")


def resolve_reduce(name: str | None, row_shape: tuple[int, ...]) -> ReduceSpec:
    """The reduction actually applied to rows of `row_shape`: None -> 'avg' for maps, 'none' for vectors;
    pooling a vector is a no-op, so spatial reductions and 'flatten' of 1-D rows become 'none'."""
    is_map = len(row_shape) > 1
    spec = get_reduce(name or ("avg" if is_map else "none"))
    if not is_map and spec.components == 0:
        return _FIXED["none"]
    if spec.name.startswith("grid") and len(row_shape) != 3:
        raise UsageError(f"Reduce {spec.name!r} needs maps of shape (H, W, C). Received rows of shape {row_shape}; "
                         f"use avg, max, avgmax, flatten or pca<k>.")
    return spec
