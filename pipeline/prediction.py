"""Stage two, applied: run a saved head on new images, extracted exactly as its training features were.

`predict(cfg) -> Path` reads `model.json` beside the model, re-runs stage one with the recorded ExtractConfig
(only the image folder and output path change), refuses features that differ in any recorded identity
(backbone file, weights, size, resize, preprocessing, pooling, dtype, layer shape), and writes a CSV of path,
predicted label and per-class probability, with a row and the reason for every file it could not use. It
replaces no file it did not write. Example:

    >>> from pipeline.prediction import PredictConfig, predict
    >>> csv = predict(PredictConfig(model="results/20240101-120000/best", data="new/images"))  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn

from classifiers import saved
from classifiers.data import READ_SHARE, Cache, block_rows_for, open_cache
from classifiers.evaluate import class_scores
from classifiers.memory import parse_bytes
from features.errors import UsageError, check_name_lengths
from features.files import replace_atomically
from features.schema import ConfigMismatch, recipe
from features.store import cache_dir, check_ours
from features.tars import is_pattern, pattern_root
from pipeline.config import recorded_config

ERROR = "error"  # CSV column: why a file got no prediction ('' when it got one)
SHOWN_SKIPPED = 5  # unusable files listed on screen; the CSV has them all


@dataclass
class PredictConfig:
    """Everything `predict` needs. Field names are the CLI flags (`--batch-size` ↔ `batch_size`)."""

    model: str  # a saved model directory, e.g. results/<run>/best (holds model.json)
    data: str  # an image folder, or an existing complete cache (.h5) made with the model's settings
    out: str | None = None  # CSV path; None: predictions/<run>__<model>/<data name>.csv (never in the model folder)
    batch_size: int | None = None  # extraction batch size; None: as recorded
    memory_budget: str = "2GiB"
    overwrite: bool = False  # rebuild the extracted cache even if one exists at the derived path
    trust_pickle: bool = False  # load a legacy model.joblib (a pickle can run code: only for folders you trust)


def default_out(model_dir: Path, data_name: str) -> Path:
    """predictions/<run>__<model>/<data name>.csv in the working directory: a model folder may be read-only, and a
    results folder holds only what its classify run wrote."""
    model = model_dir.resolve()
    return Path("predictions") / f"{model.parent.name}__{model.name}" / f"{data_name}.csv"


def _extract(record: dict, cfg: PredictConfig, model_dir: Path, cache_path: Path) -> Path:
    """Run stage one on cfg.data with the recorded settings and the backbone found by its hash."""
    from pipeline.extraction import extract

    xcfg = recorded_config(record, model_dir)
    trained_beside = Path(record.get("source_file") or "/nonexistent").parent / "engines"
    engines = trained_beside if trained_beside.is_dir() else cache_dir() / "engines"  # where its graph was exported
    return extract(xcfg.replace(data=cfg.data, out=str(cache_path), layer=[record["layer"]], shard=None, labels=None,
                                path_column=None, label_column=None, overwrite=cfg.overwrite,
                                batch_size=cfg.batch_size or xcfg.batch_size), engines=engines).path


def check_compatible(record: dict, cache: Cache) -> None:
    """Refuse features made differently from the training features (every `recipe` attribute of the schema; the
    backbone by name for registry models, by file content for user .keras files); the error lists every difference.
    A model.json of an older version that did not record an attribute cannot vouch for it: that counts as a
    difference too."""
    wanted, found = recipe(record), recipe(cache.attrs.to_h5())
    diffs = [f"{key}: model {wanted.get(key)!r}, data {found.get(key)!r}" for key in dict.fromkeys([*wanted, *found])
             if str(wanted.get(key)) != str(found.get(key))]
    layer = record["layer"]
    if layer not in cache.shapes:
        diffs.append(f"layer: model {layer!r}, data has {sorted(cache.shapes)}")
    elif list(cache.shapes[layer]) != list(record["row_shape"]):
        diffs.append(f"{layer} shape: model {tuple(record['row_shape'])}, data {cache.shapes[layer]}")
    if diffs:
        raise ConfigMismatch(f"Features of {str(cache.path)!r} do not match the model's ({len(diffs)} difference(s): "
                         f"{'; '.join(diffs)}). Predict with features extracted exactly as for training.")


def predict(cfg: PredictConfig) -> Path:
    """Predict every file of cfg.data; returns the CSV path (columns: path, predicted, p_<class>…, [label], error).
    A file that could not be used gets a row with an empty prediction and the reason in `error`."""
    model_dir = Path(cfg.model)
    record = saved.load_record(model_dir)
    budget = parse_bytes(cfg.memory_budget)
    data = Path(cfg.data)
    pattern = is_pattern(cfg.data) and not data.exists()  # tar shards named by a glob or brace pattern
    if not data.exists() and not pattern:
        raise FileNotFoundError(f"DATA {cfg.data!r} does not exist: give an image folder, tar shards or a feature "
                                "cache (.h5).")
    cache_given = data.is_file() and data.suffix != ".tar"
    network = saved.is_network(record)  # a fine-tuned network (`make finetune`) reads images itself
    if network and cache_given:
        raise UsageError(f"MODEL {cfg.model!r} is a fine-tuned network: it reads images, not feature caches. "
                         f"Received DATA={cfg.data!r}; pass an image folder.")
    named = data.stem if cache_given or data.suffix == ".tar" else None
    name = named or (pattern_root(cfg.data) if pattern else data).resolve().name
    out = Path(cfg.out) if cfg.out else default_out(model_dir, name)
    derived = None if network or cache_given else out.with_suffix(".h5")
    check_outputs(out, derived, record)
    if network:
        from pipeline.finetune import predict_images

        table, skipped = predict_images(record, model_dir, data, cfg.batch_size)
    else:
        model = saved.load_head(model_dir, record, cfg.trust_pickle)  # a bad model fails before any extraction
        cache = open_cache(data if derived is None else _extract(record, cfg, model_dir, derived))
        check_compatible(record, cache)
        table = _predict_cache(model, record, cache, budget)
        root = Path(cache.attrs.data_root)
        skipped = [(str(root / path), reason) for path, reason in cache.skipped]
    unused = pd.DataFrame({"path": [p for p, _ in skipped], "predicted": "", ERROR: [r for _, r in skipped]})
    table = pd.concat([table.assign(**{ERROR: ""}), unused], ignore_index=True)
    if "label" in table:
        table["label"] = table["label"].fillna("")
    table = table[[c for c in table.columns if c != ERROR] + [ERROR]]
    replace_atomically(out, lambda tmp: table.to_csv(tmp, index=False))
    return out


def _predict_cache(model, record: dict, cache: Cache, budget: int) -> pd.DataFrame:
    """One row per image (its clean view): path, predicted, p_<class>… when the head has probabilities, label."""
    names = np.array(record["class_names"])
    layer, rows = record["layer"], np.flatnonzero(cache.view == 0)
    probabilities, predicted = None, np.empty(len(rows), dtype=np.int64)
    with sklearn.config_context(working_memory=max(1, budget // READ_SHARE // 2**20)):
        for positions, raw in cache.blocks(layer, rows, block_rows_for(cache.shapes[layer], budget)):
            scores, is_proba = class_scores(model, raw, len(names))
            predicted[positions] = np.argmax(scores, axis=1) if scores is not None else model.predict(raw)
            if is_proba:
                probabilities = np.zeros((len(rows), len(names))) if probabilities is None else probabilities
                probabilities[positions] = scores
    root = Path(cache.attrs.data_root)
    table = pd.DataFrame({"path": [str(root / p) for p in cache.paths[rows]], "predicted": names[predicted]})
    if probabilities is not None:
        for i, name in enumerate(names):
            table[f"p_{name}"] = probabilities[:, i]
    if np.any(cache.labels[rows] >= 0):
        known = np.array(cache.label_names + [""])
        table["label"] = known[cache.labels[rows]]  # -1 -> '' (unlabelled)
    return table


def _is_earlier_output(path: Path, record: dict) -> bool:
    """A CSV this command wrote for a model with the same classes (its header says so)."""
    try:
        with open(path, newline="") as file:
            header = next(csv.reader(file))
    except (OSError, UnicodeDecodeError, StopIteration, csv.Error):
        return False
    classes = {f"p_{name}" for name in record["class_names"]}
    return header[:2] == ["path", "predicted"] and set(header) <= {"path", "predicted", "label", ERROR} | classes


def _is_cache(path: Path) -> bool:
    """True for nothing there or a cache of this tool."""
    try:
        check_ours(path)
    except UsageError:
        return False
    return True


def check_outputs(out: Path, derived_cache: Path | None, record: dict) -> None:
    """Before any work: the CSV may replace only this command's earlier output for the same classes, and the
    derived cache only a feature cache; the folder must be writable; no name may be too long for the filesystem."""
    check_name_lengths("--out", out, [out.with_name(f".tmp{os.getpid()}.{out.name}")])
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a folder; expected a CSV file path, e.g. "
                         f"{str(out / 'predictions.csv')!r}.")
    if out.exists() and not _is_earlier_output(out, record):
        raise UsageError(f"--out {str(out)!r} exists and is not an earlier prediction CSV of this model; it is not "
                         f"replaced. Choose another --out, or move that file away.")
    if derived_cache and not _is_cache(derived_cache):
        raise UsageError(f"{str(derived_cache)!r}, where predict keeps the features of the new images (beside "
                         f"--out), exists and is not a feature cache; it is not replaced. Choose another --out, or "
                         f"move that file away.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {str(out)!r}: its folder cannot be created ({err.strerror}). "
                         f"Choose another --out.") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {str(out)!r}: the folder {str(out.parent)!r} is not writable. Choose another --out.")


def summary(csv_path: Path, classes: Sequence[str], top: int = 10, shown: int = SHOWN_SKIPPED) -> str:
    """A few lines for the terminal: counts per predicted class, every file that could not be used (a count and
    the first few), and the accuracy over the images labelled with one of the model's `classes` (a label the model
    never learned cannot be predicted, so it is not scored)."""
    table = pd.read_csv(csv_path, keep_default_na=False, dtype={"label": str})
    failed = table[table[ERROR] != ""] if ERROR in table else table.iloc[:0]
    table = table.drop(failed.index)
    counts = table["predicted"].value_counts()
    lines = [f"predicted {len(table)} images -> {csv_path}",
             "  " + ", ".join(f"{name}: {n}" for name, n in counts.head(top).items())
             + (f", … ({len(counts) - top} more classes)" if len(counts) > top else "")]
    if len(failed):
        lines.append(f"  could not use {len(failed)} file(s) (rows with an empty prediction and the reason in "
                     f"'{ERROR}'):")
        lines += [f"    {row.path}: {getattr(row, ERROR)}" for row in failed.head(shown).itertuples()]
        if len(failed) > shown:
            lines.append(f"    … and {len(failed) - shown} more")
    if "label" in table:
        labelled = table[table["label"] != ""]
        scored = labelled[labelled["label"].isin(list(classes))]
        if len(scored):
            accuracy = float((scored["label"] == scored["predicted"]).mean())
            unknown = len(labelled) - len(scored)
            lines.append(f"  accuracy on {len(scored)} images labelled with a model class: {accuracy:.4f}"
                         + (f" ({unknown} with another label not scored)" if unknown else ""))
    prob_cols = [c for c in table.columns if c.startswith("p_")]
    if prob_cols and len(table):
        confidence = table[prob_cols].astype(float).max(axis=1)
        lines.append(f"  median confidence {confidence.median():.3f}; {int((confidence < 0.6).sum())} images below 0.6")
    return "\n".join(lines)
