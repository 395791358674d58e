"""Stage two, applied: run a saved head on new images, extracted exactly as its training features were.

`predict(cfg) -> Path` reads `model.json` beside the model, re-runs stage one with the recorded ExtractConfig
(only the image folder and output path change), refuses features that differ in any recorded identity
(backbone file, weights, size, resize, preprocessing, pooling, dtype, layer shape), and writes a CSV of path,
predicted label and per-class probability. Example:

    >>> from pipeline.predict import PredictConfig, predict
    >>> csv = predict(PredictConfig(model="results/20240101-120000/best", data="new/images"))  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn

from classifiers.data import READ_SHARE, Cache, block_rows_for, open_cache
from classifiers.evaluate import class_scores
from classifiers.memory import parse_bytes
from features.errors import UsageError

# attributes that must be equal between the training cache and the new one; 'backbone' is compared by name
# for registry models, and by file content (backbone_file_sha256) for user .keras files
IDENTITY = ("backbone_file_sha256", "weights", "image_size", "resize", "preprocessing", "color", "pool", "dtype")


@dataclass
class PredictConfig:
    """Everything `predict` needs. Field names are the CLI flags (`--batch-size` ↔ `batch_size`)."""

    model: str  # a saved model directory, e.g. results/<run>/best (holds model.json)
    data: str  # an image folder, or an existing complete cache (.h5) made with the model's settings
    out: str | None = None  # CSV path; None: <model>/predictions/<data name>.csv
    batch_size: int | None = None  # extraction batch size; None: as recorded
    memory_budget: str = "2GiB"
    overwrite: bool = False  # rebuild the extracted cache even if one exists at the derived path


def load_record(model_dir: Path) -> dict:
    path = model_dir / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"No saved model at {str(model_dir)!r}: expected {str(path)!r} written by "
                                f"`make classify` (e.g. MODEL=results/<run>/best).")
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(record: dict, cfg: PredictConfig, cache_path: Path) -> Path:
    """Run stage one on cfg.data with the recorded settings; a changed backbone file is refused before any work."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract

    settings = json.loads(record["config_json"] or "{}")
    try:
        xcfg = ExtractConfig(**settings)
    except TypeError as err:
        raise UsageError(f"The model's recorded extraction settings do not fit this version's ExtractConfig "
                         f"({err}); re-run `make extract` and `make classify` with this version.") from err
    xcfg = xcfg.replace(data=cfg.data, out=str(cache_path), layer=[record["layer"]], shard=None, labels=None,
                        path_column=None, label_column=None, overwrite=cfg.overwrite,
                        batch_size=cfg.batch_size or xcfg.batch_size)
    if record["backbone_file_sha256"]:
        backbone = Path(xcfg.backbone)
        if not backbone.exists():
            raise FileNotFoundError(f"Backbone file {xcfg.backbone!r} recorded with the model does not exist "
                                    f"(relative paths are taken from the current directory).")
        found = _sha256(backbone)
        if found != record["backbone_file_sha256"]:
            raise UsageError(f"Backbone mismatch: {xcfg.backbone!r} has sha256 {found[:12]}…, but the model was "
                             f"trained on features of sha256 {record['backbone_file_sha256'][:12]}…. Restore the "
                             f"original file, or re-run `make extract` and `make classify` with this one.")
    return extract(xcfg).path


def check_compatible(record: dict, cache: Cache) -> None:
    """Refuse features made differently from the training features; the error lists every difference."""
    wanted = {key: record.get(key) for key in IDENTITY}
    if not record["backbone_file_sha256"]:
        wanted["backbone"] = record["backbone"]
    found = {key: cache.attrs.get(key) for key in wanted}
    diffs = [f"{key}: model {wanted[key]!r}, data {found[key]!r}" for key in wanted
             if str(wanted[key]) != str(found[key])]
    layer = record["layer"]
    if layer not in cache.shapes:
        diffs.append(f"layer: model {layer!r}, data has {sorted(cache.shapes)}")
    elif list(cache.shapes[layer]) != list(record["row_shape"]):
        diffs.append(f"{layer} shape: model {tuple(record['row_shape'])}, data {cache.shapes[layer]}")
    if diffs:
        raise UsageError(f"Features of {str(cache.path)!r} do not match the model's ({len(diffs)} difference(s): "
                         f"{'; '.join(diffs)}). Predict with features extracted exactly as for training.")


def predict(cfg: PredictConfig) -> Path:
    """Predict every image of cfg.data; returns the CSV path (columns: path, predicted, p_<class>…, [label])."""
    model_dir = Path(cfg.model)
    record = load_record(model_dir)
    budget = parse_bytes(cfg.memory_budget)
    data = Path(cfg.data)
    if not data.exists():
        raise FileNotFoundError(f"DATA {cfg.data!r} does not exist: give an image folder or a feature cache (.h5).")
    out = Path(cfg.out) if cfg.out else model_dir / "predictions" / f"{data.stem if data.is_file() else data.resolve().name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if record["model_file"].endswith(".keras"):  # a fine-tuned network (`make finetune`) reads images itself
        from pipeline.finetune import predict_images

        if data.is_file():
            raise UsageError(f"MODEL {cfg.model!r} is a fine-tuned network: it reads images, not feature caches. "
                             f"Received DATA={cfg.data!r}; pass an image folder.")
        predict_images(record, model_dir, data, cfg.batch_size).to_csv(out, index=False)
        return out
    cache_path = data if data.is_file() else _extract(record, cfg, out.with_suffix(".h5"))
    cache = open_cache(cache_path)
    check_compatible(record, cache)
    model = joblib.load(model_dir / record["model_file"])
    names = np.array(record["class_names"])
    layer, rows = record["layer"], np.flatnonzero(cache.view == 0)  # one prediction per image: its clean view
    probabilities, predicted = None, np.empty(len(rows), dtype=np.int64)
    with sklearn.config_context(working_memory=max(1, budget // READ_SHARE // 2**20)):
        for positions, raw in cache.blocks(layer, rows, block_rows_for(cache.shapes[layer], budget)):
            scores, is_proba = class_scores(model, raw, len(names))
            predicted[positions] = np.argmax(scores, axis=1) if scores is not None else model.predict(raw)
            if is_proba:
                probabilities = np.zeros((len(rows), len(names))) if probabilities is None else probabilities
                probabilities[positions] = scores
    root = Path(str(cache.attrs.get("data_root", "")))
    table = pd.DataFrame({"path": [str(root / p) for p in cache.paths[rows]], "predicted": names[predicted]})
    if probabilities is not None:
        for i, name in enumerate(names):
            table[f"p_{name}"] = probabilities[:, i]
    if np.any(cache.labels[rows] >= 0):
        known = np.array(cache.label_names + [""])
        table["label"] = known[cache.labels[rows]]  # -1 -> '' (unlabelled)
    table.to_csv(out, index=False)
    return out


def summary(csv: Path, top: int = 10) -> str:
    """A few lines for the terminal: counts per predicted class and, for labelled images, the accuracy."""
    table = pd.read_csv(csv, keep_default_na=False)
    counts = table["predicted"].value_counts()
    lines = [f"predicted {len(table)} images -> {csv}",
             "  " + ", ".join(f"{name}: {n}" for name, n in counts.head(top).items())
             + (f", … ({len(counts) - top} more classes)" if len(counts) > top else "")]
    if "label" in table:
        labelled = table[table["label"] != ""]
        if len(labelled):
            accuracy = float((labelled["label"] == labelled["predicted"]).mean())
            lines.append(f"  accuracy on {len(labelled)} labelled images: {accuracy:.4f}")
    prob_cols = [c for c in table.columns if c.startswith("p_")]
    if prob_cols:
        confidence = table[prob_cols].max(axis=1)
        lines.append(f"  median confidence {confidence.median():.3f}; {int((confidence < 0.6).sum())} images below 0.6")
    return "\n".join(lines)
