"""classifiers/saved.py, line by line: the exact JSON `strict` makes, every refusal's exact sentence (the path it
names, the fix it gives, the error text cut at 160 characters), the mlp's head.keras and a fine-tuned network saved
beside model.json, and a backbone file hashed once. Written against the mutants `make mutate
MODULES=classifiers/saved.py` left alive (docs/testing.md)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.pipeline import Pipeline

from classifiers import saved
from features.backbones import sha256_file
from features.errors import UsageError

REMAKE = "re-run `make classify` to save it again"


def test_strict_makes_plain_json_values_of_numpy_paths_tuples_and_non_finite_floats():
    value = {1: np.float32(0.5), "a": (np.int64(3), [np.nan, np.inf, -np.inf]), "arr": np.array([[1, 2], [3, 4]]),
             "p": Path("x/y.h5"), "none": None, "flag": np.bool_(True), "s": "text", "nested": [{"t": (1.5, None)}]}
    assert saved.strict(value) == {"1": 0.5, "a": [3, [None, None, None]], "arr": [[1, 2], [3, 4]], "p": "x/y.h5",
                                   "none": None, "flag": True, "s": "text", "nested": [{"t": [1.5, None]}]}
    assert saved.strict(np.array([np.nan, 2.0])) == [None, 2.0]
    assert type(saved.strict(np.int64(3))) is int and type(saved.strict(np.bool_(False))) is bool
    assert saved.strict(b"raw") == "b'raw'"  # anything else: its str


def test_load_record_refuses_each_bad_record_in_its_own_sentence(tmp_path):
    with pytest.raises(UsageError) as err:
        saved.load_record(tmp_path)
    assert str(err.value) == (f"No saved model at {str(tmp_path)!r}: expected {str(tmp_path / 'model.json')!r} "
                              "written by `make classify` (e.g. MODEL=results/<run>/best).")
    record = tmp_path / "model.json"
    record.write_text("{oops")
    with pytest.raises(UsageError, match=r"^'.*model\.json' is not valid JSON \(Expecting property name .*\); "
                                         "re-run `make classify` to save it again.$"):
        saved.load_record(tmp_path)
    for text, missing in [("[1, 2]", "an object"), ('{"model_file": "model.skops"}', "['class_names']"),
                          ("{}", "['model_file', 'class_names']")]:
        record.write_text(text)
        with pytest.raises(UsageError) as err:
            saved.load_record(tmp_path)
        assert str(err.value) == (f"{str(record)!r} is not a model record of this tool (missing {missing}); "
                                  f"{REMAKE}.")
    record.write_text('{"model_file": "model.skops", "class_names": ["a"], "extra": 1}')
    assert saved.load_record(tmp_path) == {"model_file": "model.skops", "class_names": ["a"], "extra": 1}


def _refused(model_dir, record, **kwargs) -> str:
    with pytest.raises(UsageError) as err:
        saved.load_head(model_dir, record, **kwargs)
    return str(err.value)


def test_load_head_names_a_missing_or_unknown_head_file(tmp_path):
    missing = tmp_path / "model.skops"
    assert _refused(tmp_path, {"model_file": "model.skops"}) == (
        f"The model file {str(missing)!r} named in model.json does not exist; {REMAKE}.")
    (tmp_path / "model.pkl").write_bytes(b"\x80")
    assert _refused(tmp_path, {"model_file": "model.pkl"}) == (
        f"{str(tmp_path / 'model.pkl')!r} is not a head this version reads (expected model.skops); {REMAKE}.")


class Foreign0:
    pass


class Foreign1(Foreign0):
    pass


class Foreign2(Foreign0):
    pass


class Foreign3(Foreign0):
    pass


class Foreign4(Foreign0):
    pass


class Foreign5(Foreign0):
    pass


def test_a_head_file_with_foreign_types_names_the_first_five_sorted(tmp_path):
    path = tmp_path / "model.skops"
    foreign = [Foreign5(), Foreign3(), Foreign0(), Foreign1(), Foreign4(), Foreign2()]
    skops.io.dump({"steps": foreign}, path)
    names = sorted(f"{type(o).__module__}.{type(o).__qualname__}" for o in foreign)
    assert _refused(tmp_path, {"model_file": "model.skops"}) == (
        f"{str(path)!r} holds types this tool never writes ({', '.join(names[:5])}); it is refused so that no "
        "foreign code runs. Re-run `make classify` to save it again.")


def test_a_head_file_that_cannot_be_read_is_named_with_the_error_cut_at_160_characters(tmp_path, monkeypatch):
    path = tmp_path / "model.skops"
    path.write_bytes(b"PK")

    def damaged(file):
        raise RuntimeError("e" * 300)

    monkeypatch.setattr(skops.io, "get_untrusted_types", damaged)
    assert _refused(tmp_path, {"model_file": "model.skops"}) == (
        f"{str(path)!r} cannot be read (RuntimeError: {'e' * 160}): it is damaged or not written by this tool; "
        f"{REMAKE}.")


class Explodes:
    """A pickle whose loading raises a long error (it is trusted, so running it is what was asked)."""

    def __reduce__(self):
        return int, ("x" * 300,)


def test_a_legacy_pickle_needs_trust_and_a_broken_one_is_one_sentence(tmp_path, capsys):
    path = tmp_path / "model.joblib"
    path.write_bytes(pickle.dumps(Explodes()))
    record = {"model_file": "model.joblib"}
    assert "Pass --trust-pickle only if you trust" in _refused(tmp_path, record)  # not trusted by default
    try:
        int("x" * 300)
    except ValueError as err:
        text = str(err)[:160]
    assert _refused(tmp_path, record, trust_pickle=True) == (
        f"{str(path)!r} cannot be unpickled (ValueError: {text}); {REMAKE}.")
    assert capsys.readouterr().err == (
        f"warning: loading the pickle {str(path)!r} because of --trust-pickle; it can run code. Re-run `make classify`"
        " to replace it with model.skops.\n")


class Reduce(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X


class NetHead(ClassifierMixin, BaseEstimator):
    """A head that, like the mlp, also writes its net alone."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def save_keras(self, path):
        Path(path).write_text(f"net of {type(self).__name__}")


def test_save_writes_the_last_steps_net_beside_the_head_and_the_record_last(tmp_path):
    model = Pipeline([("reduce", Reduce()), ("scale", Reduce()), ("head", NetHead())]).fit(np.eye(3), [0, 1, 1])
    best = tmp_path / "results" / "run" / "best"  # folders made as needed
    record = saved.save(best, model, {"class_names": ["a", "b"], "log_loss": np.float64("nan")})
    assert np.isnan(record["log_loss"]) and {k: v for k, v in record.items() if k != "log_loss"} == {"class_names": ["a", "b"],
                                                                     "model_file": "model.skops", "format": 2}
    assert (best / "head.keras").read_text() == "net of NetHead"
    assert sorted(p.name for p in best.iterdir()) == ["head.keras", "model.json", "model.skops"]
    assert json.loads((best / "model.json").read_text())["log_loss"] is None
    plain = Pipeline([("reduce", Reduce()), ("head", NetHead())])
    plain.steps[-1] = ("head", Reduce())  # a head without save_keras: no head.keras
    saved.save(tmp_path / "plain", plain, {"class_names": ["a"]})
    assert not (tmp_path / "plain" / "head.keras").exists()


def test_a_fine_tuned_network_is_saved_beside_its_record_and_loads_back(tmp_path):
    import keras

    inputs = keras.Input((4,))
    network = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    record = saved.save_network(tmp_path, network, {"class_names": ["a", "b"], "head": "finetune"})
    assert record == {"class_names": ["a", "b"], "head": "finetune", "model_file": "model.keras", "format": 2}
    assert saved.load_record(tmp_path) == record and saved.is_network(record)
    loaded = saved.load_network(tmp_path / "model.keras")
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in network.layers]
    for got, want in zip(loaded.get_weights(), network.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "junk.keras").write_text("junk")
    with pytest.raises(UsageError, match=r"^model file '.*junk\.keras' is not a Keras model"):
        saved.load_network(tmp_path / "junk.keras")


def test_a_backbone_file_found_twice_is_hashed_once(tmp_path, monkeypatch):
    backbone = tmp_path / "b.keras"
    backbone.write_bytes(b"weights")
    hashed = []
    monkeypatch.setattr(saved, "sha256_file", lambda p: hashed.append(p) or "other")
    assert saved._find_by_hash([backbone, tmp_path / "." / "b.keras", backbone], "wanted") is None
    assert hashed == [backbone]


def test_a_changed_backbone_is_named_with_both_hashes(tmp_path):
    here, other = tmp_path / "b.keras", tmp_path / "best" / "b.keras"
    here.write_bytes(b"new weights")
    other.parent.mkdir()
    other.write_bytes(b"other weights")
    wanted = "f" * 64
    record = {"backbone": str(here), "backbone_file_sha256": wanted}
    with pytest.raises(UsageError) as err:
        saved.locate_backbone(record, other.parent)
    assert str(err.value) == (
        f"Backbone mismatch: {str(here)!r} has sha256 {sha256_file(here)[:12]}…, but the model was trained on "
        f"features of b.keras sha256 {'f' * 12}…. Restore the original file, or re-run `make extract` and "
        "`make classify` with this one.")


def test_a_missing_backbone_lists_every_place_looked_and_where_to_copy_it(tmp_path):
    sha = "ab" * 32
    record = {"backbone": "models/b.keras", "backbone_file_sha256": sha, "backbone_abspath": "/gone/b.keras"}
    with pytest.raises(UsageError) as err:
        saved.locate_backbone(record, tmp_path)
    assert str(err.value) == (
        f"Backbone file 'b.keras' (sha256 {sha}) that the model was trained with is not at /gone/b.keras, "
        f"{tmp_path / 'b.keras'}, models/b.keras. Copy it (with its sidecar .json) into {str(tmp_path)!r}.")
    # a record with a hash but no path: nothing is invented, only the folder itself is looked in
    with pytest.raises(UsageError) as err:
        saved.locate_backbone({"backbone_file_sha256": sha}, tmp_path)
    assert str(err.value) == (f"Backbone file '' (sha256 {sha}) that the model was trained with is not at ., "
                              f"{tmp_path}. Copy it (with its sidecar .json) into {str(tmp_path)!r}.")
    assert saved.locate_backbone({"backbone": "vgg19"}, tmp_path) is None  # a registry backbone: nothing to find


def test_a_failed_save_leaves_no_record_and_no_temporary_file(tmp_path, monkeypatch):
    """model.json goes first and comes back last: a folder whose head could not be written has no record, so it is
    never taken for a complete model; the half-written file beside it is removed."""
    model = Pipeline([("reduce", Reduce()), ("head", NetHead())]).fit(np.eye(3), [0, 1, 1])
    best = tmp_path / "best"
    saved.save(best, model, {"class_names": ["a", "b"]})
    before = (best / "model.skops").read_bytes()

    def disk_full(obj, file):
        Path(file).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(skops.io, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        saved.save(best, model, {"class_names": ["a", "b"]})
    assert sorted(p.name for p in best.iterdir()) == ["head.keras", "model.skops"]
    assert (best / "model.skops").read_bytes() == before


def test_model_json_is_indented_by_two_and_ends_with_a_newline(tmp_path):
    assert saved.dumps({"a": [1, float("nan")], "b": {"c": "d"}}) == (
        '{\n  "a": [\n    1,\n    null\n  ],\n  "b": {\n    "c": "d"\n  }\n}')
    saved.write_json(tmp_path / "r.json", {"n": np.int64(3)})
    assert (tmp_path / "r.json").read_text() == '{\n  "n": 3\n}\n'


def test_the_record_says_where_the_backbone_is_now_when_it_is_found(tmp_path):
    model = Pipeline([("reduce", Reduce()), ("head", Reduce())])
    backbone = tmp_path / "models" / "b.keras"
    backbone.parent.mkdir()
    backbone.write_bytes(b"weights")
    record = {"class_names": ["a"], "backbone": str(backbone), "backbone_file_sha256": sha256_file(backbone)}
    assert saved.save(tmp_path / "found", model, record)["backbone_abspath"] == str(backbone.resolve())
    gone = {**record, "backbone": str(tmp_path / "gone.keras")}
    assert "backbone_abspath" not in saved.save(tmp_path / "gone", model, gone)
    assert "backbone_abspath" not in saved.save(tmp_path / "registry", model, {"class_names": ["a"],
                                                                               "backbone": "vgg19"})
