"""Orchestration of the two stages, the CLI (`python -m pipeline`, `feature-cache`) and the notebook API.

`from pipeline import extract, classify, predict, audit` gives the keyword functions of pipeline/api.py. They are
loaded on first use, so `import pipeline` stays light (no TensorFlow, no scikit-learn). The attribute names
belong to the functions: reach the stage modules with `from pipeline.classify import ClassifyConfig` (or
`sys.modules`), not with `import pipeline.classify as m`.
"""
import importlib
import sys
import types

__version__ = "0.1.0"
API = ("extract", "classify", "predict", "audit")


class _Package(types.ModuleType):
    """Keeps the API names bound to the functions: importing the submodules pipeline.extract, pipeline.classify
    and pipeline.predict would otherwise rebind `pipeline.extract` etc. to those modules."""

    def __setattr__(self, name, value):
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name):
        if name in API:
            return getattr(importlib.import_module("pipeline.api"), name)
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
