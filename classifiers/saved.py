"""The saved-model folder (results/<run>/best, <model>/finetune): model.json plus one head file, written and read
here only.

Why one module: classify writes the folder, predict and finetune read it, and other people open it later, on other
machines. So opening one never runs code from it: heads are stored with `skops.io`, whose loader builds only
allow-listed types; Keras networks are loaded with `safe_mode=True` (no Lambda layers, no custom code); the pickle
(`model.joblib`) of older versions loads only when the caller says it trusts the folder. The folder is relocatable:
the `.keras` backbone is recorded by sha256 and found by it (at its absolute path, the path given to extract, or
copied into the folder).
model.json is strict JSON (NaN written as null), so any JSON reader takes it.

>>> dumps({"log_loss": float("nan"), "n": 3})
'{\\n  "log_loss": null,\\n  "n": 3\\n}'
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from features.backbones import load_keras, sha256_file
from features.errors import UsageError
from features.files import replace_atomically

RECORD = "model.json"
HEAD_FILE = "model.skops"  # reduce step + head, a scikit-learn Pipeline
NETWORK_FILE = "model.keras"  # a fine-tuned network
KERAS_HEAD = "head.keras"  # the mlp head's net alone, for use outside this tool
LEGACY_HEAD = ".joblib"  # pickles written before FORMAT 2
FORMAT = 2
# Types outside skops' defaults that this project's heads contain: its own estimators and the fitted trees of
# rf/hgb. Anything else in a file is refused before it is built.
TRUSTED = (
    "classifiers.heads.StreamingSGDClassifier",
    "classifiers.mlp.KerasMLPClassifier",
    "classifiers.reduce.SpatialReduce",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
)
REMAKE = "re-run `make classify` to save it again"


def strict(value):
    """A JSON-ready copy: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists, paths -> str."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [strict(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def dumps(obj) -> str:
    """Strict JSON (RFC 8259): no NaN or Infinity tokens, which many readers refuse."""
    return json.dumps(strict(obj), indent=2, allow_nan=False)


def write_json(path: Path, obj) -> None:
    replace_atomically(Path(path), lambda tmp: tmp.write_text(dumps(obj) + "\n"))


def save(model_dir: Path, model, record: dict) -> dict:
    """Save a fitted scikit-learn Pipeline (reduce step + head) as model.skops beside model.json; returns the record
    as written. The mlp head's net is also left alone as head.keras."""
    import skops.io

    def write(folder: Path) -> None:
        replace_atomically(folder / HEAD_FILE, lambda tmp: skops.io.dump(model, tmp))
        if hasattr(model[-1], "save_keras"):
            replace_atomically(folder / KERAS_HEAD, model[-1].save_keras)

    return _publish(Path(model_dir), write, {**record, "model_file": HEAD_FILE})


def save_network(model_dir: Path, network, record: dict) -> dict:
    """Save a whole Keras network (a fine-tuned model) as model.keras beside model.json."""
    return _publish(Path(model_dir), lambda folder: replace_atomically(folder / NETWORK_FILE, network.save),
                    {**record, "model_file": NETWORK_FILE})


def _publish(model_dir: Path, write: Callable[[Path], None], record: dict) -> dict:
    """model.json goes last and is removed first: it is there only when the head beside it is complete."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / RECORD).unlink(missing_ok=True)
    write(model_dir)
    record = {**record, "format": FORMAT, **_backbone_location(record, model_dir)}
    write_json(model_dir / RECORD, record)
    return record


def _backbone_location(record: dict, model_dir: Path) -> dict:
    """`backbone_abspath`: where the recorded .keras backbone (found by hash) is now. Absolute, not relative to the
    folder: a results folder is written under a temporary name and renamed into place when complete."""
    if not record.get("backbone_file_sha256"):
        return {}
    found = _find_by_hash(_candidates(record, model_dir), record["backbone_file_sha256"])
    return {"backbone_abspath": str(found.resolve())} if found else {}


def load_record(model_dir: str | Path) -> dict:
    """model.json of a saved model folder; a missing or malformed one is refused in one line."""
    path = Path(model_dir) / RECORD
    if not path.is_file():
        raise UsageError(f"No saved model at {str(model_dir)!r}: expected {str(path)!r} written by `make classify` "
                         f"(e.g. MODEL=results/<run>/best).")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{str(path)!r} is not valid JSON ({err}); {REMAKE}.") from None
    missing = [key for key in ("model_file", "class_names") if key not in record] if isinstance(record, dict) else []
    if not isinstance(record, dict) or missing:
        raise UsageError(f"{str(path)!r} is not a model record of this tool (missing {missing or 'an object'}); "
                         f"{REMAKE}.")
    return record


def is_network(record: dict) -> bool:
    """A fine-tuned network reads images itself; every other saved model is a head on cached features."""
    return str(record["model_file"]).endswith(".keras")


def load_head(model_dir: str | Path, record: dict, trust_pickle: bool = False):
    """The saved Pipeline (reduce step + head). skops builds only allow-listed types; a legacy pickle loads only
    with `trust_pickle` (it could run any code) and a warning."""
    path = Path(model_dir) / record["model_file"]
    if not path.is_file():
        raise UsageError(f"The model file {str(path)!r} named in {RECORD} does not exist; {REMAKE}.")
    if path.suffix == LEGACY_HEAD:
        return _load_pickle(path, trust_pickle)
    if path.suffix != Path(HEAD_FILE).suffix:
        raise UsageError(f"{str(path)!r} is not a head this version reads (expected {HEAD_FILE}); {REMAKE}.")
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=path)
        refused = sorted(set(untrusted) - set(TRUSTED))
        if refused:
            raise UsageError(f"{str(path)!r} holds types this tool never writes ({', '.join(refused[:5])}); it is "
                             f"refused so that no foreign code runs. {REMAKE[0].upper() + REMAKE[1:]}.")
        return skops.io.load(path, trusted=untrusted)
    except UsageError:
        raise
    except Exception as err:  # a damaged zip or state raises many kinds; each is the same fact for the user
        raise UsageError(f"{str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:160]}): it is damaged or "
                         f"not written by this tool; {REMAKE}.") from None


def _load_pickle(path: Path, trust_pickle: bool):
    if not trust_pickle:
        raise UsageError(f"{str(path)!r} is a pickle from an older version, and loading a pickle can run any code "
                         f"inside it. Pass --trust-pickle only if you trust where this folder came from, or {REMAKE} "
                         f"as {HEAD_FILE}.")
    import joblib

    print(f"warning: loading the pickle {str(path)!r} because of --trust-pickle; it can run code. Re-run "
          f"`make classify` to replace it with {HEAD_FILE}.", file=sys.stderr)
    try:
        return joblib.load(path)
    except Exception as err:  # unpickling raises anything the bytes ask for
        raise UsageError(f"{str(path)!r} cannot be unpickled ({type(err).__name__}: {str(err)[:160]}); "
                         f"{REMAKE}.") from None


def load_network(path: str | Path):
    """A fine-tuned network (`.keras`), loaded with safe_mode: stored code is refused, in one line."""
    return load_keras(path, "model")


def _candidates(record: dict, model_dir: Path) -> list[Path]:
    """Where the backbone may be: at its recorded absolute path (this machine, any working directory), at the path
    given to extract (from the project folder, on any machine), and a copy inside the model folder (anywhere)."""
    recorded = Path(str(record.get("backbone", "")))
    saved_at = [Path(record["backbone_abspath"])] if record.get("backbone_abspath") else []
    return saved_at + [recorded, model_dir / recorded.name]


def _find_by_hash(paths: list[Path], sha256: str) -> Path | None:
    seen = set()
    for path in paths:
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            if sha256_file(path) == sha256:
                return path
    return None


def locate_backbone(record: dict, model_dir: str | Path) -> str | None:
    """The `.keras` backbone file whose sha256 is the recorded one, wherever the model folder now lives; None for
    a registry backbone (nothing to find). A missing or changed file is refused in one line."""
    backbone = str(record.get("backbone", ""))
    sha256 = record.get("backbone_file_sha256")
    if not sha256:
        return None
    model_dir = Path(model_dir)
    candidates = _candidates(record, model_dir)
    found = _find_by_hash(candidates, sha256)
    if found is not None:
        return str(found)
    existing = [str(p) for p in candidates if p.is_file()]
    if existing:
        raise UsageError(f"Backbone mismatch: {existing[0]!r} has sha256 {sha256_file(existing[0])[:12]}…, but the "
                         f"model was trained on features of {Path(backbone).name} sha256 {sha256[:12]}…. Restore the "
                         f"original file, or re-run `make extract` and `make classify` with this one.")
    raise UsageError(f"Backbone file {Path(backbone).name!r} (sha256 {sha256}) that the model was trained with is "
                     f"not at {', '.join(sorted({str(p) for p in candidates}))}. Copy it (with its sidecar .json) "
                     f"into {str(model_dir)!r}.")
