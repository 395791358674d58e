"""report.html of a classify run, and audit.html of `python -m pipeline audit`: what a person looks at.

Sections of report.html: leaderboard with 95% intervals and the rows tied with the best, accuracy by cut layer,
confusion matrix, per-class precision/recall, the misclassified images (most confident mistakes first), the
learning curve of the best head, and the data audit (near-duplicates, likely label errors, outliers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
from sklearn.metrics import classification_report
from threadpoolctl import threadpool_limits

from classifiers import html
from classifiers.audit import Audit, audit_cache
from classifiers.curve import learning_curve, plot_curve
from classifiers.data import READ_SHARE
from classifiers.report import shown
from classifiers.stats import explain
from features.errors import UsageError

GALLERY_MAX = 60  # misclassified images shown
AUDIT_MAX = 30  # findings of each kind shown with thumbnails


def _thumb(root: Path, path: str, lines: list[str]) -> str:
    """A thumbnail of `path` (relative to the cache's data_root) captioned by `lines` and the file name."""
    return html.card(html.thumbnail_uri(root / path), [*lines, Path(path).name])


def leaderboard_section(table: pd.DataFrame) -> str:
    view = shown(table).drop(columns=["ci_low", "ci_high", "tied"], errors="ignore")
    ci = table["ci_low"].map("{:.3f}".format) + "–" + table["ci_high"].map("{:.3f}".format)
    view.insert(view.columns.get_loc("accuracy") + 1, "95% CI", ci.where(table["ci_low"].notna(), "–"))
    view.insert(1, "tied", np.where(table["tied"], "≈ best", ""))
    return html.section("Leaderboard", html.note(explain(table)), html.table(
        view, ["tied" if t else "" for t in table["tied"]]), html.note(
        "95% CI: bootstrap over the scored images (held-out split) or t-interval over folds (CV). "
        "'≈ best': an exact McNemar test on the same images cannot tell the row from the top accuracy (p ≥ 0.05)."),
        anchor="leaderboard")


def layers_section(table: pd.DataFrame, run_dir: Path, layer_order: list[str]) -> str:
    """The layer-depth question: accuracy of each head at each cut layer (best over reductions and caches)."""
    pivot = table.pivot_table(index=["backbone", "layer"], columns="head", values="accuracy", aggfunc="max")
    order = {layer: i for i, layer in enumerate(layer_order)}  # shallow to deep, as in the cache
    pivot = pivot.reset_index().sort_values("layer", key=lambda s: s.map(order).fillna(len(order)), kind="stable")
    return html.section("Accuracy by cut layer", html.table(pivot), html.plot(run_dir / "accuracy.png", "accuracy"),
                        anchor="layers")


def confusion_section(preds: pd.DataFrame, classes: list[str], model_dir: Path) -> str:
    matrix = pd.crosstab(preds["label"], preds["predicted"]).reindex(index=classes, columns=classes, fill_value=0)
    report = classification_report(preds["label"], preds["predicted"], labels=classes, output_dict=True,
                                   zero_division=0)
    per_class = pd.DataFrame([{"class": c, **report[c]} for c in classes]).rename(columns={"f1-score": "f1"})
    per_class["support"] = per_class["support"].astype(int)
    return (html.section("Confusion matrix (best model, scored images)",
                         html.table(matrix.rename_axis("true \\ predicted").reset_index()),
                         html.plot(model_dir / "confusion_matrix.png", "confusion matrix"), anchor="confusion")
            + html.section("Precision and recall per class", html.table(per_class), anchor="per-class"))


def mistakes(preds: pd.DataFrame) -> pd.DataFrame:
    """Misclassified scored images with the probability of the predicted class, most confident first."""
    wrong = preds[preds["label"] != preds["predicted"]].copy()
    columns = [f"p_{name}" for name in wrong["predicted"]]
    wrong["confidence"] = ([wrong.at[i, c] if c in wrong else np.nan for i, c in zip(wrong.index, columns)]
                           if len(wrong) else [])
    return wrong.sort_values("confidence", ascending=False, na_position="last", kind="stable")


def gallery_section(preds: pd.DataFrame, root: Path) -> str:
    wrong = mistakes(preds)
    shown_rows = wrong.head(GALLERY_MAX)
    cards = [_thumb(root, r.path, [f"true: {r.label}", f"predicted: {r.predicted}",
                                   f"confidence: {r.confidence:.3f}" if not pd.isna(r.confidence) else "confidence: –"])
             for r in shown_rows.itertuples()]
    text = (f"{len(wrong)} of {len(preds)} scored images are misclassified"
            + (f"; the {GALLERY_MAX} most confident mistakes are shown" if len(wrong) > GALLERY_MAX else "") + ".")
    return html.section("Misclassified images", html.note(text), html.gallery(cards), anchor="mistakes")


def curve_section(run_dir: Path, head, ev, loaded, job, seed: int) -> str:
    curve = learning_curve(head, ev.params[0], loaded.X, loaded.rows, job.cache.labels, job.plan, seed)
    curve.to_csv(run_dir / "learning_curve.csv", index=False)
    plot_curve(curve, head.name, run_dir / "learning_curve.png")
    last = curve.dropna(subset=["mean"])
    gain = (f"From {int(last.iloc[-2]['per_class'])} to {int(last.iloc[-1]['per_class'])} images per class the "
            f"accuracy moved {last.iloc[-1]['mean'] - last.iloc[-2]['mean']:+.3f}." if len(last) > 1 else "")
    return html.section(f"Learning curve of {head.name}", html.note(
        f"Accuracy on the scored images when trained on a random n images per class (hyperparameters fixed, "
        f"mean ± std over draws). {gain} A curve still rising at the right says more images would pay."),
        html.plot(run_dir / "learning_curve.png", "learning curve"), html.table(curve), anchor="curve")


def audit_sections(audit: Audit, root: Path) -> list[str]:
    """Near-duplicates (pairs of thumbnails), likely label errors and outliers, each capped at AUDIT_MAX."""
    dups = audit.duplicates.head(AUDIT_MAX)
    pairs = [html.gallery([_thumb(root, r.path_a, [r.split_a, r.label_a]), _thumb(root, r.path_b, [
        r.split_b, r.label_b, f"cosine {r.similarity:.3f}" + (" LEAK" if r.cross_split else "")])], "pair")
             for r in dups.itertuples()]
    issues = [_thumb(root, r.path, [f"label: {r.label}", f"suggested: {r.suggested}", f"p(label) {r.p_label:.3f}",
                                    r.split]) for r in audit.label_issues.head(AUDIT_MAX).itertuples()]
    odd = [_thumb(root, r.path, [r.label, r.split, f"z {r.z:.1f}"]) for r in audit.outliers.head(AUDIT_MAX).itertuples()]
    return [
        html.section("Data audit: near-duplicates", html.note(
            f"{audit.summary()}. Pairs of images whose {audit.layer} features have cosine similarity above the "
            f"threshold; 'LEAK' marks pairs across splits (the same picture trained on and scored)."),
            html.gallery(pairs), html.table(audit.duplicates.head(AUDIT_MAX)), anchor="duplicates"),
        html.section("Data audit: likely label errors", html.note(
            "Images whose out-of-fold predicted probabilities (logistic regression on the features) make their label "
            "doubtful, by cleanlab's find_label_issues; lowest probability of the given label first."),
            html.gallery(issues), anchor="label-issues"),
        html.section("Data audit: outliers", html.note(
            "Images far from their nearest neighbours (robust z-score > 3.5): other subjects, corrupt or odd shots."),
            html.gallery(odd), anchor="outliers"),
    ]


def save_audit(audit: Audit, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("duplicates", "label_issues", "outliers"):
        getattr(audit, name).to_csv(folder / f"{name}.csv", index=False)


def write_page(run_dir: Path, table: pd.DataFrame, job, head, ev, loaded, seed: int, budget: int) -> Path:
    """report.html (and learning_curve.*, audit/*.csv) of a classify run, from its saved files and the best job."""
    root = Path(str(job.cache.attrs.get("data_root", "")))
    preds = pd.read_csv(run_dir / "best" / "eval_predictions.csv", keep_default_na=False)
    sections = [leaderboard_section(table), layers_section(table, run_dir, list(job.cache.attrs.get("layers") or job.cache.shapes)),
                confusion_section(preds, job.cache.label_names, run_dir / "best"), gallery_section(preds, root)]
    # the same limits as the heads' own evaluation: sklearn's pairwise work (knn) in budget-sized chunks, one BLAS thread
    with sklearn.config_context(working_memory=max(1, budget // READ_SHARE // 2**20)), \
            threadpool_limits(limits=1, user_api="blas"):
        sections.append(curve_section(run_dir, head, ev, loaded, job, seed) if not loaded.streamed else
                        html.section("Learning curve", html.note("skipped: the features are streamed from disk.")))
    try:
        audit = audit_cache(job.cache, budget=budget, seed=seed)
        save_audit(audit, run_dir / "audit")
        sections += audit_sections(audit, root)
    except UsageError as err:
        sections.append(html.section("Data audit", html.note(f"skipped: {err}")))
    return html.write_page(run_dir / "report.html", f"Classify run {run_dir.name}", sections)
