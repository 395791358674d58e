"""Outputs of a classify run: leaderboard files, plots, the saved model directory, report.md and the summary.

Plots read the saved files (leaderboard.csv, eval_predictions.csv) and never retrain, so they can be redrawn.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from classifiers import saved  # noqa: E402
from classifiers.memory import format_bytes  # noqa: E402
from classifiers.stats import ALPHA, choose  # noqa: E402
from features.engines import reduced_precision  # noqa: E402

# what a leaderboard can be ranked by: column -> (words for a reader, lower is better)
METRICS = {"accuracy": ("accuracy", False), "balanced_accuracy": ("balanced accuracy", False),
           "macro_f1": ("macro-F1", False), "log_loss": ("log-loss", True)}
# the metric's order is broken by these, then by the names, so equal scores rank the same whatever the row order
TIE_BREAK = [("balanced_accuracy", False), ("log_loss", True), ("fit_s", True), ("backbone", True), ("layer", True),
             ("reduce", True), ("head", True), ("augment", True), ("cache", True)]
SHOWN = ["choice", "backbone", "layer", "reduce", "cache", "head", "augment", "scheme", "accuracy", "ci_low",
         "ci_high", "accuracy_std", "augment_gain",
         "balanced_accuracy", "macro_f1", "top5", "log_loss", "fit_s", "predict_s", "error"]
# in a results folder: every file its classify run wrote there, which is all that a rerun may replace; a run of
# several datasets has one, at its top, for all of them
MANIFEST = "manifest.json"
# an augmented row is compared with the clean row of the same data, features and head
SAME_MODEL = ["data_id", "backbone", "layer", "reduce", "head", "scheme"]


def _with_augment(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the columns that pair augmented and clean rows ('' or missing augment, as in leaderboards
    written before augmentation existed, means clean)."""
    wanted = [*SAME_MODEL, "augment", "n_fit_images", "n_fit", "cache"]
    table = table.reindex(columns=list(dict.fromkeys([*table.columns, *wanted])))
    return table.assign(augment=table["augment"].fillna("").astype(str))


def augment_gains(table: pd.DataFrame) -> pd.DataFrame:
    """One row per augmented leaderboard row that has a clean twin (same data, backbone, layer, reduce, head):
    accuracy with and without the augmented views, the gain, and what the views cost in fit time."""
    table = _with_augment(table)
    clean = table[table["augment"] == ""].drop_duplicates(SAME_MODEL)
    both = table[table["augment"] != ""].merge(clean, on=SAME_MODEL, suffixes=("", "_clean"))
    gains = both[SAME_MODEL + ["augment", "n_fit_images", "n_fit", "cache"]].assign(
        accuracy_clean=both["accuracy_clean"], accuracy_augmented=both["accuracy"],
        gain=both["accuracy"] - both["accuracy_clean"],
        balanced_accuracy_gain=both["balanced_accuracy"] - both["balanced_accuracy_clean"],
        log_loss_change=both["log_loss"] - both["log_loss_clean"],
        fit_s_ratio=both["fit_s"] / both["fit_s_clean"].clip(lower=1e-9))
    return gains.sort_values(["gain", "head"], ascending=[False, True], kind="stable").reset_index(drop=True)


def rank(rows: list[dict], correct: dict[int, pd.Series] | None = None, seed: int = 0,
         metric: str = "accuracy") -> pd.DataFrame:
    """The leaderboard with `rank` (1 = the best `metric`, one of METRICS; ties broken by TIE_BREAK), `chosen` (the
    model to save: classifiers.stats.choose, the lowest log-loss among the rows statistically tied with rank 1),
    `tied`, 95% intervals, and `augment_gain` (accuracy minus the clean twin's) on augmented rows.
    `correct[i]` (optional) is row i's per-image correctness, indexed by image path, for the paired tests
    (failed heads have none).

    Row 0 is the chosen row, then the others by rank: callers take the model to save from row 0, while every file a
    person reads lists the rows by rank (`by_rank`), with the chosen one marked where it is.

    >>> rows = [{"head": head, "accuracy": acc, "balanced_accuracy": acc, "log_loss": loss, "fit_s": 1.0}
    ...         for head, acc, loss in [("a", 0.8, 0.4), ("b", 0.9, 0.5)]]
    >>> rank(rows)[["rank", "chosen", "head"]].values.tolist()
    [[1, True, 'b'], [2, False, 'a']]
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}. Expected one of {', '.join(METRICS)}.")
    table = _with_augment(pd.DataFrame(rows).drop(columns=["augment_gain", "rank", "chosen"], errors="ignore"))
    table["row_id"] = np.arange(len(table))
    keys = SAME_MODEL + ["augment", "cache"]  # one leaderboard row each
    gains = augment_gains(table)[keys + ["gain"]].rename(columns={"gain": "augment_gain"})
    table = table.merge(gains, on=keys, how="left")
    order = [(metric, METRICS[metric][1])] + [key for key in TIE_BREAK if key[0] != metric and key[0] in table]
    table = table.sort_values([c for c, _ in order], ascending=[a for _, a in order], na_position="last",
                              kind="stable").reset_index(drop=True)
    position = dict(zip(table["row_id"], range(1, len(table) + 1)))
    table = choose(table, correct, seed)  # its input order (best metric first) is what the ties are tested against
    table.insert(0, "rank", table["row_id"].map(position))
    table.insert(1, "chosen", table.index == 0)
    table = pd.concat([table.iloc[:1], table.iloc[1:].sort_values("rank")])
    return table.drop(columns="row_id").assign(ranked_by=metric).reset_index(drop=True)


def ranked_by(table: pd.DataFrame) -> str:
    """The metric a saved leaderboard was ranked by (`--metric`); accuracy for leaderboards older than the flag."""
    return str(table["ranked_by"].iloc[0]) if "ranked_by" in table and len(table) else "accuracy"


def by_rank(table: pd.DataFrame) -> pd.DataFrame:
    """The rows in `rank` order (what a person reads); a leaderboard without ranks as it is."""
    return table.sort_values("rank", kind="stable") if "rank" in table else table


def best_row(table: pd.DataFrame) -> pd.Series:
    """The chosen model's row (`chosen`); in leaderboards written before that column existed, the first row."""
    if "chosen" in table and table["chosen"].eq(True).any():
        return table[table["chosen"].eq(True)].iloc[0]
    return table.iloc[0]


def _marks(table: pd.DataFrame) -> pd.Series:
    """'chosen' for the saved model, 'tied' for the other rows statistically tied with rank 1, else ''."""
    chosen = table["chosen"].eq(True) if "chosen" in table else table.index == table.index[0]
    tied = table["tied"].eq(True) if "tied" in table else False
    return pd.Series(np.where(chosen, "chosen", np.where(tied, "tied", "")), index=table.index)


def _name(row: pd.Series) -> str:
    augment = row.get("augment", "")
    return (f"{row['head']} on {row['backbone']}/{row['layer']}/{row['reduce']}"
            + (f" ({augment})" if isinstance(augment, str) and augment else ""))


def _interval(row: pd.Series) -> str:
    return (f", 95% CI {row['ci_low']:.3f}–{row['ci_high']:.3f}"
            if not pd.isna(row.get("ci_low", np.nan)) else "")


def why_chosen(table: pd.DataFrame, metric: str | None = None) -> str:
    """One sentence: the selection rule as it applied to this leaderboard, saying plainly when the chosen row's
    `metric` (default: the one it was ranked by) is below that of another row it is statistically tied with (plain
    text: no markdown)."""
    metric = metric or ranked_by(table)
    words, lower = METRICS[metric]
    best, ranked = best_row(table), by_rank(table)
    top = ranked.iloc[0]
    tied = table[table["tied"].eq(True)] if "tied" in table else table.head(0)
    value = f"{words} ({best[metric]:.3f}{_interval(best) if metric == 'accuracy' else ''})"
    if len(tied) <= 1:
        others = table[(table.index != best.name) & table[metric].notna()]
        paired = len(others) and "p_vs_top" in table and others["p_vs_top"].notna().any()
        return (f"{_name(best)} is chosen: it has the best {value}"
                + ("." if not len(others) else
                   f"; no other row is statistically tied with it (exact McNemar test on the same images, "
                   f"p < {ALPHA})." if paired else
                   "; no other row could be tested for a tie with it (no per-image results)."))
    loss = best["log_loss"]
    same = tied[tied["log_loss"] == loss] if not pd.isna(loss) else tied
    reason = ("no tied row has a log-loss and it is the fastest to fit" if pd.isna(loss) else
              f"it has the lowest log-loss ({loss:.3g})" if len(same) == 1 else
              f"it has the lowest log-loss ({loss:.3g}, as have {len(same) - 1} other tied rows) and of those is "
              f"the fastest to fit")
    test = f"exact McNemar test on the same images, p ≥ {ALPHA}"
    if best.name == top.name:
        return (f"{_name(best)} is chosen: it has the best {value}, and of the {len(tied)} rows statistically tied "
                f"with it ({test}) {reason}.")
    gap = (best[metric] - top[metric]) * (1 if lower else -1)
    where = (f"its {words} {best[metric]:.3f} is {gap:.3f} {'above' if lower else 'below'}" if gap > 0 else
             f"its {words} {best[metric]:.3f} equals it")
    best_words = "most accurate" if metric == "accuracy" else f"best {words}"
    return (f"{_name(best)} is chosen among the {len(tied)} rows statistically tied with the {best_words} "
            f"({_name(top)}, {top[metric]:.3f}; {test}) because {reason}; {where}.")


def shown(table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """The columns a person reads, by rank (the first `top` ranks and always the chosen row), `choice` marking the
    chosen and the tied rows, `cache` (its file name) only where `feature_sets` needs it, empty columns (metrics,
    augment on clean runs) dropped, numbers rounded."""
    _, shared, stems = _alike(table)
    table = by_rank(table.assign(choice=_marks(table), cache=stems.where(shared)))
    if top is not None:
        table = table[(np.arange(len(table)) < top) | (table["choice"] == "chosen").to_numpy()]
    view = table.reindex(columns=["rank"] + SHOWN).replace("", np.nan).dropna(axis=1, how="all")
    return view.fillna({"augment": "", "choice": ""}).round(4)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the optional `tabulate` dependency that DataFrame.to_markdown needs."""
    cells = table.astype(object).where(table.notna(), "")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)])


def write_leaderboard(table: pd.DataFrame, run_dir: Path) -> None:
    """leaderboard.csv/.md, and augment_gain.csv when the run has clean and augmented caches of the same features."""
    by_rank(table).to_csv(run_dir / "leaderboard.csv", index=False)
    (run_dir / "leaderboard.md").write_text(markdown(shown(table)) + "\n")
    gains = augment_gains(table)
    if len(gains):
        gains.to_csv(run_dir / "augment_gain.csv", index=False)


def _error_bars(part: pd.DataFrame) -> np.ndarray:
    """(2, n) distances from accuracy to the 95% interval's ends; ± the fold std in leaderboards without one."""
    if "ci_low" not in part:
        return np.vstack([part["accuracy_std"].fillna(0)] * 2)
    return np.nan_to_num(np.vstack([part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]]).clip(0))


def plot_leaderboard(run_dir: Path) -> Path:
    """accuracy.png: accuracy (with its 95% interval) of every head, grouped by backbone / layer / reduce."""
    return save_figure(leaderboard_figure(pd.read_csv(run_dir / "leaderboard.csv")), run_dir / "accuracy.png")


def _alike(table: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(backbone / layer / reduce (/ augment) of each row, whether several caches share it, its cache's file name)."""
    extra = table.reindex(columns=["augment", "cache"]).fillna("").astype(str)
    label = (table["backbone"].astype(str) + " / " + table["layer"].astype(str) + " / " + table["reduce"].astype(str)
             + extra["augment"].where(extra["augment"] == "", " / " + extra["augment"]))
    shared = label.groupby(label).transform(lambda same: extra.loc[same.index, "cache"].nunique() > 1).astype(bool)
    return label, shared, extra["cache"].map(lambda c: Path(c).stem)


def feature_sets(table: pd.DataFrame, sep: str = " / ") -> pd.Series:
    """Each row's feature set as a reader tells them apart: backbone / layer / reduce (/ augment), and the cache's
    file name where several caches share those (the same layer at two image sizes, say)."""
    label, shared, stems = _alike(table)
    return label.where(~shared, label + sep + stems)


def accuracy_limits(table: pd.DataFrame) -> tuple[float, float]:
    """The accuracy axis of accuracy.png: every bar's interval (error bar) inside it with a small margin."""
    err = _error_bars(table)
    low, high = np.nanmin(table["accuracy"] - err[0]), np.nanmax(table["accuracy"] + err[1])
    pad = max(0.01, 0.04 * (high - low))
    return max(0.0, min(low - pad, high - 0.1)), high + pad  # at least 0.1 wide: equal bars still read as bars


def leaderboard_figure(table: pd.DataFrame):
    """Horizontal bars, so that labels stay readable however many feature sets (caches, layers) there are: one
    group per backbone / layer / reduce (and augment; and the cache where several share that), one bar per head;
    the accuracy axis includes every interval; the chosen model's bar is outlined in black."""
    table = table[table["accuracy"].notna()].reset_index(drop=True)
    table["features"] = feature_sets(table, "\n")
    groups, heads = list(dict.fromkeys(table["features"])), sorted(table["head"].unique())
    lines = max(group.count("\n") + 1 for group in groups)
    step = max(0.22 * len(heads), 0.2 * lines + 0.1)  # inches per group: its bars, or its label's lines
    fig, ax = plt.subplots(figsize=(9, 1.6 + step * len(groups)))
    height, where = 0.8 / len(heads), np.arange(len(groups))
    for i, head in enumerate(heads):
        part = table[table["head"] == head].set_index("features").reindex(groups)
        ax.barh(where + (i - (len(heads) - 1) / 2) * height, part["accuracy"], height, xerr=_error_bars(part),
                label=head, capsize=2)
    best = best_row(table)
    mark = groups.index(best["features"]) + (heads.index(best["head"]) - (len(heads) - 1) / 2) * height
    ax.barh(mark, best["accuracy"], height, fill=False, edgecolor="black", linewidth=2, label="chosen")
    ax.set_yticks(where, groups, fontsize=8)
    ax.invert_yaxis()  # the first feature set at the top, as in the leaderboard
    ax.set_xlim(*accuracy_limits(table))
    ax.set_xlabel(f"accuracy ({table['scheme'].iloc[0]}) with its 95% interval")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Accuracy by layer and head")
    return fig


def plot_confusion(model_dir: Path, class_names: list[str]) -> Path:
    """confusion_matrix.png from eval_predictions.csv (held-out or out-of-fold predictions)."""
    preds = pd.read_csv(model_dir / "eval_predictions.csv")
    matrix = confusion_matrix(preds["label"], preds["predicted"], labels=class_names)
    size = max(4, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 5 else 0, fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (accuracy {np.trace(matrix) / max(1, matrix.sum()):.3f})")
    return save_figure(fig, model_dir / "confusion_matrix.png")


def save_figure(fig, path: Path) -> Path:
    """Every figure of a run the same way (tight layout, 110 dpi), and closed: a long run makes many."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_model(model_dir: Path, model, record: dict, eval_predictions: pd.DataFrame) -> Path:
    """The saved model (classifiers/saved.py: model.skops + model.json), eval predictions, confusion plot."""
    saved.save(model_dir, model, record)
    eval_predictions.to_csv(model_dir / "eval_predictions.csv", index=False)
    plot_confusion(model_dir, record["class_names"])
    return model_dir


def _reduced(record: dict) -> str | None:
    """`reduced_precision` of a saved model's features (a model.json from before `precision` was recorded: float32)."""
    return reduced_precision(record.get("precision", ""), record.get("calibration", ""))


def _fmt(value: float, std: float | None = None) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None and not pd.isna(std) else "")


def write_report(run_dir: Path, table: pd.DataFrame, record: dict, run: dict, notes: list[str],
                 published: Path) -> Path:
    """report.md in `run_dir`: what ran, what won and how sure we are, what to do next — readable in a minute.
    Paths it cites are under `published`, where the run will be once complete (it is written in a staging folder)."""
    best, reduced = best_row(table), _reduced(record)
    scheme = best["scheme"]
    inner = int(best["inner_cv"])
    how = (f"{scheme[2:]}-fold stratified cross-validation (mean ± std over folds); hyperparameters chosen by "
           f"{inner}-fold inner CV within each training fold; the saved model is refitted on all labelled images"
           if scheme.startswith("cv") else
           f"fitted on the 'train' split, hyperparameters chosen by {inner}-fold CV inside train, scored once on the "
           f"held-out '{scheme}' split; the saved model is exactly the scored one")
    lines = [
        f"# Classify run {published.name}", "",
        f"**Best:** `{best['head']}` on `{best['backbone']}` / `{best['layer']}` / reduce `{best['reduce']}` — "
        f"accuracy **{_fmt(best['accuracy'], best['accuracy_std'])}**, balanced accuracy "
        f"{_fmt(best['balanced_accuracy'])}, macro-F1 {_fmt(best['macro_f1'])}, log-loss {_fmt(best['log_loss'])}"
        + (f", top-5 {_fmt(best['top5'])}" if not pd.isna(best["top5"]) else "") + ".", "",
        f"- Why this one: {why_chosen(table)}",
        f"- Evaluation: {how}.",
        f"- Data: {int(best['n_fit_images'])} training and {int(best['n_eval'])} scored images"
        + (f" (trained on {int(best['n_fit'])} rows: clean and augmented views {best['augment']}; only clean "
           f"views are scored)" if best["n_fit"] != best["n_fit_images"] else "")
        + f", {len(record['class_names'])} classes; seed {run['seed']}.",
        *([f"- Features: {reduced}"] if reduced else []),
        f"- Tried {len(table)} combinations ({table['head'].nunique()} heads × "
        f"{feature_sets(table).nunique()} feature sets) in "
        f"{run['seconds']:.1f} s; "
        f"peak memory {format_bytes(run['peak_bytes'])} above start (budget {format_bytes(run['budget_bytes'])}).",
        f"- Use it: `make predict MODEL={published / 'best'} DATA=<image folder>`", "",
        "## Leaderboard (top 10)", "", markdown(shown(table, 10)), "",
        "Full table: `leaderboard.csv`; plot: `accuracy.png`; best model's confusion matrix: "
        "`best/confusion_matrix.png`.", "",
    ]
    gains = augment_gains(table)
    if len(gains):
        columns = ["backbone", "layer", "reduce", "head", "augment", "accuracy_clean", "accuracy_augmented", "gain",
                   "balanced_accuracy_gain", "log_loss_change", "fit_s_ratio"]
        lines += ["## Gain from augmentation", "",
                  f"Accuracy with the augmented training views minus accuracy of the same head on the clean cache "
                  f"(both scored on clean images only). Mean gain {gains['gain'].mean():+.4f}; it pays for "
                  f"{int((gains['gain'] > 0).sum())} of {len(gains)} heads, hurts {int((gains['gain'] < 0).sum())}. "
                  f"See docs/augment.md for when it pays.", "",
                  markdown(gains[columns].round(4)), "", "Table: `augment_gain.csv`.", ""]
    if notes:
        lines += ["## Warnings", ""] + [f"- {note}" for note in notes] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def summary(run_dir: Path, top: int = 10) -> str:
    """The one-screen summary printed at the end of `make classify`, rebuilt from the saved files."""
    table = pd.read_csv(run_dir / "leaderboard.csv")
    record = json.loads((run_dir / "best" / "model.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    best, reduced = best_row(table), _reduced(record)
    manifest = next((p for p in (run_dir / MANIFEST, run_dir.parent / MANIFEST) if p.exists()), run_dir / MANIFEST)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        board = shown(table, top).to_string(index=False)
    return "\n".join([
        board, "",
        f"best: {best['head']} on {feature_sets(table).loc[best.name]}: accuracy "
        f"{_fmt(best['accuracy'], best['accuracy_std'])} ({record['scheme']}), "
        f"balanced {_fmt(best['balanced_accuracy'])}, macro-F1 {_fmt(best['macro_f1'])}",
        *([f"features: {reduced}"] if reduced else []),
        f"{len(table)} combinations in {run['seconds']:.1f} s; peak memory {format_bytes(run['peak_bytes'])} "
        f"(budget {format_bytes(run['budget_bytes'])})",
        *([f"why:     {why_chosen(table)}"] if "tied" in table else []),
        f"results: {run_dir}/  (every file it wrote is listed in {manifest}; docs/classify.md#outputs says what "
        "each is)",
        f"next:    make predict MODEL={run_dir / 'best'} DATA=<image folder>",
        f"check:   {warnings_line(run_dir, run['notes'])}",
        *([f"report:  {run_dir / 'report.html'}"] if (run_dir / "report.html").exists() else []),
    ])


def warnings_line(run_dir: Path, notes: list[str]) -> str:
    """What the report's first screen counts (warnings.json, written with report.html), problems first; without a
    report, the run's notes."""
    try:
        counts = json.loads((run_dir / "warnings.json").read_text())
    except (OSError, ValueError):
        return f"{len(notes)} note(s), see report.md" if notes else "no notes (the data audit runs with the report)"
    found = [c["one"] if c["count"] is None else f"{c['count']} {c['one'] if c['count'] == 1 else c['many']}"
             for c in counts if c["count"] != 0]
    return ("; ".join(found) + " (see report.html)") if found else "no warnings: no leakage, label errors, outliers, " \
        "dropped classes, skipped images or failed heads found"
