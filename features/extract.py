"""The stage-one engine room: the decode -> model -> write loop (the forward pass itself is `features.engines`).

Decoding runs in a thread pool ahead of the model, HDF5 writes in a thread behind it; the model runs as one compiled
function on fixed-shape batches in which every image's slot is its index in the whole set modulo the batch size, so each
image is computed identically (by a given engine) whether the run is interrupted and resumed, sharded, or not.
`pipeline.extraction` resolves the configuration and decides what to run; this module only runs it.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from features.augment import file_loader
from features.catalog import Catalog
from features.engines import Forward
from features.images import CROP_FRACTION, MAX_PIXELS, decode_stream
from features.store import CacheWriter, Progress


@dataclass
class Timings:
    decode_cpu_s: float = 0.0  # summed over decoder threads
    wait_input_s: float = 0.0  # time the model loop waited for decoded images
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0


@dataclass(frozen=True)
class Decoding:
    """How each candidate becomes pixels: the model input side, resize policy, augmentation, decoder threads, and the
    largest image decoded."""

    size: int
    resize: str = "crop"
    augment_policy: str = "standard"
    seed: int = 0
    workers: int = 1
    max_pixels: int = MAX_PIXELS  # larger images are skipped from their header, never decoded
    crop_fraction: float = CROP_FRACTION  # the backbone's data config: the centre crop's share of the short side


def extract_rows(catalog: Catalog, forward: Forward, writer: CacheWriter, progress: Progress, batch_size: int,
                 decoding: Decoding, verbose: bool = True) -> tuple[int, Timings]:
    """Push candidates progress.files_done.. through `forward` into `writer`, saving `progress` after every flushed
    batch (its counters; the files skipped in the batch are appended to its log, see `Progress`); then finalize the
    file. Returns the images pushed through the model in this call, and where time went."""
    t = Timings()
    start = time.perf_counter()
    size = decoding.size
    views = {v: file_loader(size, decoding.resize, decoding.crop_fraction, decoding.augment_policy, decoding.seed, v,
                            decoding.max_pixels)
             for v in set(catalog.views)}

    def load(i: int) -> np.ndarray:
        return views[catalog.views[i]](catalog.paths[i], catalog.source(i))  # a file, or an image in a tar

    todo = ((i, i) for i in range(progress.files_done, len(catalog)))
    stream = decode_stream(todo, load, decoding.workers, lookahead=3 * batch_size)
    batch_rows: list[int] = []
    batch = np.zeros((batch_size, size, size, 3), "uint8")
    pending_skips: list[tuple[int, str, str]] = []  # (candidate index, path, reason) since the last flush
    processed = 0
    bar = tqdm(total=len(catalog), initial=progress.files_done, unit="img", desc="extract", disable=not verbose,
               dynamic_ncols=True)

    def slot(i: int) -> int:
        """Candidate i's place in its batch follows its index in the whole set, so a shard puts every image where a
        one-process run does: outputs depend on the place (on CPU the last one differs by ~1e-6), merges stay exact."""
        return (catalog.offset + i) % batch_size

    def commit(row: int, feats: list[np.ndarray], rows: list[int], done: Progress,
               skips: list[tuple[int, str, str]]) -> None:
        t0 = time.perf_counter()
        if rows:
            writer.write(row, feats, [catalog.paths[i] for i in rows], [catalog.labels[i] for i in rows],
                         [catalog.splits[i] for i in rows], [catalog.views[i] for i in rows],
                         [catalog.stamps[i] for i in rows])
        Progress.append_log(writer.path, skips)  # entries past the saved files_done are dropped on resume
        done.save(writer.path)  # only after the rows it counts are flushed to disk
        t.write_s += time.perf_counter() - t0

    progress.start_log(writer.path)  # exactly the skipped files counted so far: O(skipped), once per run
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_pool, bar:
        in_flight: Future | None = None

        def flush(files_done: int) -> None:
            nonlocal processed, in_flight
            n = len(batch_rows)
            feats = []
            if n:
                t0 = time.perf_counter()
                feats = [o[[slot(i) for i in batch_rows]] for o in forward(batch)]
                batch[:] = 0  # unused slots are zeros whether or not the run was resumed
                t.model_s += time.perf_counter() - t0
            if in_flight is not None:
                in_flight.result()  # one batch in flight: memory stays bounded, errors surface here
            row = progress.rows_written
            progress.rows_written += n
            progress.files_done = files_done
            progress.skipped.extend([path, reason] for _, path, reason in pending_skips)
            snapshot = Progress(progress.rows_written, files_done)  # counters only: O(1) per batch
            in_flight = write_pool.submit(commit, row, feats, list(batch_rows), snapshot, list(pending_skips))
            processed += n
            batch_rows.clear()
            pending_skips.clear()

        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            t.wait_input_s += time.perf_counter() - t0
            if item is None:
                break
            t.decode_cpu_s += item.seconds
            if item.pixels is None:
                if catalog.views[item.index] == 0:  # a file's augmented views fail with it: record it once
                    pending_skips.append((item.index, catalog.paths[item.index], item.reason))
            else:
                batch[slot(item.index)] = item.pixels
                batch_rows.append(item.index)
            if slot(item.index) == batch_size - 1:
                flush(item.index + 1)
            bar.update(1)
            bar.set_postfix(skipped=len(progress.skipped) + len(pending_skips), refresh=False)
        flush(len(catalog))
        in_flight.result()
    writer.finalize(progress)
    Progress.log_path(writer.path).unlink(missing_ok=True)  # published (or discarded): the log is done with
    t.wall_s = time.perf_counter() - start
    return processed, t
