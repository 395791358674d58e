"""`python -m pipeline merge --shards-of cache/X.h5`: join X.shard*-of-N.h5 into X.h5 (or --out)."""
from __future__ import annotations

import argparse

from pipeline.merge import MergeResult, merge


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards-of", required=True,
                   help="the merged cache's path (cache/X.h5) or any one shard of it (cache/X.shard0-of-4.h5)")
    p.add_argument("--out", default=None, help="merged .h5; default: the shards' name without .shardI-of-N")
    p.add_argument("--virtual", action="store_true",
                   help="zero copy: features/* become HDF5 virtual datasets reading the shard files (keep them in place)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache of another configuration")


def describe(r: MergeResult) -> str:
    if r.status == "up-to-date":
        return f"up to date: {r.path} is complete for these {len(r.shards)} shards; nothing to do (--overwrite rebuilds it)."
    how = "virtual (features read from the shard files; keep them in place)" if r.virtual else r.note or "copied"
    return (f"{r.status}: {r.path} from {len(r.shards)} shards ({r.shards[0].name} ...), {how}\n"
            f"images: {r.images} rows, {len(r.skipped)} skipped")


def run(args: argparse.Namespace) -> int:
    print(describe(merge(args.shards_of, args.out, args.virtual, args.overwrite)))
    return 0
