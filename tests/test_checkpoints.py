"""Checkpoints that cost O(change): the progress record holds two counters, files skipped on the way are appended to
a log with their candidate index (never rewritten per batch), a resume drops logged entries past the recorded
`files_done` (a kill between the two leaves some) and never counts one twice, and files that are no images (a
caption beside each image) are no candidates: they grow no list, while odd entries that look like images stay
listed."""
from __future__ import annotations

import json
import os

import h5py
import pytest

from features.catalog import discover
from features.store import CacheWriter, Progress, partial_path, progress_path
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import write_images
from tests.test_update import assert_same, contents

BATCH = 4


@pytest.fixture
def folder(tmp_path):
    """Two classes of 12 images, three of them undecodable (spread over the batches), and a caption beside each."""
    data = tmp_path / "data"
    for k, name in enumerate(["ants", "bees"]):
        for image in write_images(data / name, 12, seed=k):
            image.with_suffix(".txt").write_text("a caption, not an image")
    for rel in ("ants/img_002.jpg", "ants/img_010.jpg", "bees/img_005.jpg"):
        (data / rel).write_bytes(b"\xff\xd8 not a jpeg")
    (data / "bees" / "gone.jpg").symlink_to("nowhere.jpg")  # looks like an image: listed by discovery
    return data


def skipped_of(path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return {p.decode(): r.decode() for p, r in f["skipped"][()]}


def test_captions_beside_images_grow_no_list_and_odd_images_stay_listed(folder):
    cat = discover(folder)
    assert len(cat) == 24 and not [p for p in cat.paths if p.endswith(".txt")]
    assert [rel for rel, _ in cat.ignored] == ["bees/gone.jpg"]
    assert cat.notes == ("left out 24 other files (24 .txt) under DATA: not image files, so no candidates (not listed "
                         "as skipped)",)


def test_an_interrupted_run_keeps_counters_in_its_record_and_skipped_files_in_a_log_it_resumes_from(
        folder, tiny_backbone, tmp_path, monkeypatch):
    cfg = ExtractConfig(backbone=str(tiny_backbone), data=str(folder), out=str(tmp_path / "c.h5"), batch_size=BATCH,
                        workers=1)
    fresh = extract(cfg.replace(out=str(tmp_path / "fresh.h5")), verbose=False)
    assert fresh.images == 21 and set(skipped_of(fresh.path)) == {"bees/gone.jpg", "ants/img_002.jpg",
                                                                  "ants/img_010.jpg", "bees/img_005.jpg"}

    real_write, writes, logged = CacheWriter.write, [], []
    real_append = Progress.append_log

    def stop_at_fourth_batch(self, *args):
        writes.append(1)
        if len(writes) == 4:
            raise KeyboardInterrupt
        real_write(self, *args)

    def append(path, entries):
        logged.append(list(entries))
        real_append(path, entries)

    monkeypatch.setattr(CacheWriter, "write", stop_at_fourth_batch)
    monkeypatch.setattr(Progress, "append_log", staticmethod(append))
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, verbose=False)
    monkeypatch.undo()
    out = tmp_path / "c.h5"
    record = json.loads(progress_path(out).read_text())
    assert record == {"rows_written": 10, "files_done": 12}  # 3 batches of 4 candidates, 2 of them undecodable
    reason = dict(fresh.skipped)
    log = [json.loads(line) for line in Progress.log_path(out).read_text().splitlines()]
    assert log == [[-1, "bees/gone.jpg", reason["bees/gone.jpg"]], [2, "ants/img_002.jpg", reason["ants/img_002.jpg"]],
                   [10, "ants/img_010.jpg", reason["ants/img_010.jpg"]]]
    assert logged == [[(2, "ants/img_002.jpg", reason["ants/img_002.jpg"])], [],
                      [(10, "ants/img_010.jpg", reason["ants/img_010.jpg"])]]  # each batch appends its own entries

    resumed = extract(cfg, verbose=False)
    assert (resumed.status, resumed.images, resumed.processed) == ("resumed", 21, 21 - 10)
    assert_same(contents(out), contents(fresh.path))  # no skipped entry lost or doubled
    assert not progress_path(out).exists() and not Progress.log_path(out).exists() and not partial_path(out).exists()


def test_entries_logged_past_the_record_by_a_kill_are_dropped_on_resume(tmp_path):
    """A kill after a batch's skipped files were appended but before its record was saved: the log holds entries at or
    past `files_done` (and perhaps a line cut short); `load` drops them, `start_log` rewrites the log without them."""
    out = tmp_path / "c.h5"
    Progress(rows_written=6, files_done=8).save(out)
    lines = [[-1, "odd.jpg", "a named pipe"], [3, "a/3.jpg", "not a decodable image"],
             [8, "a/8.jpg", "not a decodable image"], [9, "a/9.jpg", "empty"]]
    Progress.log_path(out).write_text("".join(json.dumps(e) + "\n" for e in lines) + '[11, "a/11.j')
    loaded = Progress.load(out)
    assert loaded == Progress(6, 8, [["odd.jpg", "a named pipe"], ["a/3.jpg", "not a decodable image"]])
    loaded.start_log(out)
    assert Progress.load(out) == loaded
    Progress.append_log(out, [(8, "a/8.jpg", "again")])  # the resumed run appends what it finds itself
    Progress(rows_written=7, files_done=12).save(out)
    assert Progress.load(out).skipped == loaded.skipped + [["a/8.jpg", "again"]]


def test_a_batch_costs_the_same_however_many_files_were_skipped_before(tmp_path, tiny_backbone, monkeypatch):
    """The record saved after each batch is the same few bytes at the first and the last batch of a folder where most
    files are skipped; the log only ever grows by the batch's own entries."""
    data = tmp_path / "data"
    write_images(data / "ants", 6, seed=0)
    for i in range(40):
        (data / "ants" / f"bad_{i:02d}.jpg").write_bytes(b"")
    out = tmp_path / "c.h5"
    sizes, real_save = [], Progress.save

    def save(self, path):
        real_save(self, path)
        sizes.append((progress_path(path).stat().st_size, Progress.log_path(path).stat().st_size))

    monkeypatch.setattr(Progress, "save", save)
    result = extract(ExtractConfig(backbone=str(tiny_backbone), data=str(data), out=str(out), batch_size=BATCH,
                                   workers=1), verbose=False)
    assert result.images == 6 and len(result.skipped) == 40
    records, logs = zip(*sizes)
    assert max(records) - min(records) <= 4  # the counters' digits only
    assert logs == tuple(sorted(logs)) and logs[-1] > 40 * 20  # appended, never rewritten smaller
    assert not os.path.exists(Progress.log_path(out))
