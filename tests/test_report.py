"""report.html and the data audit on real photos with planted problems, checked in a real headless browser.

A copy of 20 images per class and split of data/hymenoptera-small gets 5 train images copied into val (90% size,
JPEG quality 80: what a scraper's second download looks like) and 5 train images moved to the other class. One
Lite0 extraction and one classify run serve every test of this module.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier

from classifiers.heads import HEADS, HeadSpec
from classifiers.report import by_rank, leaderboard_figure, markdown, rank, save_figure, shown, why_chosen, \
    write_leaderboard
from classifiers.testing import separable, write_cache
from pipeline.classification import ClassifyConfig, classify
from pipeline.cli import main
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.page import GALLERY_MAX
from tests.conftest import LITE0, ROOT

DOCS_SHOT = ROOT / "docs" / "report.png"

PER_CLASS = 20
PLANTED = 5


def planted_copy(source: Path, target: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Copy a subset of `source` into `target` and plant problems; returns (duplicate pairs, flipped paths),
    paths relative to `target`."""
    classes = sorted(p.name for p in (source / "train").iterdir())
    for split in ("train", "val"):
        for name in classes:
            (target / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).iterdir())[:PER_CLASS]:
                shutil.copy(path, target / split / name / path.name)
    duplicates, flips = [], []
    for i in range(PLANTED):
        name = classes[i % 2]
        original = sorted((target / "train" / name).iterdir())[i]
        image = cv2.imread(str(original))
        smaller = cv2.resize(image, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA)
        copy = target / "val" / name / f"dup_{original.stem}.jpg"
        cv2.imwrite(str(copy), smaller, [cv2.IMWRITE_JPEG_QUALITY, 80])
        duplicates.append((f"train/{name}/{original.name}", f"val/{name}/{copy.name}"))
    for i in range(PLANTED):
        name, other = classes[i % 2], classes[1 - i % 2]
        moved = sorted((target / "train" / name).iterdir())[-1 - i]
        shutil.move(moved, target / "train" / other / moved.name)
        flips.append(f"train/{other}/{moved.name}")
    return duplicates, flips


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(cache, run dir, duplicate pairs, flipped paths) of the planted copy."""
    folder = tmp_path_factory.mktemp("planted")
    duplicates, flips = planted_copy(ROOT / "data" / "hymenoptera-small", folder / "data")
    cfg = ExtractConfig(backbone=str(LITE0), data=str(folder / "data"), layer=["avg_pool"],
                        out=str(folder / "lite0.h5"))
    cache = extract(cfg, verbose=False).path
    run = classify(ClassifyConfig(features=str(cache), heads="logreg,knn", out=str(folder / "run")))
    return cache, run, duplicates, flips


def _found(duplicates: pd.DataFrame, issues: pd.DataFrame, planted_pairs, flips) -> tuple[int, int]:
    leaks = {frozenset(pair) for pair in duplicates.loc[duplicates["cross_split"], ["path_a", "path_b"]].values}
    return (sum(frozenset(pair) in leaks for pair in planted_pairs),
            len(set(flips) & set(issues["path"])))


def test_report_names_at_least_4_of_5_planted_duplicates_and_flips(planted):
    _, run, pairs, flips = planted
    dups, issues = pd.read_csv(run / "audit" / "duplicates.csv"), pd.read_csv(run / "audit" / "label_issues.csv")
    assert min(_found(dups, issues, pairs, flips)) >= 4, (dups, issues)
    page = (run / "report.html").read_text()
    assert sum(Path(b).name in page for _, b in pairs) >= 4 and sum(Path(f).name in page for f in flips) >= 4


def test_audit_command_writes_the_same_findings_and_a_page(planted, tmp_path, capsys):
    cache, _, pairs, flips = planted
    assert main(["audit", "--features", str(cache), "--out", str(tmp_path / "audit")]) == 0
    assert "across splits (leakage)" in capsys.readouterr().out and (tmp_path / "audit" / "audit.html").exists()
    dups = pd.read_csv(tmp_path / "audit" / "duplicates.csv")
    issues = pd.read_csv(tmp_path / "audit" / "label_issues.csv")
    assert min(_found(dups, issues, pairs, flips)) >= 4


def test_report_page_is_self_contained(planted):
    _, run, _, _ = planted
    page = (run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for section in ("summary", "leaderboard", "layers", "confusion", "per-class", "mistakes", "curve", "duplicates",
                    "label-issues", "outliers", "warnings", "failed", "skipped", "notes"):
        assert f'id="{section}"' in page
    curve = pd.read_csv(run / "learning_curve.csv")
    assert curve["per_class"].tolist() == [1, 2, 5, 10, 19]  # up to the smallest training class (ants: 20 - 3 + 2)
    assert curve["runs"].iloc[-1] == 1 and curve["runs"].max() <= 5 and curve["mean"].iloc[-1] > 0.8


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it)")
    return path


WIDTHS = (1280, 800)  # a laptop and a narrow window
SCREEN_HEIGHT = 900


def _browse(chromium: str, page: Path, screenshot: Path | None) -> dict:
    """Console errors, number of gallery thumbnails and of images that did not decode, read by Playwright; and at
    each of WIDTHS the page's scroll width, the summary card's top, bottom and text."""
    from playwright.sync_api import sync_playwright

    errors, layout = [], {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for width in WIDTHS:
            tab = browser.new_page(viewport={"width": width, "height": SCREEN_HEIGHT})
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            tab.on("pageerror", lambda err: errors.append(str(err)))
            tab.goto(page.as_uri(), wait_until="load")
            card = tab.locator("#summary")
            layout[width] = {"scroll": tab.evaluate("document.documentElement.scrollWidth"),
                             "viewport": tab.evaluate("window.innerWidth"),
                             "card_top": card.bounding_box()["y"] if card.count() else None,
                             "card_bottom": (card.bounding_box()["y"] + card.bounding_box()["height"]
                                             if card.count() else None),
                             "card": card.inner_text() if card.count() else "",
                             "text": tab.evaluate("document.body.innerText")}
        found = {"errors": errors, "layout": layout,
                 "gallery": tab.locator("#mistakes .card img.thumb").count(),
                 "broken": tab.evaluate("[...document.images].filter(i => !i.complete || !i.naturalWidth).length")}
        if screenshot is not None:
            tab.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    return found


def _dump_dom(chromium: str, page: Path) -> dict:
    """Without Playwright: the DOM after load (console errors are printed to stderr with --enable-logging)."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    dom = done.stdout.split('id="mistakes"', 1)[-1].split("</section>", 1)[0]
    return {"errors": errors, "gallery": dom.count('class="thumb"'), "broken": 0, "layout": {}}


def test_report_loads_in_chromium_without_errors_and_shows_every_mistake(planted):
    chromium = _chromium()
    _, run, _, _ = planted
    preds = pd.read_csv(run / "best" / "eval_predictions.csv")
    expected = min(GALLERY_MAX, int((preds["label"] != preds["predicted"]).sum()))
    try:
        import playwright  # noqa: F401
        found = _browse(chromium, run / "report.html", None)
    except ImportError:
        found = _dump_dom(chromium, run / "report.html")
    assert found["errors"] == [] and found["broken"] == 0
    assert found["gallery"] == expected > 0, json.dumps({k: v for k, v in found.items() if k != "layout"})


def test_report_fits_1280_and_800_pixels_and_its_first_screen_says_what_to_use(planted):
    chromium = _chromium()
    pytest.importorskip("playwright", reason="the layout is measured with Playwright (pip install playwright)")
    _, run, _, _ = planted
    best = pd.read_csv(run / "leaderboard.csv").query("chosen").iloc[0]
    leaks = int(pd.read_csv(run / "audit" / "duplicates.csv")["cross_split"].sum())  # the 5 planted, maybe more
    found = _browse(chromium, run / "report.html", None)
    assert found["errors"] == []
    for width in WIDTHS:
        seen = found["layout"][width]
        assert seen["scroll"] <= seen["viewport"] == width, (width, seen["scroll"])  # no sideways page scroll
        assert seen["card_top"] is not None and seen["card_bottom"] <= SCREEN_HEIGHT  # all of it on the first screen
        card = " ".join(seen["card"].split())
        assert f"{best['head']} on {best['backbone']} / {best['layer']}" in card
        assert f"accuracy {best['accuracy']:.3f} (95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f})" in card
        assert f"make predict MODEL={run}/best DATA=<new images>" in card
        assert f"{leaks} cross-split near-duplicates (leakage)" in card and "likely label error" in card
        assert "`" not in seen["text"] and "**" not in seen["text"]  # no markdown left over


def test_classify_ends_by_printing_the_report_path_also_under_cv(tmp_path, capsys):
    from classifiers.testing import separable, write_cache

    X, y = separable(20, 3, 16, seed=3)
    cache = write_cache(tmp_path / "toy.h5", {"vec": X}, y)  # no splits: 5-fold CV, images absent from disk
    assert main(["classify", "--features", str(cache), "--heads", "logreg,ridge", "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report:  {tmp_path / 'run' / 'report.html'}"
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    assert board["scheme"].iloc[0] == "cv5" and (board["ci_low"] <= board["accuracy"]).all()
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="curve"' in page and 'id="duplicates"' in page and "0 of 60 scored images are misclassified" in page
    for empty in ("failed", "skipped", "mistakes"):  # nothing to list: said, not an empty table with headers
        part = page.split(f'id="{empty}"', 1)[1].split("</section>", 1)[0].split('<div id="', 1)[0]
        assert "none found" in part and "<table" not in part and 'class="gallery"' not in part, empty
    card = " ".join(_text(page.split('id="summary"', 1)[1].split("</section>", 1)[0]).split())
    best = board.query("chosen").iloc[0]
    assert f"accuracy {best['accuracy']:.3f} (95% CI {best['ci_low']:.3f}–{best['ci_high']:.3f}) on 5-fold" in card
    assert f"make predict MODEL={tmp_path / 'run'}/best DATA=<new images>" in card and "no failed heads" in card


def _row(head: str, wrong: range, log_loss: float, macro_f1: float, n: int = 120) -> dict:
    accuracy = 1 - len(wrong) / n
    return {"data_id": "d", "backbone": "net", "layer": "avg_pool", "reduce": "none", "head": head, "scheme": "val",
            "augment": "", "cache": "c.h5", "status": "ok", "accuracy": accuracy, "balanced_accuracy": accuracy,
            "macro_f1": macro_f1, "log_loss": log_loss, "fit_s": 0.1, "n_fit": 200, "n_fit_images": 200, "n_eval": n}


def _right(wrong: range, n: int = 120) -> pd.Series:
    return pd.Series(~np.isin(np.arange(n), list(wrong)), index=[f"d:img{i}" for i in range(n)])


# knn is the most accurate; ridge, logreg and mlp are statistically tied with it (McNemar p = 0.5, 0.0625, 0.065),
# sgd is not (p = 0.004). The old order put the tied rows by log-loss first (logreg 0.917, mlp 0.900, knn 0.958,
# ridge 0.942 without log-loss) above the rest: a lower accuracy above a higher one.
WRONG = {"knn": range(0, 5), "ridge": range(0, 7), "logreg": range(0, 10), "mlp": [0, 1, 2, *range(10, 19)],
         "sgd": range(20, 40)}
ROWS = [_row("logreg", WRONG["logreg"], 0.19, 0.93), _row("mlp", WRONG["mlp"], 0.30, 0.91),
        _row("knn", WRONG["knn"], 2.26, 0.90), _row("ridge", WRONG["ridge"], np.nan, 0.95),
        _row("sgd", WRONG["sgd"], 0.50, 0.80),
        {**_row("broken", range(0), np.nan, np.nan), "status": "failed", "accuracy": np.nan,
         "balanced_accuracy": np.nan, "error": "RuntimeError: broken"}]
CORRECT = {i: _right(WRONG[r["head"]]) for i, r in enumerate(ROWS) if r["head"] in WRONG}


def test_leaderboard_lists_rows_by_accuracy_and_marks_the_chosen_row_apart(tmp_path):
    table = rank(ROWS, CORRECT)
    assert table.loc[0, "head"] == "logreg" and table.loc[0, "chosen"]  # row 0: what classify saves as best/
    write_leaderboard(table, tmp_path)
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert list(board["head"]) == ["knn", "ridge", "logreg", "mlp", "sgd", "broken"]
    assert list(board["rank"]) == [1, 2, 3, 4, 5, 6] and board["accuracy"].iloc[:5].is_monotonic_decreasing
    assert list(board["chosen"]) == [False, False, True, False, False, False]
    assert list(board["tied"]) == [True, True, True, True, False, False]
    lines = (tmp_path / "leaderboard.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["tied", "tied", "chosen", "tied", "", ""]
    assert why_chosen(table) == (
        "logreg on net/avg_pool/none is chosen among the 4 rows statistically tied with the most accurate (knn on "
        "net/avg_pool/none, 0.958; exact McNemar test on the same images, p ≥ 0.05) because it has the lowest "
        "log-loss (0.19); its accuracy 0.917 is 0.042 below.")
    assert why_chosen(board) == why_chosen(table)  # the same sentence from the saved file
    top10 = shown(table.assign(rank=table["rank"] * 10), 1)  # the chosen row is shown even beyond the top ranks
    assert list(top10["head"]) == ["knn", "logreg"] and "`" not in markdown(top10)


def test_rank_takes_the_metric_as_a_parameter_and_breaks_equal_scores_by_name():
    by_f1 = by_rank(rank(ROWS, CORRECT, metric="macro_f1"))
    assert list(by_f1["head"]) == ["ridge", "logreg", "mlp", "knn", "sgd", "broken"]
    by_loss = by_rank(rank(ROWS, CORRECT, metric="log_loss"))
    assert list(by_loss["head"][:4]) == ["logreg", "mlp", "sgd", "knn"] and by_loss["chosen"].iloc[0]
    assert "its log-loss" not in why_chosen(rank(ROWS, CORRECT, metric="log_loss"), "log_loss")
    with pytest.raises(ValueError, match="Unknown metric 'f1'. Expected one of accuracy, balanced_accuracy"):
        rank(ROWS, metric="f1")
    twins = [_row("b", range(3), 0.2, 0.9), _row("a", range(3), 0.2, 0.9)]
    for rows in (twins, twins[::-1]):
        assert list(by_rank(rank(rows))["head"]) == ["a", "b"]
    lone = rank([ROWS[2], ROWS[4]], {0: CORRECT[2], 1: CORRECT[4]})
    assert why_chosen(lone) == (
        "knn on net/avg_pool/none is chosen: it has the best accuracy (0.958, 95% CI 0.917–0.992); no other row is "
        "statistically tied with it (exact McNemar test on the same images, p < 0.05).")


def _label_boxes(fig, labels) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return sorted((label.get_window_extent(renderer) for label in labels if label.get_text()), key=lambda b: b.y0)


def test_accuracy_chart_shows_every_interval_and_readable_labels_for_many_caches(tmp_path):
    rows = [{**_row(head, range(k + i), 0.2 + i / 10, 0.9), "cache": f"/cache/hymenoptera__lite0_variant{k}.h5",
             "ci_low": 0.55 + k / 100, "ci_high": min(1.0, 0.99 - k / 100 + i / 50)}
            for k in range(14) for i, head in enumerate(["knn", "logreg", "ridge"])]
    table = rank(rows)  # 14 caches of the same features and data: one label per cache
    fig = leaderboard_figure(by_rank(table))
    fig.tight_layout()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert low < table["ci_low"].min() and high > table["ci_high"].max() == 1.0  # no interval is clipped
    boxes = _label_boxes(fig, ax.get_yticklabels())
    assert len(boxes) == 14 and all(a.y1 <= b.y0 for a, b in zip(boxes, boxes[1:]))  # no label overlaps another
    assert min(b.x0 for b in boxes) >= 0 and fig.get_figwidth() <= 9  # inside the figure, which stays page-wide
    assert [h.get_text() for h in ax.get_legend().get_texts()] == ["knn", "logreg", "ridge", "chosen"]
    outline, best = ax.patches[-1], table.iloc[0]  # the chosen row's bar, outlined
    assert not outline.get_fill() and outline.get_width() == best["accuracy"]
    assert [b.get_y() for b in ax.patches[:-1] if b.get_width() == best["accuracy"]].count(outline.get_y()) == 1
    save_figure(fig, tmp_path / "accuracy.png")


def test_learning_curve_axis_reads_plain_counts(monkeypatch, tmp_path):
    import classifiers.curve as curve

    figures = []
    monkeypatch.setattr(curve, "save_figure", lambda fig, path: figures.append(fig))
    points = pd.DataFrame({"per_class": [1, 2, 5, 10, 20, 21], "mean": [0.5, 0.6, 0.7, 0.8, 0.85, 0.86],
                           "std": [0.1] * 5 + [np.nan], "min": [0.4] * 6, "max": [0.9] * 6})
    curve.plot_curve(points, "logreg", tmp_path / "curve.png")
    ax = figures[0].axes[0]
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["1", "2", "5", "10", "21"]  # 20 would overlap 21
    assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]
    boxes = sorted((b for b in _label_boxes(figures[0], labels)), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))


class _Broken(DummyClassifier):
    def fit(self, X, y, **kwargs):
        raise RuntimeError("this head is broken")


def _with_skipped(path: Path, skipped: list[tuple[str, str]]) -> Path:
    """The cache as an extraction that could not read `skipped` (path, reason) leaves it."""
    with h5py.File(path, "r+") as f:
        del f["skipped"]
        text = h5py.string_dtype("utf-8")
        f.create_dataset("skipped", data=np.array(skipped, dtype=[("path", text), ("reason", text)]))
    return path


def _text(page: str) -> str:
    """What a reader sees of a page: no tags, no style."""
    return html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", page, flags=re.S)))


def test_summary_card_says_what_to_use_and_counts_what_to_worry_about(tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "broken", HeadSpec("broken", lambda random_state: _Broken(), {}, False, False, "x"))
    X, y = separable(20, 3, 16, seed=3, spread=1.0)
    split = np.where(np.arange(len(y)) % 3 == 0, "val", "train")
    wasps = [np.flatnonzero((y == 2) & (split == part))[0] for part in ("train", "val")]  # too few to train on
    keep = np.r_[np.flatnonzero(y < 2), wasps]
    cache = _with_skipped(write_cache(tmp_path / "toy.h5", {"vec": X[keep]}, y[keep], split=split[keep],
                                      label_names=["ants", "bees", "wasps"], data_root="/data/insects"),
                          [("train/ants/broken.jpg", "cannot decode"), ("val/bees/empty.png", "0 bytes")])
    run = classify(ClassifyConfig(features=str(cache), heads="broken,logreg,ridge", out=str(tmp_path / "run")))
    page = (run / "report.html").read_text()
    best = pd.read_csv(run / "leaderboard.csv").query("chosen").iloc[0]
    card = page.split('<section id="summary"', 1)[1].split("</section>", 1)[0]
    assert page.index('<section id="summary"') == page.index("<section")  # the first section
    text = " ".join(_text(card).split())
    assert "insects ( /data/insects ): 3 classes (ants, bees, wasps); images train 27 · val 15" in text
    assert (f"{best['head']} on toynet / vec / reduce none: accuracy {best['accuracy']:.3f} (95% CI "
            f"{best['ci_low']:.3f}–{best['ci_high']:.3f}) on the held-out 'val' split, 14 images") in text
    assert f"make predict MODEL={run}/best DATA=&lt;new images&gt;" in card and ".partial-" not in page
    links = dict((label, anchor) for anchor, label in re.findall(r'href="#([\w-]+)">([^<]+)</a>', card))
    assert links["1 dropped class"] == "notes" and links["2 skipped images"] == "skipped"
    assert links["1 failed head"] == "failed"
    assert {"duplicates", "label-issues", "outliers"} <= set(links.values())
    assert all(f'id="{anchor}"' in page for anchor in links.values())
    failed = page.split('id="failed"', 1)[1].split('id="skipped"', 1)[0]
    assert "this head is broken" in failed
    skipped = page.split('id="skipped"', 1)[1].split('id="notes"', 1)[0]
    assert "train/ants/broken.jpg" in skipped and "0 bytes" in skipped
    assert "dropped class(es) 'wasps' (1 image)" in _text(page.split('id="notes"', 1)[1])
    assert "`" not in _text(page) and "**" not in _text(page)
    assert page.count('<tr class="chosen">') == 1


def test_one_layer_from_two_caches_counts_as_two_feature_sets_named_by_their_files(tmp_path):
    """The same backbone, layer and reduction of one dataset at two image sizes: two feature sets, told apart by the
    cache's file name in the leaderboard, the chart's labels and report.md's count; one cache needs no such column."""
    X, y = separable(20, 2, 8, seed=4, spread=2.0)
    for size, scale in ((64, 1.0), (96, 1.5)):
        write_cache(tmp_path / f"ants_at_{size}.h5", {"avg": X * scale}, y, image_size=size)
    run = classify(ClassifyConfig(features=str(tmp_path / "ants_at_*.h5"), heads="logreg,knn", cv=3,
                                  out=str(tmp_path / "run"), report=False))
    assert "2 heads × 2 feature sets" in (run / "report.md").read_text()
    board = shown(pd.read_csv(run / "leaderboard.csv"))
    assert sorted(board["cache"].unique()) == ["ants_at_64", "ants_at_96"]
    single = pd.read_csv(run / "leaderboard.csv")
    single = single[single["cache"].str.endswith("ants_at_64.h5")]
    assert "cache" not in shown(single).columns


def documented_outputs() -> list[str]:
    """The file patterns of docs/classify.md's Outputs table (`<name>` as a wildcard): the one list of what a classify
    run writes."""
    text = (ROOT / "docs" / "classify.md").read_text()
    table = text[text.index("## Outputs"):].split("\n## ")[0]
    cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [re.sub(r"<[^>]+>", "*", name).rstrip("/") for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def assert_outputs_documented(run: Path) -> None:
    """Every file a run's manifest lists matches a row of docs/classify.md's Outputs table (in a run of several
    datasets, a dataset folder's files as that row says: the files above)."""
    from fnmatch import fnmatch

    from pipeline.classification import dataset_runs

    patterns = documented_outputs()
    assert "*" in patterns  # the `<dataset>/` row
    folders = [f"{r.relative_to(run).as_posix()}/" for r in dataset_runs(run) if r != run]
    listed = json.loads((run / "manifest.json").read_text())["files"]
    inner = [next((f[len(d):] for d in folders if f.startswith(d)), f) for f in listed]
    undocumented = [f for f in inner if not any(fnmatch(f, p) or fnmatch(f, p + "/*") for p in patterns if p != "*")]
    assert listed and undocumented == [], undocumented


def test_every_file_a_run_writes_is_in_the_documented_list(planted):
    _, run, _, _ = planted
    assert_outputs_documented(run)
