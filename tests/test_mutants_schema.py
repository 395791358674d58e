"""Tests written against mutmut survivors of features/schema.py (`make mutate MODULES=features/schema.py`): each
asserts an exact value or sentence that a one-token change to the schema would alter."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from features import schema
from features.schema import (CUT, GRAPH, IDENTITY, RECIPE, REBUILD, SCHEMA_VERSION, CacheAttrs, DamagedCache,
                             backbone_label, identity_diff, names, plain, recipe)


def test_attr_declares_default_doc_roles_and_example() -> None:
    """`_attr` (run at import, before any mutant is active, so called here directly) puts the given default and the
    doc, roles and example into the field's metadata under exactly those keys."""
    given = schema._attr("the doc", RECIPE, GRAPH, example=7, default=5)
    assert given.default == 5
    assert dict(given.metadata) == {"doc": "the doc", "roles": frozenset({RECIPE, GRAPH}), "example": 7}
    required = schema._attr("required", CUT, example=["x"])
    assert required.default is dataclasses.MISSING
    assert dict(required.metadata) == {"doc": "required", "roles": frozenset({CUT}), "example": ["x"]}


def test_parse_fills_missing_defaulted_attributes_and_keeps_reading_after_them() -> None:
    """An attribute with a default may be absent (an older writer): it takes its default, and the attributes after
    it are still read."""
    raw = CacheAttrs.example(backbone="vgg19", engine="tf").to_h5()
    for name in ("complete", "generation", "calibration", "engine_reason", "num_images", "created"):
        del raw[name]
    parsed = CacheAttrs.parse(raw, "c.h5")
    assert parsed == CacheAttrs.example(backbone="vgg19", engine="tf")
    assert (parsed.complete, parsed.generation, parsed.num_images) == (False, "", 0)


def test_parse_turns_h5py_values_into_plain_ones() -> None:
    """Numpy scalars, bytes and string arrays, as h5py returns them, become the declared Python types."""
    raw = CacheAttrs.example().to_h5()
    raw.update(image_size=np.int64(224), complete=np.bool_(True), backbone=b"resnet50",
               layers=np.array([b"block1", b"block2"]))
    parsed = CacheAttrs.parse(raw, "c.h5")
    assert (parsed.image_size, parsed.complete, parsed.backbone, parsed.layers) == \
        (224, True, "resnet50", ["block1", "block2"])
    assert type(parsed.image_size) is int and type(parsed.complete) is bool


def test_parse_names_a_missing_required_attribute_in_one_sentence() -> None:
    """A required attribute that is absent is named with its type, the schema version and the fix."""
    raw = CacheAttrs.example().to_h5()
    del raw["image_size"]
    with pytest.raises(DamagedCache) as err:
        CacheAttrs.parse(raw, "x.h5")
    assert str(err.value) == f"x.h5 lacks the root attribute 'image_size' (int) of schema {SCHEMA_VERSION}. {REBUILD}"


@pytest.mark.parametrize("name,value,expected", [
    ("complete", 1, "bool"),
    ("image_size", True, "int"),
    ("backbone", 3, "str"),
    ("crop_fraction", 1, "float"),
    ("layers", ["a", 2], "list[str]"),
    ("layers", "ab", "list[str]"),
])
def test_parse_names_a_mistyped_attribute_and_its_exact_type(name: str, value: object, expected: str) -> None:
    """The refusal quotes the value and the declared type as written in the schema (`list[str]`, not `list`)."""
    raw = {**CacheAttrs.example().to_h5(), name: value}
    with pytest.raises(DamagedCache) as err:
        CacheAttrs.parse(raw, "x.h5")
    assert str(err.value) == f"x.h5: root attribute {name!r} is {value!r}, expected {expected}. {REBUILD}"


def test_is_a_tells_bool_from_int_and_checks_list_items() -> None:
    """bool is not an int for the schema and an int is not a bool; a list[str] is a list whose items are all str."""
    assert schema._is_a(True, bool) and not schema._is_a(1, bool)
    assert schema._is_a(3, int) and not schema._is_a(True, int) and not schema._is_a("3", int)
    assert schema._is_a("a", str) and not schema._is_a(b"a", str)
    assert schema._is_a(["a", "b"], list[str]) and schema._is_a([], list[str])
    assert not schema._is_a(["a", 1], list[str]) and not schema._is_a("ab", list[str])


def test_type_names() -> None:
    """The type words of the refusals and the doc table."""
    assert [schema._type_name(t) for t in (bool, int, str, list[str])] == ["bool", "int", "str", "list[str]"]


def test_plain_decodes_bytes_with_backslashes_for_invalid_utf8() -> None:
    """Bytes are UTF-8; an invalid byte shows as a backslash escape, never an exception; arrays become lists."""
    assert plain("é".encode()) == "é"
    assert plain(b"a\xffb") == "a\\xffb"
    assert plain(np.array([b"x", b"\xfe"])) == ["x", "\\xfe"]
    assert plain(np.float32(0.5)) == 0.5 and type(plain(np.int16(3))) is int
    assert plain([1, 2]) == [1, 2]


def test_names_are_the_attributes_holding_any_of_the_roles_in_declaration_order() -> None:
    """`names` is a union over roles, each attribute once, in declaration order."""
    assert names(CUT) == ("layers",)
    assert names("storage") == ("compression",)
    assert names(CUT, "storage") == ("layers", "compression")
    assert names() == ()
    assert names("updatable") == ("source_fingerprint", "num_candidates")


def test_select_returns_the_values_of_a_role() -> None:
    """`select(role)` maps each attribute of that role to this cache's value."""
    attrs = CacheAttrs.example(layers=["a", "b"], num_candidates=9, source_fingerprint="fp")
    assert attrs.select(CUT) == {"layers": ["a", "b"]}
    assert attrs.select("updatable") == {"source_fingerprint": "fp", "num_candidates": 9}


def test_identity_diff_names_each_differing_attribute_found_then_wanted() -> None:
    """One 'name: found -> wanted' per differing attribute of the roles, none for equal or ignored ones."""
    found = CacheAttrs.example(image_size=32, pool="avg", shard="1/2")
    wanted = CacheAttrs.example(image_size=224, pool="avg", shard="2/2")
    assert identity_diff(found, wanted) == ["image_size: 32 -> 224", "shard: '1/2' -> '2/2'"]
    assert identity_diff(found, wanted, ignore=("shard",)) == ["image_size: 32 -> 224"]
    assert identity_diff(found, wanted, roles=(CUT,)) == []
    assert identity_diff(found, found) == []


def test_recipe_reads_absent_attributes_as_their_default_or_none() -> None:
    """An older record lacking an attribute reads it as its default (`calibration` ""), or None without one; a user's
    backbone file is compared by its hash, so its path is left out."""
    registry = recipe({"backbone": "vgg19", "image_size": 224})
    assert set(registry) == set(names(RECIPE))
    assert (registry["backbone"], registry["image_size"], registry["calibration"], registry["pool"]) == \
        ("vgg19", 224, "", None)
    user = recipe({"backbone": "models/x.keras", "backbone_file_sha256": "abc"})
    assert "backbone" not in user and user["backbone_file_sha256"] == "abc"
    assert set(user) == set(names(RECIPE)) - {"backbone"}


def test_backbone_label_strips_only_model_file_names() -> None:
    """A `.keras` or `.onnx` file is named by its stem; a registry name stays as it is."""
    assert backbone_label("models/net.keras") == "net"
    assert backbone_label("/tmp/m.onnx") == "m"
    assert backbone_label("vgg19") == "vgg19"
    assert backbone_label("my.net") == "my.net"


def test_render_doc_refuses_text_without_markers() -> None:
    """Without both markers there is nothing to replace: one sentence naming them."""
    with pytest.raises(ValueError) as err:
        schema.render_doc("# no markers\n")
    assert str(err.value) == f"the markers {schema.BEGIN!r} ... {schema.END!r} are missing"


def test_render_doc_replaces_only_the_generated_part() -> None:
    """Text before and after the markers stays; between them goes the current markdown()."""
    text = f"intro\n{schema.BEGIN}\nold\nlines\n{schema.END}\noutro\n"
    assert schema.render_doc(text) == f"intro\n{schema.BEGIN}\n{schema.markdown()}{schema.END}\noutro\n"


def test_main_prints_the_tables_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --write the tables go to stdout."""
    assert schema.main([]) == 0
    assert capsys.readouterr().out == schema.markdown()


def test_main_writes_the_tables_into_a_doc(tmp_path: Path) -> None:
    """--write FILE replaces the generated part of FILE in place."""
    doc = tmp_path / "doc.md"
    doc.write_text(f"head\n{schema.BEGIN}\n{schema.END}\n")
    assert schema.main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"head\n{schema.BEGIN}\n{schema.markdown()}{schema.END}\n"


def test_main_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    """--help describes the command and its --write option."""
    with pytest.raises(SystemExit) as done:
        schema.main(["--help"])
    assert done.value.code == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "Print the cache schema's tables, or write them into a doc." in lines
    assert "--write WRITE the markdown file whose generated part is replaced" in lines


def test_example_uses_each_fields_example_and_the_overrides() -> None:
    """`example()` is every attribute at its declared example value, overrides on top."""
    attrs = CacheAttrs.example(image_size=99)
    assert attrs.image_size == 99
    assert attrs.to_h5() == {**{f.name: f.metadata["example"] for f in schema.FIELDS}, "image_size": 99}
    assert IDENTITY == (RECIPE, CUT, "storage", "data")


def test_is_a_float_and_its_type_name() -> None:
    """A float attribute (crop_fraction) takes Python floats only, and is named `float` in refusals."""
    assert schema._is_a(0.875, float) and not schema._is_a(1, float) and not schema._is_a("0.875", float)
    assert schema._type_name(float) == "float"


def test_backbone_label_names_a_kerashub_preset_by_its_last_name() -> None:
    """`hub:` backbones: the last path or handle part that is not a version number, as `hub-<name>`."""
    assert backbone_label("hub:dinov2_small") == "hub-dinov2_small"
    assert backbone_label("hub:kaggle://keras/dinov2/keras/dinov2_small/2") == "hub-dinov2_small"
    assert backbone_label("hub:presets/dinov2_small/") == "hub-dinov2_small"
    assert backbone_label("hub:a\\b:3") == "hub-b"
    assert backbone_label("hub:") == "hub-preset" and backbone_label("hub:/2/") == "hub-preset"
    assert backbone_label("HUB:x") == "HUB:x" and backbone_label("xhub:y") == "xhub:y"


def test_recipe_reads_a_recorded_none_as_the_default() -> None:
    """A record holding None (an older model.json) compares as the default; a false value that is not None stays."""
    found = recipe({"calibration": None, "image_size": 0, "backbone": "vgg19", "backbone_file_sha256": ""})
    assert found["calibration"] == "" and found["image_size"] == 0 and found["backbone"] == "vgg19"
    assert found["backbone_file_sha256"] == ""


def test_a_model_file_is_compared_by_its_hash_not_the_path_it_was_given_as() -> None:
    relative = CacheAttrs.example(backbone="models/x.keras", backbone_file_sha256="ab" * 32)
    absolute = dataclasses.replace(relative, backbone="/home/u/models/x.keras")
    other = dataclasses.replace(absolute, backbone_file_sha256="cd" * 32)
    assert schema.identity_diff(relative, absolute) == []
    assert [d.split(":")[0] for d in schema.identity_diff(relative, other)] == ["backbone_file_sha256"]
    registry = CacheAttrs.example(backbone="vgg19")
    assert [d.split(":")[0] for d in schema.identity_diff(registry, dataclasses.replace(registry, backbone="vgg16"))] \
        == ["backbone"]
    assert schema.by_file(relative.select(GRAPH)) == schema.by_file(absolute.select(GRAPH))
    assert "backbone" in schema.by_file(registry.select(GRAPH))
