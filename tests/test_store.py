"""The cache store: one reader and writer, atomic publishing, one writer at a time, checksums that catch damage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from classifiers.testing import separable, write_cache
from features.errors import UsageError
from features.lock import holder_path
from features.schema import CacheAttrs
from features.store import (CacheWriter, Progress, copy_rows, open_cache, partial_path, progress_path, read_attrs,
                            verify)
from pipeline.cli import main
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.merge import merge
from tests.conftest import ROOT, run_cli

VGG = dict(backbone="vgg19", weights="none", image_size=64, batch_size=4, layer=["block1_pool"])
MAP = (64, 64, 16)  # 256 KiB of float32 a row: 4 rows per chunk, so damage is located to a few rows


def _maps(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return (rng.normal(size=(n, *MAP)) + y[:, None, None, None]).astype(np.float32), y


def _one_line(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, its one error line); progress bars aside, nothing else may be printed."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("classify:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return code, lines[0]


def _overwrite_rows(path, layer: str, first_row: int, data: bytes) -> None:
    """Overwrite the raw bytes of feature row `first_row` on, in the file itself, where its chunk lies on disk."""
    with h5py.File(path) as f:
        dset = f[f"features/{layer}"]
        rows = dset.chunks[0]
        info = dset.id.get_chunk_info_by_coord((first_row - first_row % rows,) + (0,) * len(MAP))
        offset = info.byte_offset + (first_row % rows) * dset[0].nbytes
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(data)


def test_reader_reads_selected_rows_and_copies_them_into_a_new_cache(tmp_path):
    X, y = separable(30, 3, 8)
    source = open_cache(write_cache(tmp_path / "a.h5", {"vec": X, "map": X.reshape(90, 2, 4)}, y, label_names=list("abc")))
    rows = np.array([17, 3, 88, 4])
    assert np.array_equal(source.read("vec", rows), X[rows])
    assert np.array_equal(source.read("map", rows, block_rows=2), X[rows].reshape(4, 2, 4))
    writer = CacheWriter.create(tmp_path / "b.h5", source.attrs, source.shapes, source.paths[rows].tolist(), source.label_names)
    end = copy_rows(source, writer, 0, rows)  # the one call that moves rows between caches
    writer.finalize(Progress(rows_written=end, files_done=end))
    copy = open_cache(tmp_path / "b.h5")
    assert np.array_equal(copy.read("vec"), X[rows]) and copy.paths.tolist() == source.paths[rows].tolist()
    assert copy.labels.tolist() == y[rows].tolist() and copy.label_names == list("abc")
    with h5py.File(copy.path) as f:
        assert all(f[name].fletcher32 for name in ["features/vec", "features/map", "paths", "labels", "split", "view"])


def test_batch_writes_rewrite_chunks_in_place_and_never_the_metadata(tmp_path):
    """The crash-safety design with checksums: every chunk keeps its size (data + 4 bytes) and address, so a batch
    write changes chunk bytes only; a killed writer leaves metadata that opens."""
    X, _ = _maps(12)
    writer = CacheWriter.create(tmp_path / "c.h5", CacheAttrs.example(layers=["map"]), {"map": MAP}, [f"x/{i}.jpg" for i in range(12)], ["x"])

    def chunks() -> list[tuple[int, int]]:
        spans = []
        writer.file.visititems(lambda name, obj: spans.extend(
            (i.byte_offset, i.size) for i in (obj.id.get_chunk_info(k) for k in range(obj.id.get_num_chunks()))
        ) if isinstance(obj, h5py.Dataset) and obj.chunks else None)
        return sorted(spans)

    def outside(spans) -> bytes:
        data, kept, at = partial_path(writer.path).read_bytes(), [], 0
        for offset, size in spans:
            kept.append(data[at:offset])
            at = offset + size
        return b"".join(kept) + data[at:]

    before, meta = chunks(), outside(chunks())
    writer.write(0, [X[:6]], [f"x/{i}.jpg" for i in range(6)], [0] * 6, ["train"] * 6, [0] * 6, [(i, 7) for i in range(6)])
    writer.write(6, [X[6:9]], [f"x/{i}.jpg" for i in range(6, 9)], [0] * 3, ["val"] * 3, [0] * 3, [(-1, -1)] * 3)
    assert chunks() == before and outside(before) == meta
    writer.close()
    assert not (tmp_path / "c.h5").exists()  # unpublished until finalize
    assert read_attrs(partial_path(tmp_path / "c.h5")).complete is False


def test_extract_refuses_a_file_that_is_not_its_cache_even_with_overwrite(class_folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("notes\n")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    for target, why in [(notes, "not an HDF5 file"), (other, "without the schema_version")]:
        for overwrite in (False, True):
            cfg = ExtractConfig(data=str(class_folder), out=str(target), overwrite=overwrite, **VGG)
            with pytest.raises(UsageError, match=f"{target} exists and is not a feature cache.*{why}"):
                extract(cfg, verbose=False)
    assert notes.read_text() == "notes\n"
    with h5py.File(other) as f:
        assert f["x"][()].tolist() == [0, 1, 2]


def test_interrupted_extraction_resumes_only_with_its_batch_size(class_folder, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    cfg = ExtractConfig(data=str(class_folder), out=str(out), **VGG)

    def killed(self, progress):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(CacheWriter, "finalize", killed)
        with pytest.raises(KeyboardInterrupt):
            extract(cfg, verbose=False)
    assert not out.exists() and partial_path(out).exists() and Progress.load(out).rows_written == 20
    with pytest.raises(UsageError, match="half written with batch size 4; resume it with --batch-size 4"):
        extract(cfg.replace(batch_size=8), verbose=False)
    result = extract(cfg, verbose=False)
    assert result.status == "resumed" and result.images == 20 and result.processed == 0
    assert not partial_path(out).exists() and not progress_path(out).exists()
    assert verify(out).damage == [] and len(open_cache(out).paths) == 20


def test_merge_reads_and_publishes_through_the_store_and_refuses_foreign_outputs(tmp_path):
    X, y = separable(6, 2, 5)
    for i, rows in enumerate([slice(0, 7), slice(7, 12)]):
        write_cache(tmp_path / f"x.shard{i}-of-2.h5", {"vec": X[rows]}, y[rows], shard=f"{i}/2",
                    num_candidates=len(y[rows]))
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="precious.txt exists and is not a feature cache"):
            merge(tmp_path / "x.h5", precious, overwrite=overwrite)
    assert precious.read_text() == "keep me"
    merged = open_cache(merge(tmp_path / "x.h5").path)
    assert np.array_equal(merged.read("vec"), X) and merged.labels.tolist() == y.tolist()
    assert not partial_path(tmp_path / "x.h5").exists()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    path = tmp_path / "c.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from features.lock import exclusive\n"
         "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        X, y = separable(3, 2, 4)
        with pytest.raises(UsageError, match=rf"{path} is being written by another run \(pid {holder.pid} on "):
            write_cache(path, {"vec": X}, y)
        for i in range(2):  # the CLI: one line, non-zero exit
            write_cache(tmp_path / f"c.shard{i}-of-2.h5", {"vec": X}, y, shard=f"{i}/2", num_candidates=6)
        code, line = _one_line(capsys, "merge", "--shards-of", str(path))
        assert code == 2 and f"pid {holder.pid}" in line and "since" in line
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert holder_path(path).exists()  # a killed holder leaves its note; the kernel released its lock
    write_cache(path, {"vec": X}, y)
    assert open_cache(path).labels.tolist() == y.tolist() and not holder_path(path).exists()


@pytest.mark.parametrize("damage", ["random", "zeros"])
def test_damaged_rows_are_named_by_verify_and_refused_by_classify(tmp_path, capsys, damage):
    X, y = _maps()
    path = write_cache(tmp_path / "c.h5", {"map": X}, y)
    row_bytes = X[0].nbytes
    data = np.random.default_rng(1).bytes(row_bytes) if damage == "random" else bytes(row_bytes)
    _overwrite_rows(path, "map", 9, data)  # row 9: in the chunk of rows 8-11
    assert verify(path).damage[0].line() == "features/map: rows 8-11 fail their checksum"
    verified = run_cli("verify", str(path))
    assert verified.returncode == 1 and "damaged" in verified.stdout and "rows 8-11" in verified.stdout
    assert "--overwrite" in verified.stdout
    code, line = _one_line(capsys, "classify", "--features", str(path), "--heads", "ridge", "--reduce", "avg",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "fail their checksum" in line and "rows 8-11" in line and "--overwrite" in line


def test_nan_and_inf_rows_are_named(tmp_path, capsys):
    X, y = _maps()
    X[5, 0, 0, 0], X[30, 1, 2, 3] = np.nan, -np.inf
    path = write_cache(tmp_path / "c.h5", {"map": X}, y)
    assert verify(path).damage[0].line() == "features/map: rows 5, 30 hold NaN or inf"
    code, line = _one_line(capsys, "classify", "--features", str(path), "--heads", "ridge", "--reduce", "avg",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "NaN or inf in rows 5" in line
    ok = write_cache(tmp_path / "ok.h5", {"map": np.nan_to_num(X)}, y)
    assert run_cli("verify", str(ok)).stdout.startswith(f"ok: {ok}: 40 rows")
