"""The notebook API: the README's example runs as written (on a tiny subset), and `import pipeline` stays light."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

PER_CLASS = 4


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow  # two Lite0 extractions (classify's cache, predict's): ~40 s alone, minutes on a busy machine
def test_readme_example_runs_on_a_tiny_subset(tmp_path):
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            target = tmp_path / "data" / "hymenoptera-small" / split / name
            target.mkdir(parents=True)
            for path in sorted((ROOT / "data" / "hymenoptera-small" / split / name).iterdir())[:PER_CLASS]:
                shutil.copy(path, target)
    (tmp_path / "models").symlink_to(ROOT / "models")
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best model: results/api-demo/best" in done.stdout and "audit of 16 images" in done.stdout
    assert (tmp_path / "results" / "api-demo" / "report.html").exists()
    assert (tmp_path / "predictions" / "api-demo__best" / "val.csv").exists()
    assert not (tmp_path / "results" / "api-demo" / "best" / "predictions").exists()


def test_import_pipeline_loads_neither_tensorflow_nor_sklearn():
    code = ("import sys, pipeline; from pipeline import classify, extract; "
            "print('tensorflow' in sys.modules, 'sklearn' in sys.modules, callable(classify), callable(extract))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["False", "False", "True", "True"], done.stderr


def test_the_api_functions_survive_an_import_of_the_stage_modules():
    import pipeline
    import pipeline.classification  # noqa: F401  (the stage module is named apart from the API function)
    from pipeline import classify, extract

    assert callable(classify) and callable(extract) and classify.__module__ == "pipeline.api"


def test_an_unknown_keyword_is_one_clear_error():
    from features.errors import UsageError
    from pipeline import classify

    with pytest.raises(UsageError, match="Unknown argument.*feature.*Expected some of: features"):
        classify(feature="x.h5")


def test_console_script_entry_point_is_the_cli():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'feature-cache = "pipeline.cli:main"' in text
    done = run_cli("audit", "--help")
    assert done.returncode == 0 and "--threshold" in done.stdout
