"""Orchestration of the two stages, the CLI (`python -m pipeline`, `feature-cache`) and the notebook API.

`from pipeline import extract, classify, predict, audit` gives the keyword functions of pipeline/api.py. They are
loaded on first use (PEP 562), so `import pipeline` stays light (no TensorFlow, no scikit-learn). The stage modules
behind them are pipeline.extraction, pipeline.classification and pipeline.prediction.

Importing the package also keeps TensorFlow's start-up log lines (CUDA stubs, cuInit, absl) off the screen when
TensorFlow loads later: see pipeline/quiet.py; set TF_CPP_MIN_LOG_LEVEL=0 beforehand to see them.
"""
import importlib

from pipeline.quiet import silence_tensorflow

silence_tensorflow()

__version__ = "0.1.0"
API = ("extract", "classify", "predict", "audit")
__all__ = list(API)


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
