"""The three DATA layouts, labels CSVs, and their errors."""
from __future__ import annotations

import pytest

from features.catalog import discover
from features.errors import UsageError
from tests.conftest import write_images


def test_class_folders(class_folder):
    cat = discover(class_folder)
    assert cat.layout == "classes" and cat.label_names == ["cats", "dogs"]
    assert len(cat) == 20 and cat.paths == sorted(cat.paths)
    assert cat.labels == [0] * 10 + [1] * 10 and set(cat.splits) == {""}


def test_split_folders_keep_the_split_per_image(tmp_path):
    for split, n in [("train", 4), ("val", 2), ("test_holdout", 1)]:
        for name in ["ants", "bees"]:
            write_images(tmp_path / split / name, n, seed=n)
    cat = discover(tmp_path)
    assert cat.layout == "splits" and cat.label_names == ["ants", "bees"]
    assert cat.splits.count("train") == 8 and cat.splits.count("val") == 4 and cat.splits.count("test") == 2
    assert all(cat.label_names[label] == path.split("/")[1] for path, label in zip(cat.paths, cat.labels))


def test_csv_labels_by_stem_or_path_with_split_column_and_unlabelled_rest(tmp_path):
    write_images(tmp_path / "imgs", 4, seed=0)
    (tmp_path / "imgs" / "sub").mkdir()
    write_images(tmp_path / "imgs" / "sub", 1, seed=1)  # sub/img_000.png: its stem clashes with img_000.png
    (tmp_path / "labels.csv").write_text(
        "Filename,Category,split\nimg_000,cat,train\nimg_001.jpg,dog,val\n./img_002.jpg,cat,train\nsub/img_000,dog,test\n"
        "missing.jpg,cat,train\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "labels.csv"))
    by_path = dict(zip(cat.paths, zip(cat.labels, cat.splits)))
    assert cat.label_names == ["cat", "dog"]
    assert by_path == {"img_000.png": (0, "train"), "img_001.jpg": (1, "val"), "img_002.jpg": (0, "train"),
                       "img_003.png": (-1, ""), "sub/img_000.png": (1, "test")}
    assert ("missing.jpg", "listed in the labels CSV but not found under DATA") in cat.ignored


def test_csv_columns_given_explicitly(tmp_path):
    write_images(tmp_path / "imgs", 2, seed=0)
    (tmp_path / "l.csv").write_text("a,b,c\nx,img_000,cat\ny,img_001,dog\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "l.csv"), path_column="b", label_column="c")
    assert cat.labels == [0, 1]
    with pytest.raises(UsageError, match="no label column 'nope'. Columns are: a, b, c"):
        discover(tmp_path / "imgs", str(tmp_path / "l.csv"), path_column="b", label_column="nope")


def test_flat_folder_is_unlabelled(tmp_path):
    write_images(tmp_path, 3, seed=0)
    cat = discover(tmp_path)
    assert cat.layout == "unlabelled" and cat.labels == [-1, -1, -1] and cat.label_names == []


def test_shards_are_balanced_contiguous_and_restore_the_order(class_folder):
    cat = discover(class_folder)
    shards = [cat.shard(i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [6, 7, 7]
    assert sum((s.paths for s in shards), []) == cat.paths


def test_fingerprint_changes_when_a_file_changes(class_folder):
    before = discover(class_folder).fingerprint()
    write_images(class_folder / "cats", 11, seed=5)  # rewrites img_000..img_009, adds img_010
    assert discover(class_folder).fingerprint() != before


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "e").mkdir() or p / "e", "holds no images"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
])
def test_bad_data_folders(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        discover(make(tmp_path))


def test_csv_naming_no_image_is_an_error(tmp_path):
    write_images(tmp_path / "imgs", 2, seed=0)
    (tmp_path / "l.csv").write_text("path,label\nzzz.jpg,cat\n")
    with pytest.raises(UsageError, match="none of its 1 rows names an image"):
        discover(tmp_path / "imgs", str(tmp_path / "l.csv"))


def test_a_symlink_loop_neither_multiplies_nor_relabels_images(tmp_path):
    """`ants/up -> ..` once turned 16 images into 656 and labelled bees under ants/up/bees as ants."""
    data = tmp_path / "data"
    write_images(data / "ants", 3, seed=0)
    write_images(data / "bees", 2, seed=1)
    (data / "ants" / "up").symlink_to("..")
    (data / "ants" / "bees_too").symlink_to("../bees")  # a link to a folder that is catalogued at its own place
    outside = tmp_path / "more_ants"
    write_images(outside, 2, seed=2)
    (data / "ants" / "more").symlink_to(outside)  # a link out of DATA is followed, once
    (outside / "again").symlink_to(outside)  # and a loop out there ends too
    cat = discover(data)
    by_path = {p: cat.label_names[label] for p, label in zip(cat.paths, cat.labels)}
    assert len(cat) == 7, cat.paths
    assert [p for p, name in by_path.items() if name == "bees"] == [f"bees/img_00{i}.{e}" for i, e in
                                                                     [(0, "png"), (1, "jpg")]]
    assert sum(p.startswith("ants/more/") for p in cat.paths) == 2
    skipped = dict(cat.ignored)
    assert "ants/up/" in skipped and "ants/bees_too/" in skipped and "ants/more/again/" in skipped


def test_conflicting_duplicate_ids_are_refused_and_identical_ones_collapse(tmp_path):
    write_images(tmp_path / "imgs", 3, seed=0)
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nimg_000,cat\nimg_000.png,cat\nimg_001,dog\nimg_002,cat\n")
    assert discover(tmp_path / "imgs", str(csv)).labels == [0, 1, 0]
    csv.write_text("path,label\nimg_000,cat\nimg_001,dog\nimg_001.jpg,cat\nimg_000,dog\nimg_002,cat\n")
    with pytest.raises(UsageError, match=r"gives 2 image\(s\) conflicting labels or splits \(img_000.png: 'cat', "
                                         r"'dog'; img_001.jpg: 'cat', 'dog'\)"):
        discover(tmp_path / "imgs", str(csv))


def test_unrecognised_csv_columns_are_refused_naming_the_expected_ones(tmp_path):
    write_images(tmp_path / "imgs", 2, seed=0)
    (tmp_path / "l.csv").write_text("a,b\nimg_000,cat\nimg_001,dog\n")
    with pytest.raises(UsageError, match=r"no recognised path column \(its columns: a, b\). Expected one of: path, "
                                         r"filepath.*--path-column"):
        discover(tmp_path / "imgs", str(tmp_path / "l.csv"))
    (tmp_path / "l3.csv").write_text("a,b,c\nimg_000,cat,1\nimg_001,dog,2\n")
    with pytest.raises(UsageError, match=r"no recognised label column .* Expected one of: label, class.*--label-column"):
        discover(tmp_path / "imgs", str(tmp_path / "l3.csv"), path_column="a")  # two candidates: no guess
    assert discover(tmp_path / "imgs", str(tmp_path / "l.csv"), path_column="a", label_column="b").labels == [0, 1]


def test_a_recognised_key_and_one_other_column_make_that_column_the_label(tmp_path):
    """Kaggle's labels.csv (id,breed): the key is recognised and one column is left, so it is the label, said so."""
    write_images(tmp_path / "imgs", 2, seed=0)
    (tmp_path / "labels.csv").write_text("id,breed\nimg_000,beagle\nimg_001,boxer\n")
    cat = discover(tmp_path / "imgs", str(tmp_path / "labels.csv"))
    assert cat.label_names == ["beagle", "boxer"] and cat.labels == [0, 1]
    assert cat.notes == (f"labels CSV '{tmp_path / 'labels.csv'}': using column 'breed' as the label (the only "
                         "column besides 'id'); name another with --label-column",)
    assert discover(tmp_path / "imgs", str(tmp_path / "labels.csv")).shard(0, 2).notes == cat.notes
