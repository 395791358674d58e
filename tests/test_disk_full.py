"""A full disk or a file-size limit while a cache is written (issue 23, item 6): one line naming the file and the fix,
never a traceback or a crash, nothing published, and the rerun resumes to the contents of an uninterrupted run.

A full disk is simulated with a file-size limit (RLIMIT_FSIZE, `ulimit -f`) on the extraction's process, with SIGXFSZ
ignored, so that a write past the limit fails with EFBIG as one past a full disk fails with ENOSPC.
"""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.store import Progress, partial_path, progress_path
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from tests.conftest import ROOT, write_images

IMAGES = 96  # 12 batches of 8; a row of top_conv at 64 px is 32 KiB (16 x 16 x 32 float32), 32 rows a chunk
LZF_LIMIT = 1_500_000  # bytes: room for the first batches of the lzf cache (2.4 MiB when complete), not for all


def config(case: tuple[Path, Path], out: Path, compression: str) -> ExtractConfig:
    data, backbone = case
    return ExtractConfig(backbone=str(backbone), data=str(data), out=str(out), layer=["top_conv"], image_size=64,
                         batch_size=8, workers=1, engine="tf", compression=compression)


def cli_args(cfg: ExtractConfig) -> list[str]:
    return ["extract", "--backbone", cfg.backbone, "--data", cfg.data, "--out", cfg.out, "--layer", "top_conv",
            "--image-size", "64", "--batch-size", "8", "--workers", "1", "--engine", "tf",
            "--compression", cfg.compression]


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_backbone) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("disk-full")
    for k, name in enumerate(["a", "b"]):
        write_images(root / "data" / name, IMAGES // 2, seed=30 + k)
    return root / "data", tiny_backbone


@pytest.fixture(scope="module")
def fresh(case, tmp_path_factory) -> dict[str, Path]:
    """The uncompressed and the lzf cache of `case`, written without any limit."""
    root = tmp_path_factory.mktemp("fresh")
    return {c: extract(config(case, root / f"{c}.h5", c), verbose=False).path for c in ("none", "lzf")}


def run_limited(args: list[str], limit: int, hard_limit: bool = True, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m pipeline <args>` (after `prelude`) in a process whose files may not grow past `limit` bytes."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed, as ENOSPC on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit if hard_limit else resource.RLIM_INFINITY))

    code = prelude + "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300, preexec_fn=limit_files)


def one_error_line(proc: subprocess.CompletedProcess, out: Path) -> str:
    """The failed run's single error line, after checking the rest of its stderr and that nothing was published."""
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    for crash in ("Traceback", "Exception ignored", "Segmentation fault", "core dumped", "RuntimeError"):
        assert crash not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert str(partial_path(out)) in errors[0] and "rerun the same command" in errors[0], errors[0]
    assert not out.exists()  # never a file at the target that looks complete
    return errors[0]


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in ["paths", "labels", "split", "view", "file_stamp", "label_names",
                                              "skipped"]}
        out.update({f"features/{k}": v[()] for k, v in f["features"].items()})
        out["complete"] = f.attrs["complete"]
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = read(a), read(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert np.array_equal(ra[key], rb[key]), key


@pytest.mark.parametrize("compression", ["lzf", "none"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes_to_an_uninterrupted_cache(case, fresh, tmp_path, compression):
    """lzf: the file grows with every batch and the limit is reached mid-run. none: every chunk is allocated when the
    file is created, so batches never grow it; a limit one byte below the complete file is reached at the end
    (skipped files, attributes). Either way the partial file keeps every batch its progress record claims."""
    out = tmp_path / "c.h5"
    cfg = config(case, out, compression)
    limit = LZF_LIMIT if compression == "lzf" else fresh["none"].stat().st_size - 1
    line = one_error_line(run_limited(cli_args(cfg), limit), out)
    assert "the disk is full or a file-size limit was reached" in line, line
    resume_at = int(re.search(r"it resumes from row (\d+)\.$", line).group(1))
    assert json.loads(progress_path(out).read_text())["rows_written"] == resume_at
    assert 0 < resume_at < IMAGES if compression == "lzf" else resume_at == IMAGES

    rerun = extract(cfg, verbose=False)  # the same command without the limit
    assert rerun.status == "resumed" and rerun.processed == IMAGES - resume_at < IMAGES
    assert_same_cache(out, fresh[compression])
    assert not partial_path(out).exists() and not progress_path(out).exists()


@pytest.mark.slow
def test_a_write_that_fails_inside_hdf5_stops_cleanly_and_the_rerun_finishes(case, fresh, tmp_path):
    """Without the check before each batch (as when another writer fills the disk meanwhile) the write fails inside
    HDF5, which may tear the chunk it was rewriting: still one line and no crash; the rerun resumes when the rows
    read back, else it was told the half-written file is gone and starts afresh; either way it ends as an
    uninterrupted run. (A soft limit: the abandoned file's close writes into memory past it.)"""
    out = tmp_path / "c.h5"
    cfg = config(case, out, "lzf")
    prelude = "from features.store import CacheWriter; CacheWriter._check_room = lambda *args: None; "
    line = one_error_line(run_limited(cli_args(cfg), LZF_LIMIT, hard_limit=False, prelude=prelude), out)
    assert "(File too large)" in line, line
    resumes = re.search(r"it resumes from row (\d+)\.$", line)
    if not resumes:
        assert "starts from the beginning" in line and not partial_path(out).exists(), line
    rerun = extract(cfg, verbose=False)
    assert (rerun.status, rerun.processed) == (("resumed", IMAGES - int(resumes.group(1))) if resumes else
                                               ("written", IMAGES))
    assert_same_cache(out, fresh["lzf"])


def test_a_progress_record_that_cannot_be_written_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    Progress(rows_written=16, files_done=17).save(out)

    def full(self, *args, **kwargs):
        Path.open(self, "w").close()  # the temporary file was created, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(Exception) as caught:
        Progress(rows_written=24, files_done=25).save(out)
    assert type(caught.value).__name__ == "WriteFailed"
    assert str(caught.value) == (
        f"the disk is full or a file-size limit was reached (No space left on device) while writing the progress "
        f"record {progress_path(out)}: free space (or raise the limit: ulimit -f) and rerun the same command; it "
        "resumes from row 16.")
    monkeypatch.undo()
    assert Progress.load(out) == Progress(rows_written=16, files_done=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == [progress_path(out).name]  # no temporary file left


def test_hdf5_errors_of_a_full_disk_raised_elsewhere_are_one_line():
    from pipeline.cli import one_line

    err = ValueError("Unable to synchronously create dataset (file write failed: time = Mon Dec 7 03:39:01 2026 , "
                     "filename = '/data/.c.h5.partial', file descriptor = 4, errno = 28, error message = 'No space "
                     "left on device', buf = 0x55, total write size = 594668, offset = 2564096)")
    assert one_line(err) == ("the disk is full or a file-size limit was reached (No space left on device) while "
                             "writing '/data/.c.h5.partial': free space (or raise the limit: ulimit -f) and rerun the "
                             "same command.", 2)


def test_a_cache_too_large_for_the_disk_is_refused_before_hdf5_creates_it(tmp_path):
    """An uncompressed cache allocates every chunk when it is created: with too little room that would fail inside
    HDF5 (tracebacks from finalizers); it is one line, and nothing is left behind."""
    script = (
        "import signal, resource, numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "from classifiers.testing import write_cache\n"
        "from features.errors import UsageError\n"
        "try:\n"
        f"    write_cache({str(tmp_path / 'big.h5')!r}, {{'x': np.ones((64, 256, 256), np.float32)}}, [0, 1] * 32)\n"
        "except UsageError as err:\n"
        "    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert re.search(r"refused: the disk is full or a file-size limit was reached \(the file-size limit is 1048576 "
                     r"bytes; .*\) while writing .*\.big\.h5\.partial: free space", done.stdout), done.stdout
    assert not partial_path(tmp_path / "big.h5").exists() and not (tmp_path / "big.h5").exists()
