"""WebDataset tar shards as DATA: find the shards, index each one once, and read its images in place.

A shard is an uncompressed `.tar` whose members are grouped into samples by key, as WebDataset, img2dataset and
clip-retrieval write them: `dir/000123.jpg` and `dir/000123.cls` belong to the sample `dir/000123` (the key is the
member name up to the first dot of its base name; the rest is the member's extension). A sample's image is its one
member whose extension is an image type (`jpg`, `jpeg`, `png`, `webp`, ...); its label, when no labels CSV is given,
is its `cls` member, else the `label` field of its `json`, else its `txt` (only in a sample without a `json`:
img2dataset writes a caption there, and metadata in the `json`).

Why an index and `os.pread`: `scan` reads every header of a shard once, in one pass over one open file, and keeps
per image the shard, the offset of its data and its size (`Member`). A decoder thread then reads an image with one
`pread` at that offset on a descriptor shared by all threads (pread has no file position, so it needs no lock), and
no shard is reopened or searched per image. Compressed tars (`.tar.gz`) cannot be read at an offset: they are
listed, not read.

A row of the cache is named `<shard>/<image member>`, relative to DATA (e.g. `train-000001.tar/000123.jpg`), and is
stamped with its shard's (size, mtime_ns): an update recomputes exactly the samples of added or changed shards.

>>> expand_braces("shards/train-{000..002}.tar")
['shards/train-000.tar', 'shards/train-001.tar', 'shards/train-002.tar']
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import operator
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import UsageError
from features.files import replace_atomically
from features.images import IMAGE_EXTENSIONS, INSIDE_FILES

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
IMAGE_TYPES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
CLASSES_FILE = "classes.txt"  # optional, beside the shards: the class names, one a line, index = line number
MAX_LABEL_BYTES = 1 << 16  # a label member larger than this is no label
MAX_RANGE = 1_000_000  # names one brace range may expand to
OPEN_SHARDS = 64  # descriptors kept open at most (shards are read in order, so few are in use at a time)
GLOB_CHARS = re.compile(r"[*?\[]")
BRACE_GROUP = re.compile(r"\{([^{}]*)\}")  # innermost groups first
INTEGER = re.compile(r"[+-]?\d+")
HAVE_PREADV = hasattr(os, "preadv")  # reads straight into the array (Linux, BSD, macOS 11+)


# ---------------------------------------------------------------------------------------------- shard patterns


def _alternatives(body: str) -> list[str] | None:
    """The names a brace group stands for: `a,b,c`, or a range `000..099` / `a..e` (zero-padded like bash when an
    end has a leading zero); None for a literal group such as `{key}`."""
    ends = body.split("..")
    if len(ends) == 2 and all(INTEGER.fullmatch(e) for e in ends):
        lo, hi = int(ends[0]), int(ends[1])
        if abs(hi - lo) >= MAX_RANGE:
            raise UsageError(f"brace range '{{{body}}}' names {abs(hi - lo) + 1:,} shards, more than {MAX_RANGE:,}. "
                             "Expected a range of shard numbers such as {000000..000099}.")
        padded = any(len(e.lstrip("+-")) > 1 and e.lstrip("+-").startswith("0") for e in ends)
        width = max(len(e) for e in ends) if padded else 0
        step = 1 if hi >= lo else -1
        return [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    if len(ends) == 2 and all(len(e) == 1 and e.isalpha() for e in ends):
        step = 1 if ends[1] >= ends[0] else -1
        return [chr(c) for c in range(ord(ends[0]), ord(ends[1]) + step, step)]
    if "," in body:
        return body.split(",")
    return None


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, as bash, WebDataset and img2dataset expand it: `{a,b}`,
    `{000000..000099}`, several groups and nested ones; duplicates once. Globs are left for `glob`."""
    for group in BRACE_GROUP.finditer(pattern):
        alternatives = _alternatives(group.group(1))
        if alternatives is None:
            continue
        head, tail = pattern[:group.start()], pattern[group.end():]
        return list(dict.fromkeys(name for alt in alternatives for name in expand_braces(head + alt + tail)))
    return [pattern]


def is_pattern(data: str) -> bool:
    """Whether DATA is a glob (`*`, `?`, `[...]`) or brace pattern rather than a path (a path that exists is always
    taken as a path, so a folder named `[2020] photos` still works)."""
    return bool(GLOB_CHARS.search(data)) or expand_braces(data) != [data]


def pattern_root(data: str) -> Path:
    """The folder a pattern's matches are named relative to: its part before the first glob or brace character."""
    first = min((i for i, c in enumerate(data) if c in "*?[{"), default=len(data))
    head = data[:first].rpartition("/")[0] if "/" in data[:first] else ""
    return Path(head or ("/" if data.startswith("/") else "."))


def match_pattern(data: str) -> tuple[Path, list[Path], list[str]]:
    """(root, the entries the pattern matches, sorted; names the braces spell out that do not exist)."""
    root = pattern_root(data)
    found: set[str] = set()
    missing: list[str] = []
    for name in expand_braces(data):
        if GLOB_CHARS.search(name):
            found.update(glob.glob(name, recursive=True))
        elif os.path.lexists(name):
            found.add(name)
        else:
            missing.append(name)
    return root, sorted(Path(p) for p in found), missing


def is_compressed(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_SUFFIXES)


COMPRESSED = ("a compressed tar: its members cannot be read in place; skipped. Decompress it to a .tar "
              "(e.g. `gunzip x.tar.gz`) to include it.")


# ---------------------------------------------------------------------------------------------- reading in place


class Shard:
    """One tar file as indexed: its path and (size, mtime_ns). Any thread reads it with `read`, through a descriptor
    opened on first use and shared (see `_Descriptors`)."""

    __slots__ = ("path", "name", "stamp", "_identity", "__weakref__")

    def __init__(self, path: Path, name: str, st: os.stat_result):
        self.path, self.name = path, name  # name: as listed, relative to DATA
        self.stamp = (st.st_size, st.st_mtime_ns)
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r})"

    def open(self) -> int:
        """A descriptor of the very file that was indexed; ValueError when it was replaced or changed since."""
        fd = os.open(self.path, os.O_RDONLY)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            os.close(fd)
            raise ValueError(f"its tar shard '{self.name}' changed since DATA was indexed (size or modification time); "
                             "not read. Rerun the command to index the shard again.")
        return fd

    def read(self, offset: int, size: int) -> np.ndarray:
        """`size` bytes at `offset`, as a writable uint8 array, read with pread into the array itself."""
        buf = np.empty(size, np.uint8)
        fd = _DESCRIPTORS.acquire(self)
        try:
            done = 0
            while done < size:
                if HAVE_PREADV:
                    n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
                else:  # platforms without preadv: one more copy
                    chunk = os.pread(fd, size - done, offset + done)
                    n = len(chunk)
                    buf[done : done + n] = np.frombuffer(chunk, np.uint8)
                if n == 0:
                    raise ValueError(f"its tar shard '{self.name}' ends before this member's data (truncated since it "
                                     "was indexed); not read. Rerun the command to index the shard again.")
                done += n
        finally:
            _DESCRIPTORS.release(self)
        return buf


class _Descriptors:
    """Open descriptors of shards, shared by all threads: opened once per shard, at most `limit` kept open (the least
    recently used one that no thread is reading is closed first)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[Shard, list[int]] = OrderedDict()  # shard -> [fd, readers]

    def acquire(self, shard: Shard) -> int:
        with self._lock:
            entry = self._open.get(shard)
            if entry is None:
                entry = self._open[shard] = [shard.open(), 0]
            self._open.move_to_end(shard)
            entry[1] += 1
            self._trim()
            return entry[0]

    def release(self, shard: Shard) -> None:
        with self._lock:
            self._open[shard][1] -= 1
            self._trim()

    def _trim(self) -> None:
        idle = [s for s, (_, readers) in self._open.items() if not readers]  # least recently used first
        for shard in idle[: max(0, len(self._open) - self.limit)]:
            os.close(self._open.pop(shard)[0])

    def close_all(self) -> None:
        """Close every descriptor no thread is reading."""
        with self._lock:
            for shard in [s for s, (_, readers) in self._open.items() if not readers]:
                os.close(self._open.pop(shard)[0])


_DESCRIPTORS = _Descriptors(OPEN_SHARDS)


def close_all() -> None:
    """Close the shards' descriptors that no thread is reading (they are otherwise kept for the next read)."""
    _DESCRIPTORS.close_all()


_INDEXED: dict[Path, tuple[tuple[int, int, int, int], dict[str, "Member"]]] = {}  # see member_at
_INDEXED_LOCK = threading.Lock()


def member_at(path: Path) -> Member | None:
    """The image that `path` names through a shard (`DATA/<shard>.tar/<member>`, a row path under its data root), for
    readers that have only the path, such as fine-tuning: each shard is indexed once per process, and again when it
    has changed. None when no tar file lies on the path; ValueError when the shard holds no such image."""
    shard = next((p for p in path.parents if p.name.lower().endswith(SHARD_SUFFIX) and p.is_file()), None)
    if shard is None:
        return None
    st = shard.stat()
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _INDEXED_LOCK:
        known = _INDEXED.get(shard)
        if known is None or known[0] != identity:
            try:
                index = scan(shard.parent, shard.name, read_labels=False)
            except UsageError as err:  # a reader skips the image with the reason, as for any unreadable file
                raise ValueError(str(err)) from None
            known = _INDEXED[shard] = (identity, {s.path.split("/", 1)[1]: s.member for s in index.samples})
    member = known[1].get(path.relative_to(shard).as_posix())
    if member is None:
        raise ValueError(f"no image '{path.relative_to(shard).as_posix()}' in the tar shard '{shard}'")
    return member


INSIDE_FILES.append(member_at)  # features.images.read_file reads `DATA/<shard>.tar/<member>` paths


@dataclass(frozen=True, slots=True)
class Member:
    """Where one image lies: its shard, the offset of its data and its size. `features.images.read_file` reads any
    object with a `read()` method this way, so a loader takes a Member wherever it takes a file path."""

    shard: Shard
    offset: int
    size: int

    def read(self) -> np.ndarray:
        return self.shard.read(self.offset, self.size)


# ---------------------------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class Sample:
    """One usable sample of a shard: its row path (`<shard>/<image member>`), where its image is, and its label as
    written (None: no label member) with the member it came from."""

    path: str
    key: str  # the WebDataset key inside its shard, e.g. 'dir/000123'
    member: Member
    label: str | None = None
    label_from: str = ""  # '<shard>/<member>' the label was read from


@dataclass
class ShardIndex:
    shard: Shard
    samples: list[Sample]
    ignored: list[tuple[str, str]]  # (name under DATA, reason)


def _shown(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _unreadable(name: str, what: str) -> UsageError:
    return UsageError(f"tar shard '{name}' cannot be read: {what}. Expected a complete, uncompressed tar archive; "
                      "re-create it, or leave it out of DATA (move it away or narrow the pattern).")


def _member_problem(name: str, info: tarfile.TarInfo) -> str:
    if _shown(name) != name:
        return ("its name is not valid UTF-8 (listed with the bytes escaped), and the cache stores names as UTF-8; "
                "skipped. Re-create the shard with UTF-8 member names.")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "" in parts:
        return "a member name that is absolute, empty or leaves the archive ('..'); skipped"
    if not info.isfile():
        kind = "a link" if info.issym() or info.islnk() else "a special entry (device, pipe)"
        return f"{kind} inside the tar, not a file; skipped"
    return ""


class _Unusual(Exception):
    """A header `_headers` leaves to `tarfile`: anything but plain ASCII ustar, GNU long-name and pax headers."""


BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
NUMBERS = (slice(100, 108), slice(108, 116), slice(116, 124), slice(136, 148), slice(329, 337), slice(337, 345))
PAX_RECORD = re.compile(rb"(\d+) ([^=\n]+)=")
PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE))


def _text(field: bytes) -> str:
    """tarfile's `nts` for ASCII: up to the first NUL; non-ASCII is `tarfile`'s to decode."""
    text = field.split(b"\0", 1)[0]
    if not text.isascii():
        raise _Unusual
    return text.decode("ascii")


def _number(field: bytes) -> int:
    """tarfile's `nti` for octal fields (base-256 ones, for files over 8 GiB, are `tarfile`'s)."""
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Unusual from None


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The records of an extended header (`path` and `linkpath` are the ones a sample needs); anything `tarfile`
    would parse otherwise (sparse files, a size: members over 8 GiB, non-ASCII text, a record it would stop at) is
    `_Unusual`."""
    found, pos = {}, 0
    while pos < len(data):
        match = PAX_RECORD.match(data, pos)
        if not match or not data.isascii():
            raise _Unusual
        length, key = int(match.group(1)), match.group(2)
        end = match.start(1) + length
        if length == 0 or data[end - 1:end] != b"\n" or key.startswith(b"GNU.sparse") or key == b"size":
            raise _Unusual
        found[key] = data[match.end():end - 1]
        pos = end
    return found


def _headers(fd: int) -> tuple[list[tarfile.TarInfo], int]:
    """The members of a tar, as `list(tarfile.open(...))` gives them (name, type, size, offset_data, linkname), and
    the offset it stopped at, with one `pread` per header: indexing 30,000 samples in 3 shards took 1.2-1.7 s instead
    of `tarfile`'s 2.8-3.1 s (3 interleaved rounds), which was ~12-20% of their whole extraction at 32 px and what
    every update pays again. Raises `_Unusual` wherever `tarfile` must decide (`scan` then indexes the shard with
    it)."""
    infos, offset, extra, size = [], 0, {}, os.fstat(fd).st_size
    while True:
        buf = os.pread(fd, BLOCK, offset)
        if len(buf) < BLOCK or buf == ZERO_BLOCK:  # the end (tarfile stops here too; `scan` checks what follows)
            if offset == 0 or offset > size or extra:  # nothing, a last member cut short, a header without member
                raise _Unusual
            return infos, offset
        if _number(buf[148:156]) != 256 + sum(buf) - sum(buf[148:156]):  # the unsigned checksum, field as spaces
            raise _Unusual
        for field in NUMBERS:  # tarfile refuses a header whose numbers do not parse, so must this reader
            _number(buf[field])
        kind, length, data = buf[156:157], _number(buf[124:136]), offset + BLOCK
        offset = data + -(-length // BLOCK) * BLOCK
        if kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if extra.get(kind) is not None or length > MAX_LABEL_BYTES:
                raise _Unusual
            body = os.pread(fd, length, data)
            extra[kind] = _pax(body) if kind == tarfile.XHDTYPE else _text(body)
            continue
        if kind not in PLAIN_TYPES:
            raise _Unusual
        info = tarfile.TarInfo(_text(buf[0:100]))
        info.type, info.size, info.linkname = kind, length, _text(buf[157:257])
        if kind == tarfile.AREGTYPE and info.name.endswith("/"):
            info.type = tarfile.DIRTYPE
        if info.isdir():
            info.name = info.name.rstrip("/")
        prefix = _text(buf[345:500])
        if prefix:
            info.name = f"{prefix}/{info.name}"
        if tarfile.GNUTYPE_LONGNAME in extra:
            info.name = extra[tarfile.GNUTYPE_LONGNAME]
            if info.isdir():
                info.name = info.name.removesuffix("/")
        if tarfile.GNUTYPE_LONGLINK in extra:
            info.linkname = extra[tarfile.GNUTYPE_LONGLINK]
        pax = extra.get(tarfile.XHDTYPE, {})
        if b"path" in pax:
            info.name = pax[b"path"].decode("ascii").rstrip("/")
        if b"linkpath" in pax:
            info.linkname = pax[b"linkpath"].decode("ascii")
        if not info.isreg():
            offset = data  # tarfile skips the data of regular files only
        info.offset_data = data
        infos.append(info)
        extra = {}


def _tarfile_headers(fd: int, rel: str) -> tuple[list[tarfile.TarInfo], int]:
    """`_headers` by `tarfile`: any tar it reads, with its own rules for damage."""
    with open(fd, "rb", closefd=False) as file:
        try:
            archive = tarfile.open(fileobj=file, mode="r:")
            return list(archive), archive.offset
        except (tarfile.TarError, EOFError, OSError, UnicodeError) as err:
            raise _unreadable(rel, str(err) or type(err).__name__) from None


def scan(root: Path, rel: str, read_labels: bool = True) -> ShardIndex:
    """Index the shard `root/rel` in one pass over its headers: its samples (one image each, with its label unless
    `read_labels` is False) and its members that make no sample, with the reason. An unreadable shard (not a tar,
    a header cut short or damaged) raises UsageError naming it."""
    path = root / rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise _unreadable(rel, err.strerror or str(err)) from None
    try:
        st = os.fstat(fd)
        shard = Shard(path.absolute(), rel, st)
        try:
            infos, end = _headers(fd)
        except _Unusual:
            infos, end = _tarfile_headers(fd, rel)
        # tarfile stops silently at a damaged or cut-short header past the first one: what follows the last member
        # must be the end of the file or an end-of-archive block of zeros, else members would be lost unseen
        tail = os.pread(fd, BLOCK, end)
        if tail and tail != ZERO_BLOCK:
            raise _unreadable(rel, f"the header at byte {end} is damaged or cut short (the members after it cannot "
                                   "be found)")
        members: dict[str, tarfile.TarInfo] = {}
        ignored: list[tuple[str, str]] = []
        for info in infos:
            if info.isdir():
                continue
            name = info.name.removeprefix("./")
            if name.rsplit("/", 1)[-1].startswith("."):  # hidden, e.g. macOS' ._x.jpg: no sample (as in WebDataset)
                continue
            problem = _member_problem(name, info)
            if problem:
                ignored.append((f"{rel}/{_shown(name)}", problem))
            elif info.offset_data + info.size > st.st_size:
                raise _unreadable(rel, f"member '{name}' ends past the end of the file (truncated)")
            else:
                members[name] = info  # a name stored twice: the later copy counts, as `tar -x` leaves it
        grouped: dict[str, dict[str, str]] = {}  # key -> extension as written -> member name
        for name in members:
            folder, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")
            grouped.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = name
        samples = []
        for key, parts in grouped.items():
            images = [ext for ext in parts if ext.lower() in IMAGE_TYPES]
            if len(images) != 1:
                listed = ", ".join(sorted(n.rpartition("/")[2] for n in parts.values()))
                ignored.append((f"{rel}/{key}", (
                    f"a sample with no image ({listed}); skipped. Expected one member of type "
                    f"{', '.join(sorted(IMAGE_TYPES))}" if not images else
                    f"a sample with {len(images)} images ({listed}): which one is meant is ambiguous; skipped. Keep "
                    "one image per sample (name others e.g. 000123.mask.png)")))
                continue
            name = parts[images[0]]
            info = members[name]
            label, origin, problem = (_label(fd, rel, {e.lower(): members[n] for e, n in parts.items()}) if read_labels
                                      else (None, "", ""))
            if problem:
                ignored.append((f"{rel}/{name}", problem))
                continue
            samples.append(Sample(f"{rel}/{name}", key, Member(shard, info.offset_data, info.size), label, origin))
        return ShardIndex(shard, samples, ignored)
    finally:
        os.close(fd)


KEPT_FORMAT = 1  # of the index files `scan_kept` keeps
KEPT_FOLDER = ".tar-index"  # where they are kept: beside the caches made from the shards (hidden)
KEPT_COLUMNS = ("paths", "keys", "offsets", "sizes", "labels", "label_from")


def scan_kept(root: Path, rel: str, read_labels: bool, kept: Path | None) -> ShardIndex:
    """`scan`, or the index an earlier `scan` of this very file left in the folder `kept` (same device, inode, size
    and modification time, same name under DATA, labels read alike): a rerun or an update then reads no header of a
    shard that did not change, only stats it (at 300k samples, indexing every shard was 8% of a full run of a small
    model). A new scan is kept for the next run, at best effort: a folder that cannot be written costs only a scan.

    The index is JSON, columns of plain values, checked as it is read (any doubt: the shard is scanned again); a kept
    index can only point into the shard it names, whose identity every read checks (`Shard.open`)."""
    if kept is None:
        return scan(root, rel, read_labels)
    path = (root / rel).absolute()
    file = kept / f"{hashlib.sha256(f'{path}{chr(0)}{rel}{chr(0)}{read_labels}'.encode()).hexdigest()[:32]}.json"
    try:
        st = os.stat(path)
        index = _kept_index(json.loads(file.read_bytes()), path, rel, st, read_labels)
    except (OSError, ValueError, TypeError, KeyError):
        index = None
    if index is not None:
        return index
    index = scan(root, rel, read_labels)
    samples = index.samples
    record = {"format": KEPT_FORMAT, "path": str(path), "rel": rel, "read_labels": read_labels,
              "identity": list(index.shard._identity), "ignored": [list(item) for item in index.ignored],
              **dict(zip(KEPT_COLUMNS, ([s.path for s in samples], [s.key for s in samples],
                                        [s.member.offset for s in samples], [s.member.size for s in samples],
                                        [s.label for s in samples], [s.label_from for s in samples])))}
    try:
        kept.mkdir(parents=True, exist_ok=True)
        replace_atomically(file, lambda tmp: tmp.write_text(json.dumps(record, separators=(",", ":"))))
    except OSError:  # a full disk, a folder that cannot be written: the next run scans again
        pass
    return index


def _kept_index(record: object, path: Path, rel: str, st: os.stat_result, read_labels: bool) -> ShardIndex | None:
    """The ShardIndex a kept record describes, or None where it is not exactly one of this file as it is now."""
    if (not isinstance(record, dict) or record.get("format") != KEPT_FORMAT or record.get("path") != str(path)
            or record.get("rel") != rel
            or record.get("read_labels") is not read_labels
            or record.get("identity") != [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]):
        return None
    columns = [record[name] for name in KEPT_COLUMNS]
    n = len(columns[0])
    if any(not isinstance(c, list) or len(c) != n for c in columns):
        return None
    paths, keys, offsets, sizes, labels, origins = columns
    # whole-column checks, each one pass in C (map, set, min): per value in Python they were 0.9 s of 300k samples
    if (not {*map(type, paths), *map(type, keys), *map(type, origins)} <= {str}
            or not {*map(type, offsets), *map(type, sizes)} <= {int} or min(offsets + sizes, default=0) < 0
            or not set(map(type, labels)) <= {str, type(None)}
            or not all(map(str.startswith, paths, itertools.repeat(f"{rel}/")))
            or max(map(operator.add, offsets, sizes), default=0) > st.st_size):
        return None
    ignored = record["ignored"]
    if not isinstance(ignored, list) or any(not isinstance(i, list) or len(i) != 2 or any(type(v) is not str for v in i)
                                            for i in ignored):
        return None
    shard = Shard(path, rel, st)
    samples = [Sample(p, k, Member(shard, o, z), label, origin) for p, k, o, z, label, origin in zip(*columns)]
    return ShardIndex(shard, samples, [tuple(i) for i in ignored])


def _label(fd: int, rel: str, parts: dict[str, tarfile.TarInfo]) -> tuple[str | None, str, str]:
    """(label as written or None, '<shard>/<member>' it came from, why the sample cannot be used or '')."""
    for ext in ("cls", "json", "txt"):
        info = parts.get(ext)
        if info is None or (ext == "txt" and "json" in parts):
            continue
        origin = f"{rel}/{info.name.removeprefix('./')}"
        if info.size > MAX_LABEL_BYTES:
            return None, origin, f"its label member '{origin}' has {info.size:,} bytes, too many for a label; skipped"
        try:
            text = os.pread(fd, info.size, info.offset_data).decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, origin, f"its label member '{origin}' is not UTF-8 text; skipped"
        if ext != "json":
            return text or None, origin, ""
        try:
            record = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            return None, origin, (f"its metadata '{origin}' is not valid JSON ({err.msg}); skipped, as its label is "
                                  "unknown")
        value = record.get("label") if isinstance(record, dict) else None
        if value is None:
            continue  # metadata without a label (img2dataset's): unlabelled, unless a txt says otherwise
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None, origin, (f"the label field of '{origin}' is {value!r}; expected a class index (integer) or a "
                                  "class name; skipped")
        return str(value).strip() or None, origin, ""
    return None, "", ""


def read_classes(path: Path) -> list[str]:
    """The class list beside the shards: one name a line, line k (from 0) naming class index k."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"class list '{path}' cannot be read ({err}). Expected UTF-8 text, one class name a line; "
                         "fix it, or remove it to name classes by their index.") from None
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(set(names)) != len(names):
        raise UsageError(f"class list '{path}' must name each class once, one a line (line k = class index k); it "
                         "has empty or repeated lines. Fix it, or remove it to name classes by their index.")
    return names


def class_labels(samples: list[Sample], classes: list[str] | None, classes_file: str = CLASSES_FILE
                 ) -> tuple[list[int], list[str]]:
    """Labels (index into the names; -1 unlabelled) and the names of the classes used, in order.

    An integer label is a class index: with a class list (`classes.txt`) index k is its line k; without one the class
    is named by the number itself ('7'), and classes are ordered by number. -1 means unlabelled (as in Hugging Face
    datasets); any other index outside the list is refused, naming the member. A text label is the class name.
    """
    names_of: list[str | None] = []
    for s in samples:
        value = s.label
        if value is None:
            names_of.append(None)
        elif INTEGER.fullmatch(value):
            k = int(value)
            if k != -1 and (k < 0 or (classes is not None and k >= len(classes))):
                valid = f"0..{len(classes) - 1} (the {len(classes)} lines of {classes_file})" if classes else ">= 0"
                raise UsageError(f"class index {k} in '{s.label_from}' is out of range: expected {valid}, or -1 for "
                                 "unlabelled. Fix the label member" + (f" or {classes_file}." if classes else "."))
            names_of.append(None if k == -1 else classes[k] if classes is not None else str(k))
        elif classes is not None and value not in classes:
            raise UsageError(f"class '{value}' in '{s.label_from}' is not in {classes_file} ({len(classes)} classes, "
                             f"e.g. {', '.join(classes[:3])}). Expected a listed name or a class index; fix the member "
                             f"or add the class to {classes_file}.")
        else:
            names_of.append(value)
    used = {n for n in names_of if n is not None}
    if classes is not None:
        names = [c for c in classes if c in used]
    else:
        names = sorted(used, key=lambda n: (0, int(n), "") if INTEGER.fullmatch(n) else (1, 0, n))
    index = {n: i for i, n in enumerate(names)}
    return [index[n] if n is not None else -1 for n in names_of], names


def sample_keys(samples: list[Sample]) -> dict[str, str]:
    """Every way a labels CSV may name a sample -> its row path: the row path with or without extension, the shard's
    name plus the key, and, where no other sample shares it, the key (img2dataset's `key` column), the image member's
    name, or its base name with or without extension."""
    full: dict[str, str] = {}
    short: dict[str, str] = {}
    ambiguous: set[str] = set()
    for s in samples:
        shard = s.member.shard.name
        member = s.path[len(shard) + 1:]
        for key in (s.path, f"{shard}/{s.key}"):
            full[key] = s.path
        base = member.rsplit("/", 1)[-1]
        for key in dict.fromkeys((s.key, member, base, base.partition(".")[0])):
            if short.setdefault(key, s.path) != s.path:
                ambiguous.add(key)
    keys = {k: v for k, v in short.items() if k not in ambiguous}
    keys.update(full)
    return keys
