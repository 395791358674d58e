"""Find the images under DATA and their labels and splits, for the three layouts users have.

(a) DATA/<class>/*.jpg; (b) DATA/<train|val|test...>/<class>/*.jpg, the split kept per image;
(c) DATA/**/*.jpg plus a labels CSV. Unlabelled folders are allowed (label -1), for prediction later.
In (a) and (b) the label is the folder an image lies in *as seen from DATA* (its first, or for (b) second, path
component); links are walked so that this can never relabel an image (see `_walk_files`). Nothing is guessed: a
CSV's columns are recognised by name (or given), and an image listed twice with different labels is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from features.errors import UsageError
from features.images import IMAGE_EXTENSIONS

SPLIT_PREFIXES = ("train", "val", "test")
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path", "image_id", "img", "id", "name")
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

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def stamps(self) -> list[tuple[int, int]]:
        """(size, mtime_ns) of each candidate's file: how an update tells an unchanged file from a changed one."""
        stats = {rel: (self.root / rel).stat() for rel in dict.fromkeys(self.paths)}
        return [(stats[rel].st_size, stats[rel].st_mtime_ns) for rel in self.paths]

    def fingerprint(self) -> str:
        """Identity of the input set: names, sizes, modification times and labels of every candidate."""
        h = hashlib.sha256()
        for i, (rel, label, split) in enumerate(zip(self.paths, self.labels, self.splits)):
            size, mtime = self.stamps[i]
            view = f"\0{self.views[i]}" if self.views and self.views[i] else ""
            h.update(f"{rel}\0{size}\0{mtime}\0{label}\0{split}{view}\n".encode())
        h.update("\0".join(self.label_names).encode())
        return h.hexdigest()

    def subset(self, indices: list[int]) -> "Catalog":
        """The candidates at `indices` (in that order), as a catalog of their own: what an update still computes."""
        return dataclasses.replace(
            self, paths=[self.paths[i] for i in indices], labels=[self.labels[i] for i in indices],
            splits=[self.splits[i] for i in indices], views=[self.views[i] for i in indices], offset=0)

    def shard(self, index: int, count: int) -> "Catalog":
        """Contiguous block `index` of `count`, balanced by count; concatenating the blocks restores the order."""
        lo, hi = len(self) * index // count, len(self) * (index + 1) // count
        return dataclasses.replace(
            self, paths=self.paths[lo:hi], labels=self.labels[lo:hi], splits=self.splits[lo:hi],
            views=self.views[lo:hi], ignored=self.ignored if index == 0 else [], offset=self.offset + lo)

    def with_views(self, k: int) -> "Catalog":
        """Rows of the cache: each training image followed by its k augmented views; evaluation splits and
        unlabelled images keep their clean view only. Without splits every labelled image is a training image."""
        has_splits = any(self.splits)
        rows = [(i, v) for i in range(len(self))
                for v in range(k + 1 if self.labels[i] >= 0 and (self.splits[i] == "train" or not has_splits) else 1)]
        return dataclasses.replace(
            self, paths=[self.paths[i] for i, _ in rows], labels=[self.labels[i] for i, _ in rows],
            splits=[self.splits[i] for i, _ in rows], views=[v for _, v in rows])


def _walk_files(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files (relative, sorted) and other visible files, recursively; hidden files and folders are ignored.

    Directory links are followed once each, so a loop (`ants/up -> ..`) cannot multiply the images: every real
    folder is walked at most once (a seen-set of (device, inode)), and a link that leads back inside DATA is
    skipped because its target is catalogued at its own place, under its own label. Skipped links are reported.
    """
    images, others = [], []
    real_root = root.resolve()
    start = root.stat()
    seen = {(start.st_dev, start.st_ino)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            sub = Path(dirpath, name)
            st = sub.stat()
            target = sub.resolve()
            rel = sub.relative_to(root).as_posix()
            if (st.st_dev, st.st_ino) in seen:
                others.append((rel + "/", f"a link to the folder '{target}', which is already catalogued; skipped"))
            elif sub.is_symlink() and (target == real_root or real_root in target.parents):
                others.append((rel + "/", f"a link back into DATA ('{target.relative_to(real_root).as_posix() or '.'}'"
                                          "), catalogued at its own place; skipped"))
            else:
                seen.add((st.st_dev, st.st_ino))
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(rel)
            else:
                others.append((rel, f"not an image file type ({Path(name).suffix or 'no extension'})"))
    return sorted(images), sorted(others)


def _split_of(top: str) -> str:
    lower = top.lower()
    return next((s for s in SPLIT_PREFIXES if lower.startswith(s)), "")


def discover(
    data: str | Path, labels_csv: str | None = None, path_column: str | None = None, label_column: str | None = None
) -> Catalog:
    root = Path(data)
    if not root.exists():
        raise UsageError(f"DATA folder '{data}' does not exist. Expected a folder of images (class sub-folders, "
                         "split sub-folders, or images plus LABELS=labels.csv).")
    if not root.is_dir():
        raise UsageError(f"DATA '{data}' is a file, expected a folder of images.")
    images, others = _walk_files(root)
    if labels_csv:
        others = [o for o in others if (root / o[0]).resolve() != Path(labels_csv).resolve()]
    if not images:
        raise UsageError(f"DATA folder '{data}' holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                         "recursively).")
    if labels_csv:
        return _from_csv(root, images, others, labels_csv, path_column, label_column)
    return _from_folders(root, images, others)


def _from_folders(root: Path, images: list[str], others: list[tuple[str, str]]) -> Catalog:
    tops = {p.split("/")[0] for p in images if "/" in p}
    by_split = bool(tops) and all(_split_of(t) for t in tops)
    class_of: list[str] = []
    splits: list[str] = []
    for rel in images:
        parts = rel.split("/")
        if by_split:
            splits.append(_split_of(parts[0]))
            class_of.append(parts[1] if len(parts) > 2 else "")
        else:
            splits.append("")
            class_of.append(parts[0] if len(parts) > 1 else "")
    names = sorted({c for c in class_of if c})
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
              path_column: str | None, label_column: str | None) -> Catalog:
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
    lcol = _pick_column(columns, label_column, LABEL_COLUMNS, "label", csv)
    if pcol == lcol:
        raise UsageError(f"labels CSV '{csv}': path and label column are both '{pcol}'; "
                         "set --path-column and --label-column.")
    scol = next((c for c in columns if c.lower().strip() == "split"), None)
    keys = _image_keys(images)
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
    splits = [split_of.get(rel, "") for rel in images]
    ignored = others + [(u, "listed in the labels CSV but not found under DATA") for u in unknown]
    return Catalog(root, images, labels, splits, names, "csv", ignored)


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
