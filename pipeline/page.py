"""report.html of a classify run, and audit.html of `python -m pipeline audit`: what a person looks at.

Sections of report.html: a summary card (the data, the model to use with its interval, how its features were computed
(reduced precision stands out), the command to predict with it, and counts of what to worry about, each linking to its
section), leaderboard with 95% intervals, the chosen row and the rows tied with it, accuracy by cut layer, confusion
matrix, per-class precision/recall, the misclassified images (most confident mistakes first), the learning curve of
the best head, the data audit (near-duplicates, likely label errors, outliers) and the warnings (failed heads, skipped
images, the run's notes).

`python -m pipeline.page REPORT.html OUT.png` screenshots a page's first screen in headless chromium
(`make report-screenshot` makes docs/report.png so).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import sklearn
from sklearn.metrics import classification_report
from threadpoolctl import threadpool_limits

from classifiers import html
from classifiers.audit import Audit, audit_cache
from classifiers.curve import learning_curve, plot_curve
from classifiers.data import READ_SHARE
from classifiers.saved import write_json
from classifiers.report import METRICS, best_row, ranked_by, shown, why_chosen
from features.engines import reduced_precision
from features.store import Cache
from features.errors import UsageError

GALLERY_MAX = 60  # misclassified images shown
AUDIT_MAX = 30  # findings of each kind shown with thumbnails


def _thumb(cache: Cache, path: str, lines: list[str]) -> str:
    """A thumbnail of the row path `path` (only the file the cache was extracted from: `Cache.image_file`) captioned
    by `lines` and the file name."""
    found = cache.image_file(path)
    return html.card(html.thumbnail_uri(found) if found else None, [*lines, Path(path).name])


def leaderboard_section(table: pd.DataFrame) -> str:
    """Every row by rank; the chosen row (the saved model) and the rows tied with rank 1 marked and shaded apart."""
    view = shown(table).drop(columns=["ci_low", "ci_high"], errors="ignore")
    ranked = table.loc[view.index]
    ci = ranked["ci_low"].map("{:.3f}".format) + "–" + ranked["ci_high"].map("{:.3f}".format)
    view.insert(view.columns.get_loc("accuracy") + 1, "95% CI", ci.where(ranked["ci_low"].notna(), "–"))
    return html.section("Leaderboard", html.note(why_chosen(table)), html.table(view, view["choice"].tolist()),
                        html.note(f"Rows by {METRICS[ranked_by(table)][0]}, best first. 'chosen': the model saved "
                                  "in best/ (the one to use). 'tied': an exact McNemar test on the same images cannot tell the row from "
                                  "rank 1 (p ≥ 0.05); among the tied rows the lowest log-loss is chosen. 95% CI: "
                                  "bootstrap over the scored images (held-out split) or t-interval over folds (CV)."),
                        anchor="leaderboard")


def published(run_dir: Path) -> Path:
    """Where the run in `run_dir` is once complete: classify writes a run in the staging folder
    `<parent>/.<name>.partial-<pid>/<name>` (pipeline.classification._run_dir) and then moves it to `<parent>/<name>`;
    a page cites the final path.

    >>> published(Path("results/.r1.partial-42/r1/flowers")), published(Path("results/r1"))
    (PosixPath('results/r1/flowers'), PosixPath('results/r1'))
    """
    parts = run_dir.parts
    for i in range(len(parts) - 1):
        if re.fullmatch(rf"\.{re.escape(parts[i + 1])}\.partial-\d+", parts[i]):
            return Path(*parts[:i], *parts[i + 1:])
    return run_dir


def dropped_classes(cache: Cache, plan) -> list[str]:
    """Labelled classes of `cache` that no fold fits on or scores (too few images: classify drops them)."""
    present = np.unique(cache.labels[cache.labels >= 0])
    used = np.unique(cache.labels[np.concatenate([plan.fit_rows, *[scored for _, scored in plan.folds]])])
    return [cache.label_names[c] for c in np.setdiff1d(present, used)]


def split_counts(cache: Cache) -> str:
    """Images (clean views) per split, e.g. 'train 120 · val 153', and the unlabelled and augmented rows."""
    clean = cache.view == 0
    labelled = clean & (cache.labels >= 0)
    counts = pd.Series(cache.split[labelled]).replace("", "no split").value_counts()
    order = [s for s in ("train", "val", "test") if s in counts] + sorted(set(counts.index) - {"train", "val", "test"})
    text = " · ".join(f"{split} {counts[split]}" for split in order)
    unlabelled, views = int((clean & (cache.labels < 0)).sum()), int((~clean).sum())
    return (text + (f" · {unlabelled} unlabelled (not used)" if unlabelled else "")
            + (f"; plus {views} augmented training views" if views else ""))


def _scored(best: pd.Series) -> str:
    scheme, n = str(best["scheme"]), best.get("n_eval", np.nan)
    count = f", {int(n)} images" if not pd.isna(n) else ""
    return (f"{scheme[2:]}-fold cross-validation{count}" if scheme.startswith("cv") else
            f"the held-out '{scheme}' split{count}")


def _count(n: int, one: str, many: str, anchor: str) -> str:
    """A link to the section `anchor` saying how many problems of a kind the run found; shaded when any."""
    label = f"1 {one}" if n == 1 else f"{n} {many}" if n else f"no {many}"
    return f'<li><a class="{"warn" if n else "ok"}" href="#{anchor}">{escape(label)}</a></li>'


WARNINGS = "warnings.json"  # the first screen's counts, for the console summary (classifiers.report.summary)


def warning_counts(table: pd.DataFrame, job, audit: Audit | None, notes: list[str]
                   ) -> list[tuple[int | None, str, str, str]]:
    """(count, one, many, section anchor) of each kind of problem the run found; count None: could not be checked."""
    if audit is not None:
        leaks = int(audit.duplicates["cross_split"].sum()) if len(audit.duplicates) else 0
        found = [(leaks, "cross-split near-duplicate (leakage)", "cross-split near-duplicates (leakage)",
                  "duplicates"),
                 (len(audit.label_issues), "likely label error", "likely label errors", "label-issues"),
                 (len(audit.outliers), "outlier", "outliers", "outliers")]
    else:
        found = [(None, "data audit not run", "data audit not run", "audit")]
    failed = int((table["status"] == "failed").sum()) if "status" in table else 0
    return found + [(len(dropped_classes(job.cache, job.plan)), "dropped class", "dropped classes", "notes"),
                    (len(job.cache.skipped), "skipped image", "skipped images", "skipped"),
                    (failed, "failed head", "failed heads", "failed"),
                    (len(notes), "note from the run", "notes from the run", "notes")]


def features_fact(cache: Cache) -> str:
    """The summary card's Features row: the compute precision (reduced precision stands out: those features differ
    from float32 ones), the storage dtype and the engine that ran the model."""
    attrs = cache.attrs
    reduced = reduced_precision(attrs.precision, attrs.calibration)
    precision = (f'<strong class="reduced">{escape(reduced)}</strong>' if reduced else
                 f"{escape(attrs.precision)}: full-precision features")
    return f"{precision}; stored as {escape(attrs.dtype)}; run by {escape(attrs.engine)}"


def summary_section(table: pd.DataFrame, job, run_dir: Path, audit: Audit | None, notes: list[str]) -> str:
    """The first screen: the data, the model to use with its accuracy and 95% interval, the command to predict with
    it, and how many of each problem the run found, each linking to its section."""
    cache, best = job.cache, best_row(table)
    root = str(cache.attrs.data_root)
    names = cache.label_names
    classes = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    interval = (f" (95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f})"
                if not pd.isna(best.get("ci_low", np.nan)) else "")
    command = f"make predict MODEL={shlex.quote(str(published(run_dir) / 'best'))} DATA=<new images>"
    found = [_count(n, one, many, anchor) if n is not None else f'<li><a class="warn" href="#{anchor}">{one}</a></li>'
             for n, one, many, anchor in warning_counts(table, job, audit, notes)]
    facts = [
        ("Data", f"{escape(Path(root).name or cache.name)} (<code>{escape(root or str(cache.path))}</code>): "
                 f"{len(names)} classes ({escape(classes)}); images {escape(split_counts(cache))}"),
        ("Use", f"{escape(best['head'])} on {escape(str(best['backbone']))} / {escape(str(best['layer']))} / "
                f"reduce {escape(str(best['reduce']))}: accuracy <strong>{best['accuracy']:.3f}</strong>"
                f"{escape(interval)} on {escape(_scored(best))}"),
        ("Features", features_fact(cache)),
        ("Why", html.text(why_chosen(table))),
        ("Predict", f'<pre class="cmd"><code>{escape(command)}</code></pre>'),
        ("Check", f'<ul class="warnings">{"".join(found)}</ul>'),
    ]
    items = "".join(f"<dt>{term}</dt><dd>{value}</dd>" for term, value in facts)
    return f'<section id="summary" class="summary"><h2>Summary: what to use, what to check</h2><dl>{items}</dl></section>'


def warnings_section(table: pd.DataFrame, cache: Cache, notes: list[str]) -> str:
    """Heads that failed, images that could not be read at extraction, and every note of the run."""
    failed = table[table["status"] == "failed"] if "status" in table else table.head(0)
    skipped = pd.DataFrame(cache.skipped, columns=["path", "reason"])
    more = f"The first {AUDIT_MAX} of {len(skipped)} are listed." if len(skipped) > AUDIT_MAX else ""
    items = "".join(f"<li>{html.text(n)}</li>" for n in notes)
    return html.section(
        "Warnings",
        html.subsection(f"Failed heads ({len(failed)})", html.table(failed.reindex(
            columns=["backbone", "layer", "reduce", "head", "error"])), anchor="failed"),
        html.subsection(f"Skipped images ({len(skipped)})", html.note(
            "Files under the data folder that extraction could not use; they are in no split.") if len(skipped) else "",
            html.table(skipped.head(AUDIT_MAX)), html.note(more) if more else "", anchor="skipped"),
        html.subsection(f"Notes from the run ({len(notes)})",
                        f"<ul>{items}</ul>" if notes else html.note(html.NONE_FOUND), anchor="notes"),
        anchor="warnings")


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


def gallery_section(preds: pd.DataFrame, cache: Cache) -> str:
    wrong = mistakes(preds)
    shown_rows = wrong.head(GALLERY_MAX)
    cards = [_thumb(cache, r.path, [f"true: {r.label}", f"predicted: {r.predicted}",
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


def audit_sections(audit: Audit, cache: Cache) -> list[str]:
    """Near-duplicates (pairs of thumbnails), likely label errors and outliers, each capped at AUDIT_MAX."""
    dups = audit.duplicates.head(AUDIT_MAX)
    pairs = [html.gallery([_thumb(cache, r.path_a, [r.split_a, r.label_a]), _thumb(cache, r.path_b, [
        r.split_b, r.label_b, f"cosine {r.similarity:.3f}" + (" LEAK" if r.cross_split else "")])], "pair")
             for r in dups.itertuples()]
    issues = [_thumb(cache, r.path, [f"label: {r.label}", f"suggested: {r.suggested}", f"p(label) {r.p_label:.3f}",
                                    r.split]) for r in audit.label_issues.head(AUDIT_MAX).itertuples()]
    odd = [_thumb(cache, r.path, [r.label, r.split, f"z {r.z:.1f}"]) for r in audit.outliers.head(AUDIT_MAX).itertuples()]
    return [
        html.section("Data audit: near-duplicates", html.note(
            f"{audit.summary()}. Pairs of images whose {audit.layer} features have cosine similarity above the "
            f"threshold; 'LEAK' marks pairs across splits (the same picture trained on and scored)."),
            html.gallery(pairs), html.table(dups) if len(dups) else "", anchor="duplicates"),
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
    preds = pd.read_csv(run_dir / "best" / "eval_predictions.csv", keep_default_na=False)
    try:  # written by classify before the page; the notes are the run's warnings
        notes = [str(n) for n in json.loads((run_dir / "run.json").read_text()).get("notes", [])]
    except (OSError, ValueError):
        notes = []
    sections = [leaderboard_section(table), layers_section(table, run_dir, job.cache.attrs.layers),
                confusion_section(preds, job.cache.label_names, run_dir / "best"), gallery_section(preds, job.cache)]
    # the same limits as the heads' own evaluation: sklearn's pairwise work (knn) in budget-sized chunks, one BLAS thread
    with sklearn.config_context(working_memory=max(1, budget // READ_SHARE // 2**20)), \
            threadpool_limits(limits=1, user_api="blas"):
        sections.append(curve_section(run_dir, head, ev, loaded, job, seed) if not loaded.streamed else
                        html.section("Learning curve", html.note("skipped: the features are streamed from disk.")))
    try:
        audit = audit_cache(job.cache, budget=budget, seed=seed)
        save_audit(audit, run_dir / "audit")
        sections += audit_sections(audit, job.cache)
    except UsageError as err:
        audit = None
        sections.append(html.section("Data audit", html.note(f"skipped: {err}"), anchor="audit"))
    sections = [summary_section(table, job, run_dir, audit, notes), *sections,
                warnings_section(table, job.cache, notes)]
    write_json(run_dir / WARNINGS, [{"count": n, "one": one, "many": many, "section": anchor}
                                    for n, one, many, anchor in warning_counts(table, job, audit, notes)])
    return html.write_page(run_dir / "report.html", f"Classify run {run_dir.name}", sections)


def write_index(run_dir: Path, datasets: list[str], notes: list[str]) -> Path:
    """index.html of a run over several datasets: one row per dataset (its best model and accuracy) linking to its
    own report, and what was passed over."""
    rows = []
    for name in datasets:
        board = pd.read_csv(run_dir / name / "leaderboard.csv")
        best = best_row(board)
        rows.append({"dataset": name, "best head": best["head"], "features": f"{best['backbone']}/{best['layer']}",
                     "accuracy": best["accuracy"], "ci": f"{best.get('ci_low', float('nan')):.3f}–"
                     f"{best.get('ci_high', float('nan')):.3f}", "rows ranked": len(board),
                     "report": f"{name}/report.html"})
    table = pd.DataFrame(rows)
    links = "".join(f'<li><a href="{escape(quote(r["report"]))}">{escape(r["dataset"])}</a></li>' for r in rows)
    sections = [html.section("Datasets", html.note(
        "Each dataset is ranked on its own: rows of different data are never compared."),
        f"<ul>{links}</ul>", html.table(table), anchor="datasets")]
    if notes:
        sections.append(html.section("Passed over", *(html.note(n) for n in notes), anchor="notes"))
    return html.write_page(run_dir / "index.html", f"Classify run {run_dir.name}: {len(datasets)} datasets", sections)


def screenshot(page: Path, out: Path, width: int = 1100, height: int = 1500) -> Path:
    """A PNG of the first `width` x `height` pixels of `page` in headless chromium, driven by Playwright with the
    chromium of the system (PATH), so nothing is downloaded."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise UsageError("chromium is not on PATH. Install it (Debian: apt-get install -y chromium) and retry.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": width, "height": height})
        tab.goto(Path(page).resolve().as_uri(), wait_until="load")
        tab.screenshot(path=str(out), full_page=False)
        browser.close()
    return out


if __name__ == "__main__":  # make report-screenshot
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pipeline.page REPORT.html OUT.png")
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
