"""results.md (machine facts, then one part per section), results.csv (every table cell, long format), PNG plots."""
from __future__ import annotations

import csv
from pathlib import Path

from benchmarks.common import Section, fmt

STATUS = {True: "**met**", False: "**not met**", None: "report only"}


def _save(fig, folder: Path, name: str, section: Section) -> None:
    """Write one section's figure and list it in that section (once, however often the report is rewritten)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    if name not in section.plots:
        section.plots.append(name)

def _table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return lines


def write_markdown(path: Path, facts: dict, settings: list[str], sections: list[Section], explanations: dict[int, str],
                   profile_notes: list[str]) -> None:
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`python -m benchmarks`). Every target is a ratio of figures measured side "
             "by side in the same run; absolute figures are shown for context only (the machine is shared).", "",
             "## Machine", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += ["", "## Run", ""] + [f"- {s}" for s in settings]
    lines += ["", "## Summary", "", "| # | section | target | value | status |", "|---|---|---|---|---|"]
    for s in sections:
        lines.append(f"| {s.number} | {s.title.split(' (')[0].split(':')[0]} | {s.target} | {s.value} | "
                     f"{STATUS[s.met]} |")
    if profile_notes:
        lines += ["", "## Profile before optimising", ""] + [f"- {n}" for n in profile_notes]
    for s in sections:
        lines += ["", f"## {s.number}. {s.title}", "", f"Target: {s.target}. Status: {STATUS[s.met]}"
                  + (f" ({s.value})." if s.value else "."), ""]
        if s.rows:
            lines += _table(s.columns, s.rows)
        for caption, columns, rows in s.extra_tables:
            lines += ["", caption + ":", ""] + _table(columns, rows)
        for plot in s.plots:
            lines += ["", f"![section {s.number}]({plot})"]
        if explanations.get(s.number):
            lines += ["", explanations[s.number]]
        lines += [""] + [f"- {n}" for n in s.notes] if s.notes else []
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_csv(path: Path, sections: list[Section]) -> None:
    """One line per table cell: section, table, row (first column), column, value."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "table", "row", "column", "value"])
        for s in sections:
            tables = [("main", s.columns, s.rows)] + [(c.split(":")[0][:60], cols, rows)
                                                      for c, cols, rows in s.extra_tables]
            for name, columns, rows in tables:
                for row in rows:
                    key = " / ".join(str(row.get(c)) for c in columns[:2] if not isinstance(row.get(c), float))
                    for c in columns:
                        if c in row and row[c] is not None:
                            w.writerow([s.number, name, key, c, row[c]])


def plot_sections(folder: Path, sections: list[Section]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_number = {s.number: s for s in sections}
    if 1 in by_number and by_number[1].rows:
        s = by_number[1]
        labels = [r["model"] for r in s.rows]
        series = [("TF model only", "tf_model_only_img_s"), ("engine model only", "model_only_img_s"),
                  ("ours end-to-end", "end_to_end_img_s"), ("Keras peer", "keras_peer_img_s")]
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for i, (name, key) in enumerate(series):
            ax.bar(x + (i - 1.5) * 0.2, [r.get(key, np.nan) for r in s.rows], 0.2, label=name)
        ax.set_xticks(x, labels)
        ax.set_ylabel("images / s")
        ax.set_title("Section 1: end-to-end vs model-only (same run)")
        ax.legend()
        _save(fig, folder, "section1_throughput.png", s)
    if 3 in by_number and by_number[3].rows:
        s = by_number[3]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        extra = by_number.get(2)
        for dtype in ("float32", "float16"):
            pts = [(r["images"], r["peak_rss_mb"]) for r in s.rows if r["dtype"] == dtype]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"ours, {dtype}")
        mem = extra.extra_tables[0][2] if extra and extra.extra_tables else []
        if mem:
            for method in ("naive loop", "keras peer (image_dataset_from_directory + predict)"):
                pts = [(r["images"], r["peak_rss_mb"]) for r in mem if r["method"] == method]
                if pts:
                    ax.plot(*zip(*pts), "s--", label=method.split(" (")[0])
        ax.set_xlabel("images")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("Sections 2-3: peak memory vs images (VGG19 block2_pool)")
        ax.legend(fontsize=8)
        _save(fig, folder, "section3_memory.png", s)
    if 6 in by_number and by_number[6].rows:
        s = by_number[6]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, prefix, xlabel in [(axes[0], "N=", "samples N"), (axes[1], "d=", "feature dims d")]:
            keys = [c for c in s.columns if c.startswith(prefix)]
            for r in s.rows:
                pts = [(int(k[len(prefix):]), r[k]) for k in keys if isinstance(r.get(k), float)]
                if pts:
                    ax.loglog(*zip(*pts), "o-", label=r["head"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fit seconds (with search)")
        axes[1].legend(fontsize=7)
        fig.suptitle("Section 6: stage-two fit time scaling")
        _save(fig, folder, "section6_scaling.png", s)
