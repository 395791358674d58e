"""report.html and the data audit on real photos with planted problems, checked in a real headless browser.

A copy of 20 images per class and split of data/hymenoptera-small gets 5 train images copied into val (90% size,
JPEG quality 80: what a scraper's second download looks like) and 5 train images moved to the other class. One
Lite0 extraction and one classify run serve every test of this module.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import pandas as pd
import pytest

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
    for section in ("leaderboard", "layers", "confusion", "per-class", "mistakes", "curve", "duplicates",
                    "label-issues", "outliers"):
        assert f'id="{section}"' in page
    curve = pd.read_csv(run / "learning_curve.csv")
    assert curve["per_class"].tolist() == [1, 2, 5, 10, 19]  # up to the smallest training class (ants: 20 - 3 + 2)
    assert curve["runs"].iloc[-1] == 1 and curve["runs"].max() <= 5 and curve["mean"].iloc[-1] > 0.8


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it)")
    return path


def _browse(chromium: str, page: Path, screenshot: Path | None) -> dict:
    """Console errors, number of gallery thumbnails and of images that did not decode, read by Playwright."""
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        tab.on("pageerror", lambda err: errors.append(str(err)))
        tab.goto(page.as_uri(), wait_until="load")
        found = {"errors": errors,
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
    return {"errors": errors, "gallery": dom.count('class="thumb"'), "broken": 0}


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
    assert found["gallery"] == expected > 0, json.dumps(found)


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
