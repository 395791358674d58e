"""pipeline/merge.py without a backbone: which files form a shard set (`find_shards`), what is refused before
anything is written and in which sentence (`check_shards`, `merge`), the merged attributes (`merged_attrs`), the
merged rows, skipped entries and result of a copied, virtual or up-to-date merge, and where a sharded extraction's
merged cache goes (`merged_out`). Shards are fabricated through the real writer (classifiers.testing.write_cache),
so each test takes milliseconds: these are the tests `make mutate MODULES=pipeline/merge.py` runs first."""
from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.merge as merging
from classifiers.testing import write_cache
from features.errors import UsageError
from features.schema import CacheAttrs, ConfigMismatch, IncompleteCache
from features.store import cache_dir, open_cache, partial_path, progress_path
from pipeline.config import ExtractConfig
from pipeline.merge import (MergeResult, check_shards, find_shards, merge, merged_attrs, merged_out,
                            open_file_limit)

CREATED = ["2030-01-02T00:00:00+00:00", "2030-01-01T00:00:00+00:00", "2030-01-03T00:00:00+00:00"]


def shard_set(
        folder: Path, count: int, rows: int = 3, skipped: dict[int, list[tuple[str, str]]] | None = None, complete: bool
        = True, **attrs) -> tuple[list[Path], np.ndarray, list[str]]:
    """`count` shards of `rows` rows each (x.shardI-of-N.h5 in `folder`): distinct features, paths of growing length
    (shard I's are the longest in shard N-1), shard I's `created` CREATED[I % 3]; `skipped[I]` are shard I's skipped
    entries, counted among its candidates. Returns the shard paths, all features and all paths in order."""
    skipped = skipped or {}
    shards, features, paths = [], [], []
    for i in range(count):
        X = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 100 * i
        names = [f"c{k % 2}/{'i' * (i + 1)}{i}_{k}.jpg" for k in range(rows)]
        config = {"backbone": "toynet", "shard": f"{i}/{count}", "workers": i}
        path = write_cache(folder / f"x.shard{i}-of-{count}.h5", {"x": X}, [k % 2 for k in range(rows)],
                           label_names=["c0", "c1"], paths=names, shard=f"{i}/{count}", config_json=json.dumps(config),
                           complete=complete, **attrs)
        target = path if complete else partial_path(path)
        with h5py.File(target, "r+") as f:
            f.attrs["created"] = CREATED[i % 3]
            f.attrs["num_candidates"] = rows + len(skipped.get(i, []))
            if i in skipped:
                text = h5py.string_dtype("utf-8")
                if "skipped" in f:
                    del f["skipped"]
                f.create_dataset("skipped", data=np.array(skipped[i], dtype=[("path", text), ("reason", text)]))
        shards.append(path)
        features.append(X)
        paths += names
    return shards, np.concatenate(features), paths


def test_find_shards_from_the_merged_name_or_any_shard_in_index_order(tmp_path: Path) -> None:
    """Either name gives (merged path, shards by index, numerically: 10 after 9); an unfinished shard (partial
    name) counts as present; names of other sets, malformed indices and other suffixes are not shards of it."""
    for i in range(12):
        (tmp_path / (f".x.shard{i}-of-12.h5.partial" if i == 5 else f"x.shard{i}-of-12.h5")).touch()
    for other in ("y.shard0-of-2.h5", "x.shard0-of-2.npz", "x.shardA-of-2.h5", "x.shard7-of-7.z.shard0-of-3.h5",
                  ".x.shard0-of-4.h5.lock"):
        (tmp_path / other).touch()
    expected = [tmp_path / f"x.shard{i}-of-12.h5" for i in range(12)]
    assert find_shards(tmp_path / "x.h5") == (tmp_path / "x.h5", expected)
    assert find_shards(tmp_path / "x.shard3-of-12.h5") == (tmp_path / "x.h5", expected)


def test_find_shards_refuses_no_shards_mixed_counts_and_missing_indices_in_one_sentence(tmp_path: Path) -> None:
    """The three refusals, word for word: nothing found (naming the expected file names), two shard counts
    (listing both sets by index), and the missing indices of the one count."""
    with pytest.raises(UsageError) as err:
        find_shards(tmp_path / "x.h5")
    assert str(err.value) == (f"no shards of '{tmp_path / 'x.h5'}' found. Expected files named x.shard0-of-2.h5, "
                              "x.shard1-of-2.h5, ... beside it (written by 'extract --shard I/N' or a SLURM array).")
    for name in ("x.shard2-of-3.h5", "x.shard0-of-3.h5", "x.shard0-of-2.h5"):
        (tmp_path / name).touch()
    with pytest.raises(UsageError) as err:
        find_shards(tmp_path / "x.shard0-of-3.h5")
    assert str(err.value) == (f"shards of '{tmp_path / 'x.h5'}' come from runs with different shard counts (2 shards: "
                              "x.shard0-of-2.h5; 3 shards: x.shard0-of-3.h5, x.shard2-of-3.h5). Delete the stale set "
                              "and merge again.")
    (tmp_path / "x.shard0-of-2.h5").unlink()
    (tmp_path / "x.shard2-of-3.h5").rename(tmp_path / "x.shard2-of-4.h5")
    (tmp_path / "x.shard0-of-3.h5").rename(tmp_path / "x.shard0-of-4.h5")
    with pytest.raises(UsageError) as err:
        find_shards(tmp_path / "x.h5")
    assert str(err.value) == (f"cannot merge '{tmp_path / 'x.h5'}': shard(s) 1, 3 of 4 missing (expected "
                              "x.shard1-of-4.h5, x.shard3-of-4.h5). Run them (extract --shard I/4, or resubmit those "
                              "array tasks), then merge again.")


def test_check_shards_reports_every_incomplete_shard_by_index_with_its_progress(tmp_path: Path) -> None:
    """Shard 0 unfinished without a progress record, shard 1 complete, shard 2 unfinished with one (2 of its 3
    candidates done), shard 3 gone but for its progress record (candidates unknown): one sentence for all."""
    complete, _, _ = shard_set(tmp_path, 4)
    for i in (0, 2):
        with h5py.File(complete[i], "r+") as f:
            f.attrs["complete"] = False
        complete[i].rename(partial_path(complete[i]))
    for i in (2, 3):
        progress_path(complete[i]).write_text(json.dumps({"rows_written": 2, "files_done": 2, "skipped": []}))
    complete[3].unlink()
    with pytest.raises(IncompleteCache) as err:
        check_shards(complete)
    assert str(err.value) == ("cannot merge: shard(s) 0 (x.shard0-of-4.h5: no progress record); 2 (x.shard2-of-4.h5: 2 "
                              "of 3 files done); 3 (x.shard3-of-4.h5: 2 of ? files done) of 4 incomplete. Rerun or "
                              "resubmit those shard tasks with the same flags (they resume where they stopped), then "
                              "merge again.")


def test_a_published_shard_marked_incomplete_is_refused(tmp_path: Path) -> None:
    """A shard file at its own name whose `complete` flag is false (its record says how far it got)."""
    shards, _, _ = shard_set(tmp_path, 2)
    with h5py.File(shards[1], "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(IncompleteCache, match=r"shard\(s\) 1 \(x\.shard1-of-2\.h5: no progress record\) of 2 "):
        check_shards(shards)


def test_check_shards_returns_every_shards_attributes_when_they_agree(tmp_path: Path) -> None:
    """Per-shard attributes (shard, candidates, created, config_json) may differ; the rest is equal."""
    shards, _, _ = shard_set(tmp_path, 3)
    attrs = check_shards(shards)
    assert [a.shard for a in attrs] == ["0/3", "1/3", "2/3"] and [a.created for a in attrs] == CREATED


def test_a_shard_holding_another_index_or_another_configuration_is_refused_naming_it(tmp_path: Path) -> None:
    """A shard renamed to another index: its recorded shard vs its name. A shard made with other flags: the first
    four differences (of five here), and the fix."""
    shards, _, _ = shard_set(tmp_path, 2)
    shards[1].unlink()
    write_cache(shards[1], {"x": np.ones((2, 4), np.float32)}, [0, 1], label_names=["c0", "c1"], shard="0/2")
    with pytest.raises(UsageError) as err:
        check_shards(shards)
    assert str(err.value) == (f"{shards[1]} holds shard '0/2', but its name says 1/2. Rename it back or rerun that "
                              "shard.")
    shards[1].unlink()
    write_cache(shards[1], {"x": np.ones((2, 4), np.float32)}, [0, 1], label_names=["c0", "c1"], shard="1/2",
                backbone="other", weights="w.h5", image_size=64, resize="squash", pool="avg")
    with pytest.raises(ConfigMismatch) as err:
        check_shards(shards)
    assert str(err.value) == ("shard 1 (x.shard1-of-2.h5) was made with a different configuration than shard 0 "
                              "(backbone: 'toynet' -> 'other'; weights: 'none' -> 'w.h5'; image_size: 32 -> 64; "
                              "resize: 'crop' -> 'squash'). Shards of one extraction must share every flag but "
                              "--shard; rerun shard 1 with shard 0's flags (--overwrite), then merge again.")


def test_merged_attrs_are_shard_0s_with_no_shard_and_every_candidate() -> None:
    """Shard 0's attributes (its config_json too, but with shard null), shard '', candidates summed."""
    a = CacheAttrs.example(shard="0/2", num_candidates=3, created=CREATED[0],
                           config_json=json.dumps({"shard": "0/2", "workers": 0}))
    b = CacheAttrs.example(shard="1/2", num_candidates=4, created=CREATED[1],
                           config_json=json.dumps({"shard": "1/2", "workers": 1}))
    assert merged_attrs([a, b]) == dataclasses.replace(a, shard="", num_candidates=7,
                                                       config_json=json.dumps({"shard": None, "workers": 0}))


def test_a_copied_merge_equals_the_shards_concatenated(tmp_path: Path) -> None:
    """Rows, paths (as wide as the widest shard's), labels and skipped entries in shard order; the attributes of
    shard 0 but candidates summed and the earliest `created`; the result says what was written."""
    skips = {0: [("c0/bad.jpg", "empty file (0 bytes)")],
             2: [("c1/x.jpg", "cannot be decoded"), ("c1/y.png", "truncated")]}
    shards, X, paths = shard_set(tmp_path, 3, skipped=skips)
    widths = [open_cache(s).path_bytes for s in shards]
    result = merge(tmp_path / "x.shard1-of-3.h5", out=tmp_path / "m.h5")
    skipped = [["c0/bad.jpg", "empty file (0 bytes)"], ["c1/x.jpg", "cannot be decoded"], ["c1/y.png", "truncated"]]
    assert result == MergeResult(tmp_path / "m.h5", "written", shards, 9, skipped, False, "", {"x": (4,)})
    out = open_cache(tmp_path / "m.h5")
    np.testing.assert_array_equal(out.read("x"), X)
    assert out.paths.tolist() == paths and out.labels.tolist() == [0, 1, 0] * 3
    assert out.path_bytes == max(widths) > min(widths)
    assert out.skipped == [tuple(s) for s in skipped]
    assert (out.attrs.shard, out.attrs.num_candidates, out.attrs.num_images, out.attrs.created) == ("", 12, 9,
                                                                                                    CREATED[1])
    assert json.loads(out.attrs.config_json) == {"backbone": "toynet", "shard": None, "workers": 0}
    with h5py.File(tmp_path / "m.h5") as f:
        assert not f["features/x"].is_virtual


def test_a_set_of_one_shard_merges_to_its_rows(tmp_path: Path) -> None:
    """--shard 0/1 is a set of one: the merge is its rows, written to the unsharded name by default."""
    shards, X, paths = shard_set(tmp_path, 1)
    result = merge(shards[0])
    assert (result.path, result.status, result.images) == (tmp_path / "x.h5", "written", 3)
    np.testing.assert_array_equal(open_cache(tmp_path / "x.h5").read("x"), X)


def test_a_virtual_merge_links_the_shards_features_and_copies_the_rest(tmp_path: Path) -> None:
    """virtual=True: features/* are virtual datasets reading the shards, paths are copied; values as copied."""
    shards, X, paths = shard_set(tmp_path, 2)
    result = merge(tmp_path / "x.h5", virtual=True)
    assert result == MergeResult(tmp_path / "x.h5", "written", shards, 6, [], True, "", {"x": (4,)})
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["features/x"].is_virtual and not f["paths"].is_virtual
    out = open_cache(tmp_path / "x.h5")
    np.testing.assert_array_equal(out.read("x"), X)
    assert out.paths.tolist() == paths


def test_a_merge_already_done_is_up_to_date_and_another_configuration_at_out_is_refused(tmp_path: Path) -> None:
    """Merging again: 'up-to-date' with the existing cache's row count, nothing rewritten. A cache of another
    configuration at --out: refused naming the first four differences, unless --overwrite."""
    shards, _, _ = shard_set(tmp_path / "a", 2)
    merge(tmp_path / "a" / "x.h5")
    generation = open_cache(tmp_path / "a" / "x.h5").attrs.generation
    again = merge(tmp_path / "a" / "x.h5", virtual=True)
    assert again == MergeResult(tmp_path / "a" / "x.h5", "up-to-date", shards, 6, virtual=True)
    assert open_cache(tmp_path / "a" / "x.h5").attrs.generation == generation
    assert merge(tmp_path / "a" / "x.h5").virtual is False
    others, _, _ = shard_set(tmp_path / "b", 2, backbone="other", weights="w.h5", image_size=64, resize="squash",
                             pool="avg")
    with pytest.raises(ConfigMismatch) as err:
        merge(others[0], out=tmp_path / "a" / "x.h5")
    assert str(err.value) == (f"{tmp_path / 'a' / 'x.h5'} exists with a different configuration (backbone: 'toynet' "
                              "-> 'other'; weights: 'none' -> 'w.h5'; image_size: 32 -> 64; resize: 'crop' -> "
                              "'squash'). Pass --overwrite to replace it, or choose another --out.")
    replaced = merge(others[0], out=tmp_path / "a" / "x.h5", overwrite=True)
    assert replaced.status == "written" and open_cache(tmp_path / "a" / "x.h5").attrs.backbone == "other"


def test_an_unfinished_cache_at_out_of_the_same_configuration_is_written_over(tmp_path: Path) -> None:
    """An earlier merge's output marked incomplete is no reason to stop: the merge is written again."""
    shards, _, _ = shard_set(tmp_path, 2)
    merge(tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5", "r+") as f:
        f.attrs["complete"] = False
    assert merge(tmp_path / "x.h5").status == "written"


def test_out_naming_an_unfinished_shard_is_refused(tmp_path: Path) -> None:
    """--out names shard 1, which exists only under its partial name: still an input of this merge, refused."""
    shards, _, _ = shard_set(tmp_path, 2)
    with h5py.File(shards[1], "r+") as f:
        f.attrs["complete"] = False
    shards[1].rename(partial_path(shards[1]))
    with pytest.raises(UsageError) as err:
        merge(tmp_path / "x.h5", out=shards[1])
    assert str(err.value) == (f"--out '{shards[1]}' is shard 1 of 2 ('{shards[1]}'), an input of this merge; writing "
                              f"there would destroy it. Choose another --out, e.g. the default '{tmp_path / 'x.h5'}'.")


@pytest.mark.parametrize("limit, virtual", [(66, True), (65, False)])
def test_a_virtual_merge_is_copied_when_the_open_file_limit_cannot_hold_its_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, virtual: bool) -> None:
    """Two shards need 2 + 64 (OPEN_FILES_RESERVE) open files: at a limit of 66 the merge is virtual, at 65 it is
    copied and says why; a merge that was not asked to be virtual says nothing, whatever the limit."""
    shards, X, _ = shard_set(tmp_path, 2)
    monkeypatch.setattr(merging, "open_file_limit", lambda: limit)
    result = merge(tmp_path / "x.h5", virtual=True)
    note = "" if virtual else ("copied instead of virtual: reading 2 shards at once needs more open files than the "
                               "limit of 65 here (ulimit -n)")
    assert (result.virtual, result.note) == (virtual, note)
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["features/x"].is_virtual is virtual
    np.testing.assert_array_equal(open_cache(tmp_path / "x.h5").read("x"), X)
    copied = merge(tmp_path / "x.h5", out=tmp_path / "y.h5")
    assert (copied.virtual, copied.note) == (False, "")


def test_open_file_limit_is_the_soft_limit() -> None:
    """The soft limit (what open() is held to), not the hard one: lowered here for the check, then restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard, 4096) - 1, hard))
    try:
        assert open_file_limit() == min(soft, hard, 4096) - 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_merged_out_is_out_else_the_default_name_of_the_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--out as given; else the unsharded default name of --layer, or of the backbone's recorded default layer
    (a .keras file's sidecar, read with --preprocess when the sidecar has none); no default layer: refused."""
    monkeypatch.setenv("FEATURE_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "net.keras"
    model.write_bytes(b"")
    sidecar = model.with_suffix(".json")
    cfg = ExtractConfig(backbone=str(model), data=str(tmp_path / "photos"), preprocess="mean=127,std=128")
    assert merged_out(cfg.replace(out=str(tmp_path / "o.h5"))) == tmp_path / "o.h5"
    assert merged_out(cfg.replace(layer=["a", "b"])) == cache_dir() / "photos__net__a+b.h5"
    sidecar.write_text(json.dumps({"input_size": 32, "default_layer": "pool"}))
    assert merged_out(cfg) == cache_dir() / "photos__net__pool.h5"
    sidecar.write_text(json.dumps({"input_size": 32}))
    with pytest.raises(UsageError) as err:
        merged_out(cfg)
    assert str(err.value) == (f"backbone '{model}' has no default layer recorded; name it with --layer (LAYER=) or "
                              "give --out, so that every shard and the merge agree on the file names.")


def test_shards_of_other_images_are_refused_though_their_cache_identity_matches(tmp_path: Path) -> None:
    """Every attribute but the per-shard ones must match shard 0's, not only the identity: here the data root."""
    shards, _, _ = shard_set(tmp_path, 2)
    shards[1].unlink()
    write_cache(shards[1], {"x": np.ones((2, 4), np.float32)}, [0, 1], label_names=["c0", "c1"], shard="1/2",
                data_root="/other")
    with pytest.raises(ConfigMismatch) as err:
        check_shards(shards)
    assert str(err.value).startswith("shard 1 (x.shard1-of-2.h5) was made with a different configuration than shard 0 "
                                     "(data_root: '/synthetic' -> '/other'). ")
