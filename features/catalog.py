"""Find the images under DATA and their labels and splits, for the three layouts users have.

(a) DATA/<class>/*.jpg; (b) DATA/<train|val|test...>/<class>/*.jpg, the split kept per image;
(c) DATA/**/*.jpg plus a labels CSV. Unlabelled folders are allowed (label -1), for prediction later.
(d) WebDataset tar shards: a folder of `.tar` files, one `.tar`, or a glob / brace pattern naming them
(`shards/train-{000000..000099}.tar`); samples are grouped by key inside each shard and read in place
(features/tars.py).
In (a) and (b) the label is the folder an image lies in *as seen from DATA* (its first, or for (b) second, path
component); links are walked so that this can never relabel an image (see `_walk_files`). Nothing is guessed: a
CSV's columns are recognised by name (or given), and an image listed twice with different labels is refused.
Entries that cannot be used (links to nowhere, named pipes and other special files, folders that cannot be read,
names that are not UTF-8) are listed with the reason, without being opened, so none can stop or block a run. Files of
other types (a caption `.txt` beside each image) are no candidates: a note counts them by extension, no list holds
them. `write_manifest` lists the candidates once into a file a job array's tasks read slices of (`read_manifest`).
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from features import tars
from features.errors import UsageError
from features.images import IMAGE_EXTENSIONS

SPLIT_PREFIXES = ("train", "val", "test")
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path", "image_id", "img", "id", "name",
                "key", "__key__")  # the last two: a WebDataset sample's key, as img2dataset's parquet files name it
LABEL_COLUMNS = ("label", "class", "category", "target", "y", "class_name", "labels")


@dataclass(frozen=True)
class Catalog:
    """The candidate images of one extraction, sorted by relative path (the row order of the cache)."""

    root: Path
    paths: list[str]  # relative to root, '/'-separated
    labels: list[int]  # index into label_names, -1 = unlabelled
    splits: list[str]  # 'train' | 'val' | 'test' | ''
    label_names: list[str]
    layout: str
    ignored: list[tuple[str, str]]  # files under root that are not images, with the reason
    offset: int = 0  # index of the first candidate in the whole set (non-zero for a shard)
    views: list[int] = field(default_factory=list)  # per row: 0 = clean, 1.. = augmented view (see with_views)
    notes: tuple[str, ...] = ()  # what discovery decided on the user's behalf, for the summary
    # (d) only: row path -> where its image lies in a tar shard (shard, offset, size); the whole set's, shared by
    # every shard, subset and view of this catalog (dataclasses.replace carries it)
    members: dict[str, tars.Member] = field(default_factory=dict, repr=False)
    # per row: (size, mtime_ns) as read when the folder was listed (or from a manifest); empty: stat'ed on first use
    file_stamps: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def stamps(self) -> list[tuple[int, int]]:
        """(size, mtime_ns) of each candidate's file: how an update tells an unchanged file from a changed one. A
        sample of a tar shard has its shard's, as read when the shard was indexed. Discovery reads them with the one
        stat that checks each file is a regular file, so listing a folder stats each image once."""
        if self.file_stamps:
            return self.file_stamps

        def stamp(rel: str) -> tuple[int, int]:
            if rel in self.members:
                return self.members[rel].shard.stamp
            st = (self.root / rel).stat()
            return st.st_size, st.st_mtime_ns

        stats = {rel: stamp(rel) for rel in dict.fromkeys(self.paths)}
        return [stats[rel] for rel in self.paths]

    def source(self, i: int) -> Path | tars.Member:
        """What a loader reads candidate i from: its file, or its place in a tar shard (`features.images.read_file`
        reads both)."""
        rel = self.paths[i]
        return self.members.get(rel) or self.root / rel

    def fingerprint(self) -> str:
        """Identity of the input set: names, sizes, modification times and labels of every candidate."""
        h = hashlib.sha256()  # one update of the joined lines: the digest of the lines fed one by one, ~3x faster
        views = self.views or [0] * len(self)
        h.update("".join(f"{rel}\0{size}\0{mtime}\0{label}\0{split}{f'{chr(0)}{view}' if view else ''}\n"
                         for rel, (size, mtime), label, split, view
                         in zip(self.paths, self.stamps, self.labels, self.splits, views)).encode())
        h.update("\0".join(self.label_names).encode())
        return h.hexdigest()

    def subset(self, indices: list[int]) -> "Catalog":
        """The candidates at `indices` (in that order), as a catalog of their own: what an update still computes."""
        return dataclasses.replace(
            self, paths=[self.paths[i] for i in indices], labels=[self.labels[i] for i in indices],
            splits=[self.splits[i] for i in indices], views=[self.views[i] for i in indices], offset=0,
            file_stamps=[self.file_stamps[i] for i in indices] if self.file_stamps else [])

    def shard(self, index: int, count: int) -> "Catalog":
        """Contiguous block `index` of `count`, balanced by count; concatenating the blocks restores the order."""
        lo, hi = len(self) * index // count, len(self) * (index + 1) // count
        return dataclasses.replace(
            self, paths=self.paths[lo:hi], labels=self.labels[lo:hi], splits=self.splits[lo:hi],
            views=self.views[lo:hi], ignored=self.ignored if index == 0 else [], offset=self.offset + lo,
            file_stamps=self.file_stamps[lo:hi])

    def view_counts(self, k: int, has_splits: bool | None = None) -> list[int]:
        """Rows per candidate with k augmented views: k + 1 for a training image, 1 for the others (evaluation splits,
        unlabelled images). Without splits (`has_splits`, default: any candidate has one) every labelled image is a
        training image."""
        has_splits = any(self.splits) if has_splits is None else has_splits
        return [k + 1 if label >= 0 and (split == "train" or not has_splits) else 1
                for label, split in zip(self.labels, self.splits)]

    def with_views(self, k: int, has_splits: bool | None = None) -> "Catalog":
        """Rows of the cache: each training image followed by its k augmented views; evaluation splits and
        unlabelled images keep their clean view only (see `view_counts`; `has_splits` is the whole set's when this
        catalog is a part of it)."""
        if k == 0:
            return dataclasses.replace(self, views=[0] * len(self))
        rows = [(i, v) for i, n in enumerate(self.view_counts(k, has_splits)) for v in range(n)]
        return dataclasses.replace(
            self, paths=[self.paths[i] for i, _ in rows], labels=[self.labels[i] for i, _ in rows],
            splits=[self.splits[i] for i, _ in rows], views=[v for _, v in rows],
            file_stamps=[self.file_stamps[i] for i, _ in rows] if self.file_stamps else [])


NOT_UTF8 = ("its name is not valid UTF-8 (listed with the bytes escaped), and the cache stores names as UTF-8; "
            "skipped. Rename it, e.g. with `convmv -f latin1 -t utf8 --notest`.")
NOT_REGULAR = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device"}


def _shown(path: str) -> str:
    """`path` as it can be listed and stored as UTF-8: bytes of a name that is not UTF-8 (which Python keeps as
    surrogates) are escaped, e.g. b'caf\\xe9.jpg' -> 'caf\\\\xe9.jpg'. Every other path is returned unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _file_problem(path: Path, suffixes: frozenset[str] = IMAGE_EXTENSIONS) -> str:
    """Why the visible file `path` is no image (or other file of `suffixes`) the pipeline may open, or '' when it is
    one. Nothing is opened: a named pipe would block the run forever. A file that cannot be read is found when it
    is decoded (and listed)."""
    name = path.name
    if _shown(name) != name:
        return NOT_UTF8
    if Path(name).suffix.lower() not in suffixes:
        if tars.is_compressed(name):
            return tars.COMPRESSED
        return f"not an image file type ({Path(name).suffix or 'no extension'})"
    try:
        mode = path.stat().st_mode
    except OSError as err:  # a link to nowhere, a loop of links, a file removed meanwhile
        if isinstance(err, FileNotFoundError) and path.is_symlink():
            return f"a link to '{_shown(os.readlink(path))}', which does not exist; skipped. Fix or remove the link."
        return f"cannot be read ({err.strerror}); skipped"
    if not stat.S_ISREG(mode):
        return f"{NOT_REGULAR.get(stat.S_IFMT(mode), 'a special file')}, not a regular file; skipped without opening it"
    return ""


@dataclass
class Listing:
    """What a walk of DATA found: candidate files (relative, sorted) with their (size, mtime_ns), the visible entries
    left out with the reason, and how many other files were not candidates, by extension (never listed one by one:
    a caption `.txt` beside each image would double every list)."""

    files: list[str]
    others: list[tuple[str, str]]
    stamps: dict[str, tuple[int, int]]
    not_candidates: dict[str, int]
    apart: list[str] = field(default_factory=list)  # candidates of the suffix listed apart (tar shards), sorted


def _suffix(name: str) -> str:
    """`Path(name).suffix`, lower-cased, without building a Path (a walk calls this once per file)."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def _walk_files(root: Path, suffixes: frozenset[str] = IMAGE_EXTENSIONS, apart: str = tars.SHARD_SUFFIX) -> Listing:
    """Files of `suffixes` under `root`, recursively, each stat'ed once (following links: a regular file is a
    candidate, and its size and time are its stamp); those ending in `apart` (tar shards) are listed apart. Hidden
    files and folders are ignored, and so are files of other types (counted by extension, not listed).

    Directory links are followed once each, so a loop (`ants/up -> ..`) cannot multiply the images: every real
    folder is walked at most once (a seen-set of (device, inode)), and a link that leads back inside DATA is
    skipped because its target is catalogued at its own place, under its own label. Skipped links are reported,
    as are folders that cannot be read and entries that look like candidates but cannot be used (links to nowhere,
    named pipes and other special files, names that are not UTF-8, compressed tars), so that nothing that looks like
    an image is left out silently and no odd entry stops or blocks the run. Folders are walked depth first in name
    order (as `os.walk` does top-down), with `os.scandir`: no Path object and no second stat per file. The listing
    tells regular files from links by the entry's type (no syscall); regular files of a candidate type are stat'ed
    in chunks (`_Stats`): by this thread on a local disk, by a few threads while the walk goes on where the stats
    wait on a server (a shared file system).
    """
    files: list[str] = []
    shards: list[str] = []
    others: list[tuple[str, str]] = []
    stamps: dict[str, tuple[int, int]] = {}
    not_candidates: dict[str, int] = {}
    real_root = root.resolve()
    start = root.stat()
    seen = {(start.st_dev, start.st_ino)}

    def unreadable(err: OSError) -> None:
        folder = Path(err.filename)
        if folder == root:
            raise UsageError(f"DATA folder '{_shown(str(root))}' cannot be read ({err.strerror}). Expected a folder "
                             "this user may list; fix its permissions (e.g. chmod a+rx) or choose another DATA.")
        others.append((_shown(folder.relative_to(root).as_posix()) + "/",
                       f"a folder that cannot be read ({err.strerror}); its files are left out. Fix its permissions "
                       "(e.g. chmod a+rx) to include them."))

    def found(rel: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            others.append((rel, f"{NOT_REGULAR.get(stat.S_IFMT(st.st_mode), 'a special file')}, not a regular "
                                "file; skipped without opening it"))
            return
        (shards if rel.endswith(apart) or rel.lower().endswith(apart) else files).append(rel)
        stamps[rel] = (st.st_size, st.st_mtime_ns)

    pending_rels: list[str] = []  # regular files of a candidate type (tar shards aside), not stat'ed yet
    pending_paths: list[str] = []
    batches: list[tuple[list[str], Future]] = []
    images = suffixes - {apart}
    with _Stats() as stats:
        stack = [(str(root), "")]  # (folder, its path relative to root with a trailing '/', or '' for root)
        while stack:
            folder, prefix = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = list(listing)
            except OSError as err:
                unreadable(err)
                continue
            folders = []
            for entry in entries:
                name = entry.name
                if name[0] == ".":
                    continue
                dot = name.rfind(".")
                suffix = name[dot:].lower() if 0 < dot < len(name) - 1 else ""  # Path(name).suffix, lower-cased
                if suffix in images and name.isascii() and entry.is_file(follow_symlinks=False):
                    pending_rels.append(prefix + name)  # the common case: the entry's type says a regular file
                    pending_paths.append(entry.path)
                    if len(pending_paths) == STAT_CHUNK:
                        batches.append((pending_rels, stats.submit(pending_paths)))
                        pending_rels, pending_paths = [], []
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    folders.append(entry)
                    continue
                rel = prefix + name
                if not name.isascii() and _shown(name) != name:
                    others.append((_shown(rel), NOT_UTF8))
                    continue
                if suffix not in suffixes:
                    if tars.is_compressed(name):
                        others.append((rel, tars.COMPRESSED))
                    else:
                        not_candidates[suffix] = not_candidates.get(suffix, 0) + 1
                    continue
                try:
                    found(rel, entry.stat())  # a link (or a tar shard, or a name that is not ASCII)
                except OSError as err:  # a link to nowhere, a loop of links, a file removed meanwhile
                    if isinstance(err, FileNotFoundError) and entry.is_symlink():
                        others.append((rel, f"a link to '{_shown(os.readlink(entry.path))}', which does not exist; "
                                            "skipped. Fix or remove the link."))
                    else:
                        others.append((rel, f"cannot be read ({err.strerror}); skipped"))
            subfolders = []
            for entry in sorted(folders, key=lambda e: e.name):  # claimed in name order, as os.walk lists them
                name = entry.name
                rel = prefix + name
                shown = _shown(rel)
                if not name.isascii() and shown != rel:
                    others.append((shown + "/", NOT_UTF8))
                    continue
                st = entry.stat()
                if (st.st_dev, st.st_ino) in seen:
                    others.append((shown + "/", f"a link to the folder '{_shown(str(Path(entry.path).resolve()))}', "
                                                "which is already catalogued; skipped"))
                    continue
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if target == real_root or real_root in target.parents:
                        inside = _shown(target.relative_to(real_root).as_posix()) or "."
                        others.append((shown + "/", f"a link back into DATA ('{inside}'), catalogued at its own "
                                                    "place; skipped"))
                        continue
                seen.add((st.st_dev, st.st_ino))
                subfolders.append((entry.path, rel + "/"))
            stack.extend(reversed(subfolders))  # depth first, in name order
        batches.append((pending_rels, stats.submit(pending_paths)))
        for rels, chunk in batches:
            for rel, st in zip(rels, chunk.result()):
                if type(st) is os.stat_result and stat.S_ISREG(st.st_mode):
                    files.append(rel)
                    stamps[rel] = (st.st_size, st.st_mtime_ns)
                elif isinstance(st, OSError):  # removed or made unreadable since it was listed
                    others.append((rel, f"cannot be read ({st.strerror}); skipped"))
                else:  # replaced by something else meanwhile
                    found(rel, st)
    return Listing(sorted(files), sorted(others), stamps, not_candidates, sorted(shards))


STAT_THREADS = 4  # stat calls in flight while the walk goes on: a network file system answers each after a wait
STAT_CHUNK = 1024
WAITING_STAT_S = 50e-6  # a local disk answers a stat in 3 us (13 us with its folder not cached), a server in 100s


class _Stats:
    """Stats chunks of paths (`_stat_chunk`) as the walk submits them: in this thread, until a chunk takes over
    WAITING_STAT_S a stat (a network file system), then in STAT_THREADS threads that overlap the waits while the walk
    goes on. Measured, not assumed: on a local disk threads cost more (handing the interpreter lock back and forth
    on every syscall) than they overlap: 3.3 s against 2.1 s for 300k files on 2 cores."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None

    def submit(self, paths: list[str]) -> Future:
        if self.pool is not None:
            return self.pool.submit(_stat_chunk, paths)
        done: Future = Future()
        start = time.perf_counter()
        done.set_result(_stat_chunk(paths))
        if time.perf_counter() - start > WAITING_STAT_S * len(paths):
            self.pool = ThreadPoolExecutor(max_workers=STAT_THREADS, thread_name_prefix="stat")
        return done

    def __enter__(self) -> "_Stats":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _stat_chunk(paths: list[str]) -> list[os.stat_result | OSError]:
    """os.stat of each path (following links), in order; an error is returned in its place, not raised."""
    out: list[os.stat_result | OSError] = []
    for path in paths:
        try:
            out.append(os.stat(path))
        except OSError as err:
            out.append(err)
    return out


def _split_of(top: str) -> str:
    lower = top.lower()
    return next((s for s in SPLIT_PREFIXES if lower.startswith(s)), "")


def discover(
    data: str | Path, labels_csv: str | None = None, path_column: str | None = None, label_column: str | None = None,
    tar_index: Path | None = None,
) -> Catalog:
    """The candidates under DATA (layouts (a)-(d) above). `tar_index`: a folder where each tar shard's index is kept
    for the next run (`tars.scan_kept`), so an unchanged shard is not indexed again."""
    root = Path(data)
    if not root.exists() and tars.is_pattern(str(data)):
        return _from_pattern(str(data), labels_csv, path_column, label_column, tar_index)
    if not root.exists():
        raise UsageError(f"DATA folder '{data}' does not exist. Expected a folder of images (class sub-folders, "
                         "split sub-folders, or images plus LABELS=labels.csv), or of .tar shards.")
    if root.is_file() and root.name.lower().endswith(tars.SHARD_SUFFIX):  # one shard: as the pattern naming it
        _check_root(root.parent)
        problem = _file_problem(root, frozenset({tars.SHARD_SUFFIX}))
        if problem:
            raise UsageError(f"DATA '{data}': {problem}")
        return _from_tars(root.parent, [root.name], [], labels_csv, path_column, label_column, tar_index)
    if not root.is_dir():
        raise UsageError(f"DATA '{data}' is a file, expected a folder of images (or of .tar shards, or one .tar).")
    _check_root(root)
    listing = _walk_files(root, IMAGE_EXTENSIONS | {tars.SHARD_SUFFIX})
    images, shards, others = listing.files, listing.apart, listing.others
    not_candidates = dict(listing.not_candidates)
    if labels_csv:
        others = [o for o in others if (root / o[0]).resolve() != Path(labels_csv).resolve()]
        csv = Path(labels_csv).resolve()
        if csv.is_file() and csv.is_relative_to(root.resolve()) and not_candidates.get(_suffix(csv.name)):
            not_candidates[_suffix(csv.name)] -= 1  # the labels CSV kept beside the images is no stray file
    if shards and not images:
        return _from_tars(root, shards, _beside_shards(root, shards, others), labels_csv, path_column, label_column,
                          tar_index)
    others = sorted(others + [(s, "a tar shard among image files: DATA is read as a folder of images, so its samples "
                                  "are left out. Point DATA at the shards alone (e.g. 'DATA/*.tar') to extract them")
                              for s in shards])
    if not images:
        skipped = f" Skipped {len(others)} other entries, e.g. {others[0][0]}: {others[0][1]}" if others else ""
        found = f" It holds {_counted(not_candidates)}." if sum(not_candidates.values()) else ""
        raise UsageError(f"DATA folder '{data}' holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                         f"recursively).{found}{skipped}")
    if labels_csv:
        found = _from_csv(root, images, others, labels_csv, path_column, label_column)
    else:
        found = _from_folders(root, images, others)
    notes = found.notes
    if sum(not_candidates.values()):
        notes += (f"left out {_counted(not_candidates)} under DATA: not image files, so no candidates (not listed "
                  "as skipped)",)
    return dataclasses.replace(found, notes=notes, file_stamps=[listing.stamps[p] for p in found.paths])


def _counted(by_suffix: dict[str, int]) -> str:
    """{'.txt': 3, '': 1} -> '4 other files (3 .txt, 1 without extension)'; the five commonest types are named."""
    total = sum(by_suffix.values())
    common = sorted(((n, s) for s, n in by_suffix.items() if n), key=lambda t: (-t[0], t[1]))
    named = ", ".join(f"{n} {s or 'without extension'}" for n, s in common[:5]) + (", ..." if len(common) > 5 else "")
    return f"{total} other file{'s' if total != 1 else ''} ({named})"


def _check_root(root: Path) -> None:
    if _shown(str(root.resolve())) != str(root.resolve()):  # the cache records where its images are, as UTF-8
        raise UsageError(f"DATA folder '{_shown(str(root.resolve()))}' has a name that is not valid UTF-8. Expected a "
                         "UTF-8 path; rename the folder, e.g. with `convmv -f latin1 -t utf8 --notest`.")


def _from_pattern(data: str, labels_csv: str | None, path_column: str | None, label_column: str | None,
                  tar_index: Path | None) -> Catalog:
    """Layout (d) from a glob or brace pattern: the shards it names, relative to the folder before its first pattern
    character (the data root). Names the braces spell out that do not exist are listed; a pattern that matches no
    file at all is refused."""
    root, found, missing = tars.match_pattern(data)
    if not found:
        raise UsageError(f"DATA pattern '{data}' matches no file (e.g. '{missing[0] if missing else data}'). Expected "
                         "a glob or brace pattern naming .tar shards, e.g. 'shards/*.tar' or "
                         "'shards/train-{000000..000099}.tar' (quoted, so that the shell leaves it to this tool).")
    if not root.is_dir():
        raise UsageError(f"DATA pattern '{data}': its folder '{root}' is not a folder. Expected a pattern of .tar "
                         "files in a folder, e.g. 'shards/*.tar'.")
    _check_root(root)
    shards, others = [], [(_shown(os.path.relpath(m, root)), "named by the pattern, but does not exist; skipped")
                          for m in missing]
    for path in found:
        rel = _shown(path.relative_to(root).as_posix())
        problem = ("a folder; a pattern selects .tar files" if path.is_dir() else
                   _file_problem(path, frozenset({tars.SHARD_SUFFIX})))
        if problem.startswith("not an image file type"):
            problem = f"not a tar shard ({path.suffix or 'no extension'}); skipped"
        (others.append((rel, problem)) if problem else shards.append(rel))
    if not shards:
        raise UsageError(f"DATA pattern '{data}' matches no .tar shard ({len(found)} other entries, e.g. "
                         f"{others[-1][0]}: {others[-1][1]}). Expected .tar files; for a folder of images, give the "
                         "folder itself.")
    return _from_tars(root, shards, sorted(others), labels_csv, path_column, label_column, tar_index)


def _beside_shards(root: Path, shards: list[str], others: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What a folder of shards holds besides them, as listed: not `classes.txt`, nor img2dataset's per-shard
    sidecars (`00000.parquet`, `00000_stats.json`, named after their shard), which are no candidates."""
    stems = {s[: -len(tars.SHARD_SUFFIX)] for s in shards}
    return [(rel, reason.replace("not an image file type", "not a tar shard") if reason.startswith("not an image")
             else reason) for rel, reason in others
            if rel != tars.CLASSES_FILE and rel.rsplit(".", 1)[0].removesuffix("_stats") not in stems]


def _from_tars(root: Path, shards: list[str], others: list[tuple[str, str]], labels_csv: str | None,
               path_column: str | None, label_column: str | None, tar_index: Path | None) -> Catalog:
    """Layout (d): index each shard once (features/tars.py); rows are the samples with one image, sorted by row path
    `<shard>/<image member>`. A shard's split comes from its file name (`train-000001.tar`), else, as in (b), from
    its folder under DATA when every shard folder there is named for a split (`val/000001.tar`). Labels come from
    the labels CSV keyed by sample key, else from each sample's label member; see `tars.class_labels`."""
    indexes = [tars.scan_kept(root, rel, not labels_csv, tar_index) for rel in shards]  # one pass per shard at most
    samples = sorted((s for index in indexes for s in index.samples), key=lambda s: s.path)
    others = sorted(others + [item for index in indexes for item in index.ignored])
    if not samples:
        skipped = f" Skipped {len(others)} entries, e.g. {others[0][0]}: {others[0][1]}" if others else ""
        raise UsageError(f"the {len(shards)} tar shard(s) under '{root}' hold no sample with an image (looked for "
                         f"members of type {', '.join(sorted(tars.IMAGE_TYPES))}).{skipped}")
    tops = {rel.split("/")[0] for rel in shards if "/" in rel}
    by_folder = bool(tops) and all(_split_of(t) for t in tops)
    split_of = {rel: _split_of(rel.rsplit("/", 1)[-1]) or (_split_of(rel.split("/")[0]) if by_folder and "/" in rel
                                                           else "") for rel in shards}
    paths = [s.path for s in samples]
    splits = [split_of[s.member.shard.name] for s in samples]
    members = {s.path: s.member for s in samples}
    if labels_csv:
        found = _from_csv(root, paths, others, labels_csv, path_column, label_column, tars.sample_keys(samples), splits)
        return dataclasses.replace(found, layout="tars", members=members)
    classes_file = root / tars.CLASSES_FILE
    classes = tars.read_classes(classes_file) if classes_file.is_file() else None
    labels, names = tars.class_labels(samples, classes, tars.CLASSES_FILE)
    notes: tuple[str, ...] = ()
    if any(s.label is not None and s.label_from.endswith(".txt") for s in samples):
        notes = (f"tar shards: labels taken from the samples' .txt members ({len(names)} classes); a .txt counts as "
                 "the label only in a sample without .cls or .json. Give LABELS=labels.csv to label them otherwise",)
    return Catalog(root, paths, labels, splits, names, "tars", others, notes=notes, members=members)


def _from_folders(root: Path, images: list[str], others: list[tuple[str, str]]) -> Catalog:
    tops = {rel.partition("/")[0] for rel in images if "/" in rel}
    split_of = {top: _split_of(top) for top in tops}
    by_split = bool(tops) and all(split_of.values())
    class_of: list[str] = []
    splits: list[str] = []
    for rel in images:
        top, inside, rest = rel.partition("/")
        if by_split:
            splits.append(split_of[top] if top in split_of else _split_of(top))
            name, deeper, _ = rest.partition("/")
            class_of.append(name if deeper else "")
        else:
            splits.append("")
            class_of.append(top if inside else "")
    names = sorted(set(class_of) - {""})
    index = {n: i for i, n in enumerate(names)}
    labels = [index.get(c, -1) for c in class_of]
    layout = ("splits" if by_split else "classes") if names else "unlabelled"
    return Catalog(root, images, labels, splits, names, layout, others)


def _pick_column(columns: list[str], given: str | None, known: tuple[str, ...], what: str, csv: str) -> str:
    """The column named by the flag, else the first with a known name; never a guess by position."""
    if given:
        if given not in columns:
            raise UsageError(f"labels CSV has no {what} column '{given}'. Columns are: {', '.join(columns)}.")
        return given
    lowered = {c.lower().strip(): c for c in columns}
    for name in known:
        if name in lowered:
            return lowered[name]
    raise UsageError(f"labels CSV '{csv}' has no recognised {what} column (its columns: {', '.join(columns)}). "
                     f"Expected one of: {', '.join(known)}; or name it with --{what}-column.")


def _from_csv(root: Path, images: list[str], others: list[tuple[str, str]], csv: str,
              path_column: str | None, label_column: str | None, keys: dict[str, str] | None = None,
              splits: list[str] | None = None) -> Catalog:
    """`keys`: how the CSV may name each image (default `_image_keys`); `splits`: each image's split where the CSV
    gives none (default '')."""
    import pandas as pd  # here only: the other layouts, and every rerun or update of them, start 0.4 s sooner

    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UsageError(f"labels CSV '{csv}' does not exist.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UsageError(f"labels CSV '{csv}' cannot be read as CSV: {err}") from None
    columns = list(table.columns)
    if len(columns) < 2:
        raise UsageError(f"labels CSV '{csv}' needs at least two columns (image path or id, label); "
                         f"found {columns}.")
    pcol = _pick_column(columns, path_column, PATH_COLUMNS, "path", csv)
    rest = [c for c in columns if c != pcol and c.lower().strip() != "split"]
    notes: tuple[str, ...] = ()
    if label_column is None and len(rest) == 1 and not any(c.lower().strip() in LABEL_COLUMNS for c in columns):
        lcol = rest[0]  # e.g. Kaggle's id,breed: the key is recognised and one column is left
        notes = (f"labels CSV '{csv}': using column '{lcol}' as the label (the only column besides '{pcol}'); "
                 "name another with --label-column",)
    else:
        lcol = _pick_column(columns, label_column, LABEL_COLUMNS, "label", csv)
    if pcol == lcol:
        raise UsageError(f"labels CSV '{csv}': path and label column are both '{pcol}'; "
                         "set --path-column and --label-column.")
    scol = next((c for c in columns if c.lower().strip() == "split"), None)
    keys = keys or _image_keys(images)
    label_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    unknown, conflicts = [], {}
    for raw, label, *split in table[[pcol, lcol] + ([scol] if scol else [])].itertuples(index=False, name=None):
        key = raw.strip().replace("\\", "/").removeprefix("./")
        rel = keys.get(key) or keys.get(os.path.splitext(key)[0])
        if rel is None:
            unknown.append(raw)
            continue
        entry = (label.strip(), _split_of(split[0].strip()) if split else "")
        if rel in label_of and (label_of[rel], split_of.get(rel, "")) != entry:  # identical repeats collapse
            conflicts.setdefault(rel, {(label_of[rel], split_of.get(rel, ""))}).add(entry)
        label_of[rel] = entry[0]
        if split:
            split_of[rel] = entry[1]
    if conflicts:
        listed = "; ".join(f"{rel}: {', '.join(sorted(f'{lbl!r}' + (f' ({sp})' if sp else '') for lbl, sp in found))}"
                           for rel, found in sorted(conflicts.items())[:5])
        raise UsageError(f"labels CSV '{csv}' gives {len(conflicts)} image(s) conflicting labels or splits "
                         f"({listed}{'; ...' if len(conflicts) > 5 else ''}). Keep one row per image.")
    if not label_of:
        raise UsageError(f"labels CSV '{csv}': none of its {len(table)} rows names an image under '{root}' "
                         f"(column '{pcol}', e.g. '{table[pcol].iloc[0] if len(table) else ''}'). "
                         "Use paths relative to DATA or file names, with or without extension.")
    names = sorted({v for v in label_of.values() if v})
    index = {n: i for i, n in enumerate(names)}
    labels = [index.get(label_of.get(rel, ""), -1) for rel in images]
    splits = [split_of.get(rel, given) for rel, given in zip(images, splits or [""] * len(images))]
    ignored = others + [(u, "listed in the labels CSV but not found under DATA") for u in unknown]
    return Catalog(root, images, labels, splits, names, "csv", ignored, notes=notes)


def _image_keys(images: list[str]) -> dict[str, str]:
    """Every way a CSV may name an image: relative path or bare file name, with or without extension.

    A bare name shared by two files is ambiguous and only matches by its full relative path.
    """
    full = {key: rel for rel in images for key in (rel, os.path.splitext(rel)[0])}
    short: dict[str, str] = {}
    ambiguous: set[str] = set()
    for rel in images:
        for key in (rel.rsplit("/", 1)[-1], os.path.splitext(rel)[0].rsplit("/", 1)[-1]):
            if short.setdefault(key, rel) != rel:
                ambiguous.add(key)
    keys = {k: v for k, v in short.items() if k not in ambiguous}
    keys.update(full)  # a relative path always wins over a bare name
    return keys


# ---------------------------------------------------------------------------------------------- manifest

MANIFEST_FORMAT = "feature-cache manifest"
MANIFEST_VERSION = 1


def manifest_path(out: Path) -> Path:
    """Where `python -m pipeline slurm` lists DATA for the cache `out` (the merged name): hidden, beside it."""
    return out.with_name(f".{out.name}.manifest.jsonl")


def manifest_source(data: str, labels: str | None, path_column: str | None, label_column: str | None,
                    augment: int) -> dict[str, object]:
    """The flags a listing depends on, as given: a task reading a manifest must have been given the same."""
    return {"data": str(data), "labels": labels, "path_column": path_column, "label_column": label_column,
            "augment": augment}


def write_manifest(path: Path, catalog: Catalog, source: dict[str, object]) -> str:
    """List `catalog` (as `discover` returns it, one entry per file) into the manifest `path`; returns the fingerprint
    of its rows (`catalog.with_views(augment)`), which the manifest records for every task.

    The file is line-oriented, written to a temporary name and renamed, so a task reading the previous one is never
    cut short: line 1 is a JSON header (the flags it was listed for, the data root, layout, label names, notes, counts,
    fingerprint); then one fixed-width index line per file plus one, `<byte offset of its entry> <its first row>`
    zero-padded to `index_width` digits, so a task finds its rows with a binary search of a few seeks; then one JSON
    array per file `[path, size, mtime_ns, label, split]` (tar samples add `shard, offset, size` of the image), sorted
    as the rows of the cache; then the entries left out, `[path, reason]`, which only shard 0 reads."""
    augment = int(source["augment"])
    has_splits = any(catalog.splits)
    counts = catalog.view_counts(augment, has_splits)
    lines = []
    for rel, label, split, (size, mtime) in zip(catalog.paths, catalog.labels, catalog.splits, catalog.stamps):
        entry = [rel, size, mtime, label, split]
        member = catalog.members.get(rel)
        if member is not None:
            entry += [member.shard.name, member.offset, member.size]
        lines.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
    offsets = [0, *itertools.accumulate(len(line) for line in lines)]
    firsts = [0, *itertools.accumulate(counts)]
    width = max(len(str(offsets[-1])), len(str(firsts[-1])))
    fingerprint = catalog.with_views(augment).fingerprint()
    header = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source, "root": str(catalog.root),
              "layout": catalog.layout, "label_names": catalog.label_names, "notes": list(catalog.notes),
              "has_splits": has_splits, "files": len(catalog), "rows": firsts[-1], "fingerprint": fingerprint,
              "ignored": len(catalog.ignored), "index_width": width}
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
            f.write(b"".join(f"{o:0{width}d} {r:0{width}d}\n".encode() for o, r in zip(offsets, firsts)))
            f.writelines(lines)
            f.write(b"".join(json.dumps(list(item)).encode() + b"\n" for item in catalog.ignored))
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # not there when nothing was written (a name too long, a folder not made)
            tmp.unlink()
        raise UsageError(f"the manifest '{path}' cannot be written ({err.strerror or err}). Expected a writable "
                         "folder beside the cache; free space or choose another --out.") from None
    return fingerprint


class _Index:
    """The fixed-width index lines of an open manifest, as a sequence of (entry offset, first row), read on access:
    `bisect` reads O(log files) of them."""

    def __init__(self, file, at: int, width: int, count: int):
        self.file, self.at, self.width, self.count = file, at, width, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, f: int) -> tuple[int, int]:
        step = 2 * self.width + 2
        self.file.seek(self.at + f * step)
        line = self.file.read(step)
        return int(line[: self.width]), int(line[self.width + 1 : 2 * self.width + 1])


def read_manifest(path: str | Path, shard: tuple[int, int] | None, source: dict[str, object]) -> tuple[Catalog, str]:
    """Shard `shard` (None: all) of the rows listed in the manifest `path`, as `discover(...).with_views(augment)`
    then `.shard(*shard)` would give them, and the whole set's fingerprint; reads the header, a few index lines and
    the shard's own entries (shard 0 also the entries left out), and stats only the shard's own files.

    A file whose size or modification time differs from the listing, or that is gone, stops the task in one line:
    every task of one job must extract the same listing (the shards' fingerprint says which), so a task cannot
    update on its own; a new submission lists DATA again, and shards already written are then updated."""
    path = Path(path)
    again = ("Leave out --manifest to list DATA here, or submit again (`python -m pipeline slurm`), which lists it "
             "anew.")
    try:
        file = open(path, "rb")
    except OSError as err:
        raise UsageError(f"manifest '{path}' cannot be read ({err.strerror}). Expected the listing of DATA that "
                         f"`python -m pipeline slurm` writes beside the cache. {again}") from None
    with file:
        try:
            head = file.readline()
            header = json.loads(head)
            if header.get("format") != MANIFEST_FORMAT or header.get("version") != MANIFEST_VERSION:
                raise ValueError
            width, files, rows = int(header["index_width"]), int(header["files"]), int(header["rows"])
        except (ValueError, TypeError, KeyError, AttributeError):
            raise UsageError(f"'{path}' is not a manifest of this version (expected a header line with format "
                             f"'{MANIFEST_FORMAT}', version {MANIFEST_VERSION}). {again}") from None
        for key, given in source.items():
            listed = header["source"].get(key)
            if listed != given:
                raise UsageError(f"manifest '{path}' lists DATA for --{key.replace('_', '-')} {listed!r}, not "
                                 f"{given!r}: it was written for another extraction. Pass the flags it was written "
                                 "for, or leave out --manifest to list DATA here.")
        index = _Index(file, len(head), width, files + 1)
        records_at = len(head) + (files + 1) * (2 * width + 2)
        lo, hi = (rows * shard[0] // shard[1], rows * (shard[0] + 1) // shard[1]) if shard else (0, rows)
        first_file = bisect.bisect_right(index, lo, 0, files, key=lambda e: e[1]) - 1
        last_file = bisect.bisect_left(index, hi, first_file, files, key=lambda e: e[1])
        (start, first_row), (stop, _) = index[first_file], index[last_file]
        file.seek(records_at + start)
        entries = [json.loads(line) for line in file.read(stop - start).splitlines()]
        ignored = []
        if not shard or shard[0] == 0:
            file.seek(records_at + index[files][0])
            ignored = [tuple(item) for item in map(json.loads, file.read().splitlines())]
    root = Path(header["root"])
    stamps = [(int(e[1]), int(e[2])) for e in entries]
    members = _manifest_members(path, root, entries)
    _check_listed(path, root, entries, members)
    catalog = Catalog(root, [e[0] for e in entries], [int(e[3]) for e in entries], [e[4] for e in entries],
                      header["label_names"], header["layout"], ignored, notes=tuple(header["notes"]),
                      members=members, file_stamps=stamps)
    catalog = catalog.with_views(int(header["source"]["augment"]), bool(header["has_splits"]))
    a = lo - first_row
    catalog = dataclasses.replace(
        catalog, paths=catalog.paths[a : a + hi - lo], labels=catalog.labels[a : a + hi - lo],
        splits=catalog.splits[a : a + hi - lo], views=catalog.views[a : a + hi - lo],
        file_stamps=catalog.file_stamps[a : a + hi - lo], offset=lo)
    return catalog, header["fingerprint"]


def _manifest_members(path: Path, root: Path, entries: list[list]) -> dict[str, tars.Member]:
    """Where the listed tar samples lie: each shard stat'ed once (the descriptor a loader opens is checked against
    it), its stamp compared with the listing's."""
    shards: dict[str, tars.Shard] = {}
    members = {}
    for e in entries:
        if len(e) < 8:
            continue
        shard = shards.get(e[5])
        if shard is None:
            try:
                st = os.stat(root / e[5])
            except OSError as err:
                raise _changed(path, e[5], f"cannot be read ({err.strerror})") from None
            if (st.st_size, st.st_mtime_ns) != (int(e[1]), int(e[2])):
                raise _changed(path, e[5], "has another size or modification time")
            shard = shards[e[5]] = tars.Shard((root / e[5]).absolute(), e[5], st)
        members[e[0]] = tars.Member(shard, int(e[6]), int(e[7]))
    return members


def _check_listed(path: Path, root: Path, entries: list[list], members: dict[str, tars.Member]) -> None:
    """Each listed file of this shard (tar samples: their shard, checked when indexed) is as the listing says."""
    changed = []
    for e in entries:
        if e[0] in members:
            continue
        try:
            st = os.stat(root / e[0])
        except OSError as err:
            changed.append((e[0], "is gone" if isinstance(err, FileNotFoundError) else
                            f"cannot be read ({err.strerror})"))
            continue
        if (st.st_size, st.st_mtime_ns) != (int(e[1]), int(e[2])):
            changed.append((e[0], "has another size or modification time"))
    if changed:
        more = f" (and {len(changed) - 1} more of this shard's files)" if len(changed) > 1 else ""
        raise _changed(path, changed[0][0], changed[0][1] + more)


def _changed(path: Path, rel: str, what: str) -> UsageError:
    return UsageError(f"DATA changed since the manifest '{path}' was written: '{rel}' {what}. Every task of one job "
                      "extracts the same listing, so this one stops; submit the job again (`python -m pipeline slurm` "
                      "with the same flags), which lists DATA anew: shards already written are then updated, "
                      "recomputing only new or changed files.")
