"""Odd entries a DATA folder can hold: named pipes, sockets, devices, links to nowhere, unreadable files and folders,
names that are not UTF-8, decompression bombs. Each is skipped and listed with a reason; none stops or blocks a run."""
from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.catalog import discover
from features.errors import UsageError
from features.images import decode_rgb, decode_stream, jpeg_size, load_image
from pipeline.config import ExtractConfig
from pipeline.extract_cmd import add_arguments, config_from_args
from pipeline.extraction import extract
from tests.conftest import ODD_INPUTS, ROOT, fails_in_one_line, write_images

BOMB_SIDE = 30_000  # 900 MP: decoded as BGR, 2.7 GB


def png_of_zeros(path: Path, side: int, rows: int = 100) -> Path:
    """A valid 8-bit grayscale PNG of side x side zeros: ~0.9 MB on disk for side 30000. Built in a fraction of a
    second from one deflate block of `rows` scanlines repeated (a full flush makes each block independent), with the
    Adler-32 of n zero bytes, ((n mod 65521) << 16) | 1, computed rather than summed."""
    block = bytes((side + 1) * rows)  # a scanline: filter byte 0, then `side` zeros
    z = zlib.compressobj(9)
    head = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)  # zlib header + the first block
    unit = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    end = z.flush()[:-4]  # the final (empty) block, without the checksum of two blocks only
    n = (side + 1) * side
    idat = head + unit * (side // rows - 1) + end + struct.pack(">I", ((n % 65521) << 16) | 1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def deny_scandir(monkeypatch, folder: Path) -> None:
    """`folder` cannot be listed, as after chmod 000 for a user who is not root (tests run as root here)."""
    real = os.scandir

    def scandir(path=".", *args):
        if Path(os.fsdecode(path)) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)


def odd_folder(root: Path) -> Path:
    """DATA/<class>/ with 3 + 2 good images, and one entry of every odd kind next to them."""
    data = root / "data"
    write_images(data / "ants", 3, seed=0)
    write_images(data / "bees", 2, seed=1)
    os.mkfifo(data / "ants" / "pipe.jpg")
    (data / "ants" / "gone.jpg").symlink_to("removed.jpg")
    (data / "ants" / "loop.jpg").symlink_to("loop.jpg")
    (data / "bees" / "null.png").symlink_to(os.devnull)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(data / "bees" / "sock.jpg"))
    os.link(os.fsencode(data / "ants" / "img_001.jpg"), os.fsencode(data / "ants") + b"/caf\xe9.jpg")  # Latin-1
    png_of_zeros(data / "bees" / "bomb.png", BOMB_SIDE)
    return data


ODD_REASONS = {"ants/pipe.jpg": "a named pipe (FIFO), not a regular file; skipped without opening it",
               "ants/gone.jpg": "a link to 'removed.jpg', which does not exist",
               "ants/loop.jpg": "cannot be read (Too many levels of symbolic links)",
               "bees/null.png": "a character device, not a regular file; skipped without opening it",
               "bees/sock.jpg": "a socket, not a regular file; skipped without opening it",
               "ants/caf\\xe9.jpg": "its name is not valid UTF-8"}


def test_odd_entries_are_listed_with_a_reason_and_never_offered_for_decoding(tmp_path):
    cat = discover(odd_folder(tmp_path))
    assert cat.paths == ["ants/img_000.png", "ants/img_001.jpg", "ants/img_002.jpg", "bees/bomb.png",
                         "bees/img_000.png", "bees/img_001.jpg"]  # the bomb is a regular file: its decode refuses it
    reasons = dict(cat.ignored)
    assert set(reasons) == set(ODD_REASONS)
    for rel, reason in ODD_REASONS.items():
        assert reasons[rel].startswith(reason), (rel, reasons[rel])
    assert "Rename it" in reasons["ants/caf\\xe9.jpg"] and "Fix or remove the link" in reasons["ants/gone.jpg"]
    assert len(cat.fingerprint()) == 64  # every candidate can be stat'ed: the fingerprint no longer aborts


def test_a_named_pipe_is_refused_at_once_by_the_decoder_too(tmp_path):
    """`discover` never offers a pipe; a caller that hands one to the decoder directly gets a reason, not a hang
    (SIGTERM and SIGINT cannot stop a thread blocked in open())."""
    pipe = tmp_path / "x.jpg"
    os.mkfifo(pipe)
    outcome: list[BaseException] = []

    def decode() -> None:
        try:
            decode_rgb(pipe)
        except (ValueError, OSError) as err:
            outcome.append(err)

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(timeout=5)
    hung = worker.is_alive()
    if hung:  # the old decoder: a writer that closes at once lets its open() return, so the test ends
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        worker.join()
    assert not hung, "decoding a named pipe blocked"
    assert len(outcome) == 1 and "not a regular file" in str(outcome[0])


def test_an_unreadable_class_folder_is_listed_not_silently_left_out(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_images(data / "ants", 2, seed=0)
    write_images(data / "bees", 2, seed=1)
    deny_scandir(monkeypatch, data / "bees")
    cat = discover(data)
    assert cat.paths == ["ants/img_000.png", "ants/img_001.jpg"] and cat.label_names == ["ants"]
    reason = dict(cat.ignored)["bees/"]
    assert reason.startswith("a folder that cannot be read (Permission denied)") and "chmod a+rx" in reason


def test_an_unreadable_data_folder_is_one_clear_error(tmp_path, monkeypatch):
    write_images(tmp_path / "data" / "ants", 2, seed=0)
    deny_scandir(monkeypatch, tmp_path / "data")
    with pytest.raises(UsageError, match=r"DATA folder '.*data' cannot be read \(Permission denied\).*chmod a\+rx"):
        discover(tmp_path / "data")


@pytest.mark.parametrize("how", ["chmod", "os.open"])
def test_an_unreadable_file_is_skipped_naming_the_fix(tmp_path, monkeypatch, how):
    good, denied = write_images(tmp_path, 2, seed=0)
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root reads a file whatever its mode; the os.open case denies it instead")
        denied.chmod(0)
    else:
        real = os.open

        def open_(path, flags, *args, **kwargs):
            if Path(os.fsdecode(path)) == denied:
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    out = list(decode_stream([(0, good), (1, denied)], lambda p: load_image(p, 32, "crop"), workers=2, lookahead=2))
    assert out[0].pixels is not None and out[1].pixels is None
    assert out[1].reason == "cannot be read (permission denied). Fix its permissions (e.g. chmod a+r) to include it."


def test_names_that_are_not_utf8_are_listed_escaped_and_nothing_else_carries_them(tmp_path):
    data = tmp_path / "data"
    write_images(data / "ants", 1, seed=0)
    image = (data / "ants" / "img_000.png").read_bytes()
    bad_dir = Path(os.fsdecode(os.fsencode(data) + b"/b\xe9es"))  # Python keeps the byte 0xe9 as a surrogate
    bad_dir.mkdir()
    (bad_dir / "img.png").write_bytes(image)
    (data / "ants" / os.fsdecode(b"\xff.txt")).write_text("x")  # a non-image with a bad name: the same reason
    (data / "ants" / os.fsdecode(b"n\xe4me.png")).write_bytes(image)
    cat = discover(data)
    assert cat.paths == ["ants/img_000.png"]
    assert [rel for rel, _ in cat.ignored] == ["ants/\\xff.txt", "ants/n\\xe4me.png", "b\\xe9es/"]
    assert all("not valid UTF-8" in reason for _, reason in cat.ignored)
    for text in [*cat.paths, *cat.label_names, *(s for item in cat.ignored for s in item)]:
        text.encode("utf-8")  # what the HDF5 writer and the progress JSON require: no surrogates


def test_a_data_folder_whose_name_is_not_utf8_is_refused(tmp_path):
    write_images(tmp_path / "ants", 1, seed=0)
    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    data.mkdir()
    (tmp_path / "ants").rename(data / "ants")
    with pytest.raises(UsageError, match=r"caf\\xe9' has a name that is not valid UTF-8.*rename the folder"):
        discover(data)


def test_a_decompression_bomb_is_refused_from_its_header_in_little_memory(tmp_path):
    """A 0.9 MB PNG of 30000x30000 zeros decoded to 2.7 GB of pixels (5.7-7 GB peak). Peak memory of a fresh process
    that loads it as `extract` does, measured by the process itself: its VmHWM, which starts anew at exec (ru_maxrss
    would keep the forking pytest worker's peak, 2.2 GiB after a heavy test)."""
    bomb = png_of_zeros(tmp_path / "bomb.png", BOMB_SIDE)
    assert bomb.stat().st_size < 2**20
    probe = ("import re, sys\n"
             "from features.images import load_image\n"
             "try:\n"
             "    load_image(sys.argv[1], 224, 'crop')\n"
             "    print('decoded')\n"
             "except ValueError as err:\n"
             "    print(err)\n"
             "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])\n")
    done = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    reason, peak_kib = done.stdout.splitlines()
    assert reason.startswith("30000x30000 is 900,000,000 pixels, more than --max-pixels 89478485")
    assert "Raise MAX_PIXELS (--max-pixels)" in reason
    assert int(peak_kib) < 2 * 2**20, f"peak RSS {int(peak_kib) / 2**20:.1f} GiB"


def test_the_bomb_file_is_a_real_image(tmp_path):
    """The same construction, small enough to decode: a valid PNG of zeros, so the refusal above is for its size."""
    img = decode_rgb(png_of_zeros(tmp_path / "small.png", 600))
    assert img.shape == (600, 600, 3) and not img.any()


def test_a_jpeg_with_stray_bytes_before_a_marker_is_sized_as_libjpeg_reads_it(tmp_path):
    """libjpeg skips stray bytes between markers (with a warning) and decodes; the header reader must find the frame
    size there too, or the pixel limit would refuse a file that decodes fine."""
    data = (ODD_INPUTS / "good" / "progressive.jpg").read_bytes()
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    path = tmp_path / "stray.jpg"
    path.write_bytes(data[:after_app0] + b"\x00\x11stray" + data[after_app0:])
    assert jpeg_size(np.fromfile(path, np.uint8)) == (291, 500)
    assert decode_rgb(path).shape == (291, 500, 3)


def test_extract_lists_every_odd_entry_and_goes_on(tmp_path, monkeypatch):
    """Before: the link to nowhere aborted the run (FileNotFoundError, naming no entry); the pipe blocked it for ever;
    the Latin-1 name raised UnicodeEncodeError in the HDF5 writer; the bomb took gigabytes; the unreadable folder
    vanished without a word."""
    data = odd_folder(tmp_path)
    write_images(data / "wasps", 1, seed=2)
    deny_scandir(monkeypatch, data / "wasps")
    cfg = ExtractConfig(data=str(data), backbone="vgg19", weights="none", image_size=32, batch_size=4,
                        layer=["block1_pool"], pool="avg", engine="tf", out=str(tmp_path / "c.h5"))
    res = extract(cfg, verbose=False)
    with h5py.File(res.path) as f:
        skipped = {p.decode(): r.decode() for p, r in f["skipped"][()]}
        assert f.attrs["num_images"] == 5 and list(f["paths"].asstr()[()]) == [
            "ants/img_000.png", "ants/img_001.jpg", "ants/img_002.jpg", "bees/img_000.png", "bees/img_001.jpg"]
    assert set(skipped) == set(ODD_REASONS) | {"bees/bomb.png", "wasps/"}
    assert "more than --max-pixels" in skipped["bees/bomb.png"] and "cannot be read" in skipped["wasps/"]


def test_max_pixels_is_a_flag_a_make_variable_and_checked(tmp_path, class_folder, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--max-pixels", "250000000"]))
    flags = cfg.flags()
    assert cfg.max_pixels == 250_000_000 and flags[flags.index("--max-pixels") + 1] == "250000000"  # batch jobs
    assert ExtractConfig().max_pixels == 89_478_485
    make = subprocess.run(["make", "-n", "-s", "extract", "STAMP=", "PY=python", "MAX_PIXELS=250000000"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "--max-pixels '250000000'" in make.stdout
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--out", str(tmp_path / "o.h5"),
                                      "--max-pixels", "0"])
    assert "max-pixels 0 is not valid" in line and "89478485" in line
