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
from classifiers.stats import choose, explain  # noqa: E402

# accuracy order (before classifiers.stats.choose moves the best tied row first): ties broken by balanced
# accuracy, then lower log-loss, then faster fit
SORT_BY = ["accuracy", "balanced_accuracy", "log_loss", "fit_s"]
SORT_ASCENDING = [False, False, True, True]
SHOWN = ["backbone", "layer", "reduce", "head", "augment", "scheme", "accuracy", "ci_low", "ci_high",
         "tied", "accuracy_std", "augment_gain",
         "balanced_accuracy", "macro_f1", "top5", "log_loss", "fit_s", "predict_s", "error"]
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


def rank(rows: list[dict], correct: dict[int, pd.Series] | None = None, seed: int = 0) -> pd.DataFrame:
    """The leaderboard: best first (classifiers.stats.choose: the lowest log-loss among rows tied with the top
    accuracy), with 95% intervals, and `augment_gain` (accuracy minus the clean twin's) on augmented rows.
    `correct[i]` (optional) is row i's per-image correctness, indexed by image path, for the paired tests
    (failed heads have none)."""
    table = _with_augment(pd.DataFrame(rows).drop(columns="augment_gain", errors="ignore"))  # recomputed
    table["row_id"] = np.arange(len(table))
    keys = SAME_MODEL + ["augment", "cache"]  # one leaderboard row each
    gains = augment_gains(table)[keys + ["gain"]].rename(columns={"gain": "augment_gain"})
    table = table.merge(gains, on=keys, how="left")
    table = table.sort_values(SORT_BY, ascending=SORT_ASCENDING, na_position="last", kind="stable")
    table = choose(table.reset_index(drop=True), correct, seed).drop(columns="row_id")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def shown(table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """The columns a person reads, empty columns (metrics, augment on clean runs) dropped, numbers rounded."""
    view = table.reindex(columns=["rank"] + SHOWN).head(top).replace("", np.nan).dropna(axis=1, how="all")
    return view.fillna({"augment": ""}).round(4)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the optional `tabulate` dependency that DataFrame.to_markdown needs."""
    cells = table.astype(object).where(table.notna(), "")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)])


def write_leaderboard(table: pd.DataFrame, run_dir: Path) -> None:
    """leaderboard.csv/.md, and augment_gain.csv when the run has clean and augmented caches of the same features."""
    table.to_csv(run_dir / "leaderboard.csv", index=False)
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
    table = pd.read_csv(run_dir / "leaderboard.csv")
    extra = table.reindex(columns=["augment", "cache"]).fillna("").astype(str)
    label = (table["backbone"] + "\n" + table["layer"] + " · " + table["reduce"]
             + extra["augment"].where(extra["augment"] == "", " · " + extra["augment"]))
    shared = label.groupby(label).transform(lambda same: extra.loc[same.index, "cache"].nunique() > 1)
    table["features"] = label.where(~shared.astype(bool), label + "\n" + extra["cache"].map(lambda c: Path(c).stem))
    groups, heads = list(dict.fromkeys(table["features"])), sorted(table["head"].unique())
    width = 0.8 / len(heads)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(heads) / 3)), 4.5))
    for i, head in enumerate(heads):
        part = table[table["head"] == head].set_index("features").reindex(groups)
        ax.bar(np.arange(len(groups)) + (i - (len(heads) - 1) / 2) * width, part["accuracy"], width,
               yerr=_error_bars(part), label=head, capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    ax.set_ylabel(f"accuracy ({table['scheme'].iloc[0]})")
    ax.set_ylim(max(0.0, np.nanmin(table["accuracy"]) - 0.1), 1.0)
    ax.legend(fontsize=8, ncols=min(len(heads), 5), loc="lower right")
    ax.set_title("Accuracy by layer and head")
    return save_figure(fig, run_dir / "accuracy.png")


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


def _fmt(value: float, std: float | None = None) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None and not pd.isna(std) else "")


def write_report(run_dir: Path, table: pd.DataFrame, record: dict, run: dict, notes: list[str]) -> Path:
    """report.md: what ran, what won and how sure we are, what to do next — readable in a minute."""
    best = table.iloc[0]
    scheme = best["scheme"]
    how = (f"{scheme[2:]}-fold stratified cross-validation (mean ± std over folds); hyperparameters chosen by "
           f"inner CV within each training fold; the saved model is refitted on all labelled images"
           if scheme.startswith("cv") else
           f"fitted on the 'train' split, hyperparameters chosen by CV inside train, scored once on the held-out "
           f"'{scheme}' split; the saved model is exactly the scored one")
    lines = [
        f"# Classify run {run_dir.name}", "",
        f"**Best:** `{best['head']}` on `{best['backbone']}` / `{best['layer']}` / reduce `{best['reduce']}` — "
        f"accuracy **{_fmt(best['accuracy'], best['accuracy_std'])}**, balanced accuracy "
        f"{_fmt(best['balanced_accuracy'])}, macro-F1 {_fmt(best['macro_f1'])}, log-loss {_fmt(best['log_loss'])}"
        + (f", top-5 {_fmt(best['top5'])}" if not pd.isna(best["top5"]) else "") + ".", "",
        f"- Why this one: {explain(table)}",
        f"- Evaluation: {how}.",
        f"- Data: {int(best['n_fit_images'])} training and {int(best['n_eval'])} scored images"
        + (f" (trained on {int(best['n_fit'])} rows: clean and augmented views {best['augment']}; only clean "
           f"views are scored)" if best["n_fit"] != best["n_fit_images"] else "")
        + f", {len(record['class_names'])} classes; seed {run['seed']}.",
        f"- Tried {len(table)} combinations ({table['head'].nunique()} heads × "
        f"{table[['backbone', 'layer', 'reduce', 'augment']].drop_duplicates().shape[0]} feature sets) in "
        f"{run['seconds']:.1f} s; "
        f"peak memory {format_bytes(run['peak_bytes'])} above start (budget {format_bytes(run['budget_bytes'])}).",
        f"- Use it: `make predict MODEL={run_dir / 'best'} DATA=<image folder>`", "",
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
    best = table.iloc[0]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        board = shown(table, top).to_string(index=False)
    return "\n".join([
        board, "",
        f"best: {best['head']} on {best['backbone']}/{best['layer']}/{best['reduce']}: accuracy "
        f"{_fmt(best['accuracy'], best['accuracy_std'])} ({record['scheme']}), "
        f"balanced {_fmt(best['balanced_accuracy'])}, macro-F1 {_fmt(best['macro_f1'])}",
        f"{len(table)} combinations in {run['seconds']:.1f} s; peak memory {format_bytes(run['peak_bytes'])} "
        f"(budget {format_bytes(run['budget_bytes'])}); {len(run['notes'])} warning(s), see report.md",
        *([f"why:     {explain(table)}"] if "tied" in table else []),
        f"results: {run_dir}/  (report.md, leaderboard.csv, accuracy.png, best/)",
        f"next:    make predict MODEL={run_dir / 'best'} DATA=<image folder>",
        *([f"report:  {run_dir / 'report.html'}"] if (run_dir / "report.html").exists() else []),
    ])
