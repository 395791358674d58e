"""The house rules of the code base, checked on every test run: layers, no import cycles, TensorFlow kept out of
the orchestration layer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "pipeline", "classifiers", "features")


@pytest.fixture(scope="module")
def graph():
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_import_cycles_between_modules(graph):
    ours = [m for m in graph.modules if m.split(".")[0] in PACKAGES]
    cycles = sorted({tuple(sorted((a, b))) for a in ours for b in graph.find_modules_directly_imported_by(a)
                     if b.split(".")[0] in PACKAGES and b != a and graph.chain_exists(importer=b, imported=a)})
    assert not cycles, f"import cycles: {cycles}"


def test_tensorflow_in_pipeline_only_for_device_queries(graph):
    importers = {m for m in graph.find_modules_that_directly_import("tensorflow") if m.startswith("pipeline")}
    assert importers <= {"pipeline.devices"}, importers
