"""Join the shards of one extraction into one cache with the same rows, values and attributes as a one-process run.

Shard I/N of the extraction whose cache is `X.h5` is `X.shardI-of-N.h5` (`pipeline.config.shard_out`). Shards hold
contiguous blocks of the sorted candidate list (`Catalog.shard`), so concatenating them in index order restores the
unsharded row order, and their `skipped` lists concatenate the same way. Every shard records the fingerprint of the
whole input set, so shards of different extractions (other data, weights, layers, ...) are refused.

`virtual=True` writes HDF5 virtual datasets for `features/*` (zero copy: reads go to the shard files, which must stay
where they are); the small per-row datasets are always copied.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path

from features.errors import UsageError
from features.schema import PER_SHARD, ROLES, CacheAttrs, ConfigMismatch, IncompleteCache, identity_diff, names
from features.store import CacheWriter, Progress, concatenation, copy_rows, existing_cache, open_cache, partial_path, read_attrs
from pipeline.config import ExtractConfig, default_out, shard_out

OPEN_FILES_RESERVE = 64  # files a process keeps open besides a virtual merge's shards (libraries, the cache itself)
SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]+)$")


@dataclass
class MergeResult:
    path: Path
    status: str  # written | up-to-date
    shards: list[Path] = field(default_factory=list)
    images: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    virtual: bool = False
    note: str = ""  # e.g. why a virtual merge was written as a copy
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def merged_out(cfg: ExtractConfig) -> Path:
    """Where the merged cache of `cfg`'s sharded extraction goes: --out, else the default name (no model is built)."""
    if cfg.out:
        return Path(cfg.out)
    layers = cfg.layer
    if not layers:
        from features.backbones import get_backbone  # imports TensorFlow: only when the layer must be looked up

        spec = get_backbone(cfg.backbone, cfg.preprocess)
        if spec.default_layer is None:
            raise UsageError(f"backbone '{cfg.backbone}' has no default layer recorded; name it with --layer (LAYER=) "
                             "or give --out, so that every shard and the merge agree on the file names.")
        layers = [spec.default_layer]
    return default_out(cfg, layers, None)


def find_shards(shards_of: Path) -> tuple[Path, list[Path]]:
    """(merged path, shard paths in index order) for the extraction whose merged cache or one of whose shards is given.

    Refuses mixed shard counts and reports every missing index at once.
    """
    named = SHARD_NAME.match(shards_of.name)
    merged = shards_of.with_name(named["stem"] + named["suffix"]) if named else shards_of
    found: dict[int, dict[int, Path]] = {}
    pattern = f"{glob.escape(merged.stem)}.shard*-of-*{glob.escape(merged.suffix)}"
    published = list(merged.parent.glob(pattern))
    unfinished = [p.with_name(p.name[1:-len(".partial")]) for p in merged.parent.glob(f".{pattern}.partial")]
    for path in published + unfinished:  # an unfinished shard is reported by check_shards, not as missing
        m = SHARD_NAME.match(path.name)
        if m and m["stem"] == merged.stem and m["suffix"] == merged.suffix:
            found.setdefault(int(m["count"]), {})[int(m["index"])] = path
    if not found:
        raise UsageError(f"no shards of '{merged}' found. Expected files named "
                         f"{shard_out(merged, (0, 2)).name}, {shard_out(merged, (1, 2)).name}, ... beside it "
                         "(written by 'extract --shard I/N' or a SLURM array).")
    if len(found) > 1:
        sets = "; ".join(f"{n} shards: {', '.join(p.name for _, p in sorted(s.items()))}" for n, s in sorted(found.items()))
        raise UsageError(f"shards of '{merged}' come from runs with different shard counts ({sets}). "
                         "Delete the stale set and merge again.")
    count, shards = next(iter(found.items()))
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise UsageError(f"cannot merge '{merged}': shard(s) {', '.join(map(str, missing))} of {count} missing "
                         f"(expected {', '.join(shard_out(merged, (i, count)).name for i in missing)}). "
                         f"Run them (extract --shard I/{count}, or resubmit those array tasks), then merge again.")
    return merged, [shards[i] for i in range(count)]


def check_shards(shards: list[Path]) -> list[CacheAttrs]:
    """Root attributes of every shard, after checking that each is complete, is the shard its name says, and shares
    one configuration with shard 0. All incomplete shards are reported together, by index."""
    count = len(shards)
    attrs = [existing_cache(p) for p in shards]
    incomplete = []
    for i, (path, a) in enumerate(zip(shards, attrs)):
        if a is None or not a.complete:  # an unfinished shard is still under its partial name
            started = a or read_attrs(partial_path(path))
            progress = Progress.load(path)
            done = (f"{progress.files_done} of {started.num_candidates if started else '?'} files done" if progress
                    else "no progress record")
            incomplete.append(f"{i} ({path.name}: {done})")
    if incomplete:
        raise IncompleteCache(f"cannot merge: shard(s) {'; '.join(incomplete)} of {count} incomplete. Rerun or "
                              "resubmit those shard tasks with the same flags (they resume where they stopped), then "
                              "merge again.")
    for i, (path, a) in enumerate(zip(shards, attrs)):
        if a.shard != f"{i}/{count}":
            raise UsageError(f"{path} holds shard '{a.shard}', but its name says {i}/{count}. "
                             "Rename it back or rerun that shard.")
        differ = identity_diff(attrs[0], a, ROLES, ignore=names(PER_SHARD))
        if differ:
            raise ConfigMismatch(f"shard {i} ({path.name}) was made with a different configuration than shard 0 "
                                 f"({'; '.join(differ[:4])}). Shards of one extraction must share every flag but "
                                 f"--shard; rerun shard {i} with shard 0's flags (--overwrite), then merge again.")
    return attrs


def merged_attrs(attrs: list[CacheAttrs]) -> CacheAttrs:
    """Shard 0's attributes as a one-process run would have written them: no shard, all candidates."""
    config = json.loads(attrs[0].config_json)
    config["shard"] = None
    return dataclasses.replace(attrs[0], shard="", num_candidates=sum(a.num_candidates for a in attrs),
                               config_json=json.dumps(config))


def merge(shards_of: str | Path, out: str | Path | None = None, virtual: bool = False,
          overwrite: bool = False) -> MergeResult:
    """Merge every shard of one extraction into `out` (default: the unsharded name; never one of the shards, which
    `--overwrite` would replace) and return what was written."""
    merged, shards = find_shards(Path(shards_of))
    out = Path(out) if out else merged
    for i, shard in enumerate(shards):  # resolved or same inode: another spelling or a link is the same file
        if out.resolve() == shard.resolve() or (out.exists() and shard.exists() and out.samefile(shard)):
            raise UsageError(f"--out '{out}' is shard {i} of {len(shards)} ('{shard}'), an input of this merge; "
                             f"writing there would destroy it. Choose another --out, e.g. the default '{merged}'.")
    attrs = check_shards(shards)
    wanted = merged_attrs(attrs)
    existing = None if overwrite else existing_cache(out)  # the writer refuses a foreign file at `out` in any case
    if existing is not None:
        diff = identity_diff(existing, wanted)
        if diff:
            raise ConfigMismatch(f"{out} exists with a different configuration ({'; '.join(diff[:4])}). "
                                 "Pass --overwrite to replace it, or choose another --out.")
        if existing.complete:
            return MergeResult(out, "up-to-date", shards, existing.num_images, virtual=virtual)
    note = ""
    if virtual and len(shards) + OPEN_FILES_RESERVE > open_file_limit():
        virtual, note = False, (f"copied instead of virtual: reading {len(shards)} shards at once needs more open files "
                                f"than the limit of {open_file_limit()} here (ulimit -n)")
    return dataclasses.replace(_write(out, shards, attrs, wanted, virtual), note=note)


def open_file_limit() -> int:
    """The soft limit on open files of this process (what a reader of a virtual merge needs for its shards)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _write(out: Path, shards: list[Path], attrs: list[CacheAttrs], wanted: CacheAttrs, virtual: bool) -> MergeResult:
    """Write the merged cache (under its partial name, published at `out` once complete: never half-written)."""
    sources = [open_cache(shard) for shard in shards]
    first = sources[0]
    layers = wanted.layers
    shapes = {layer: first.shapes[layer] for layer in layers}
    paths = [p for source in sources for p in source.paths.tolist()]
    skipped = [list(item) for source in sources for item in source.skipped]
    width = max(source.path_bytes for source in sources)
    # One extra blank row as wide as the widest shard's paths: each shard (like a one-process run) sized its `paths`
    # strings over all its candidates, skipped ones included; finalize() trims the extra row.
    writer = CacheWriter.create(out, wanted, {} if virtual else shapes, paths + [" " * width], first.label_names)
    try:
        if virtual:
            writer.link_features(*concatenation(sources), shapes, {layer: first.dtypes[layer] for layer in layers})
        start = 0
        for source in sources:
            start = copy_rows(source, writer, start)
        writer.finalize(Progress(rows_written=len(paths), files_done=wanted.num_candidates, skipped=skipped),
                        created=min(a.created for a in attrs))
    finally:
        writer.close()
    return MergeResult(out, "written", shards, len(paths), skipped, virtual, layer_shapes=shapes)
