"""Run the benchmark sections and write results.md / results.csv / PNG plots.

    python -m benchmarks                      # every section (about two hours on 2 cores), into benchmarks/
    python -m benchmarks --sections 1,3       # some of them
    python -m benchmarks --quick --out /tmp/b # the smoke version (tiny inputs), used by tests/test_bench.py
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, Section, Sizes, find_sources, fmt, machine_facts
from benchmarks.report import plot_sections, write_csv, write_markdown

ALL_SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def parse_sections(text: str | None) -> list[int]:
    if not text or text == "all":
        return list(ALL_SECTIONS)
    try:
        wanted = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        wanted = [-1]
    if not wanted or any(n not in ALL_SECTIONS for n in wanted):
        raise ValueError(f"sections '{text}' is not valid. Expected comma-separated numbers from {ALL_SECTIONS[0]} to "
                         f"{ALL_SECTIONS[-1]}, e.g. 1,3.")
    return wanted


def parse_scale_images(text: str | None) -> tuple[int, ...] | None:
    """--scale-images '10000,100000' -> (10000, 100000); None when not given."""
    if not text:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or list(sizes) != sorted(set(sizes)) or sizes[0] < 20:
        raise ValueError(f"scale-images '{text}' is not valid. Expected at least two ascending numbers of images "
                         "(>= 20), comma-separated, e.g. 10000,100000,300000.")
    return sizes


def run_sections(numbers: list[int], sizes: Sizes, work: Path, log, strict: bool = False,
                 on_section=None) -> tuple[list[Section], object]:
    from benchmarks.engines import section_engines
    from benchmarks.heads import section_heads_vs_training, section_scaling
    from benchmarks.scale import section_scale
    from benchmarks.storage import section_memory, section_storage
    from benchmarks.throughput import section_gpu, section_input_pipeline, section_steady
    from benchmarks.update import section_update

    sources = find_sources(sizes.full_size_images)
    children: dict = {}  # child-process records shared by sections 2 and 3 (same runs are not repeated)
    runners = {
        1: lambda: section_input_pipeline(sizes, sources, work, log),
        2: lambda: section_steady(sizes, sources, work, log, children),
        3: lambda: section_memory(sizes, sources, work, log, children),
        4: lambda: section_storage(sizes, sources, work, log),
        5: lambda: section_heads_vs_training(sizes, sources, work, log),
        6: lambda: section_scaling(sizes, log),
        7: lambda: section_gpu(sizes, sources, work, log),
        8: lambda: section_update(sizes, sources, work, log),
        9: lambda: section_engines(sizes, sources, work, log),
        10: lambda: section_scale(sizes.scale_images, work, log, sizes.scale_tiny_shards),
    }
    out = []
    for n in numbers:
        start = time.perf_counter()
        try:
            sec = runners[n]()
        except Exception as err:  # one broken section must not lose the others' figures; the error is reported
            if strict:
                raise
            log(f"section {n} failed: {type(err).__name__}: {err}")
            sec = Section(n, f"(failed) section {n}", "see the error below", [], met=None, value="failed")
            sec.notes.append(f"This section failed: `{type(err).__name__}: {str(err).splitlines()[0][:300]}`")
        sec.notes.append(f"Section run time: {time.perf_counter() - start:.0f} s.")
        out.append(sec)
        if on_section:
            on_section(out, sources)
    return out, sources


def profile_notes(sections: list[Section]) -> list[str]:
    """Which stage is the bottleneck, from section 1's per-image costs."""
    s1 = next((s for s in sections if s.number == 1), None)
    if s1 is None:
        return []
    cores = len(os.sched_getaffinity(0))
    notes = []
    for r in s1.rows:
        costs = {"decode (read + JPEG decode)": r["decode_ms"], "resize + crop + RGB flip": r["resize_ms"],
                 "host → tensor copy": r["to_tensor_ms"], "model": r["model_ms"], "HDF5 write": r["write_ms"]}
        total = sum(costs.values())
        biggest = max(costs, key=costs.get)
        shares = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in costs.items())
        notes.append(f"{r['model']}: CPU time per image {total:.1f} ms = {shares}. Bottleneck: **{biggest}**. "
                     f"End-to-end, the model loop waited {r['wait_input_s']:.2f} s of {r['wall_s']:.1f} s for input; "
                     f"decoding used {r['decode_cpu_s']:.1f} CPU-s ({100 * r['decode_cpu_s'] / (r['wall_s'] * cores):.1f}% "
                     f"of {cores} cores).")
    return notes


def explanations(sections: list[Section]) -> dict[int, str]:
    by = {s.number: s for s in sections}
    out: dict[int, str] = {}
    if 1 in by:
        rows = by[1].rows
        out[1] = ("Decoding runs in a thread pool ahead of the model and writing overlaps the next batch, so "
                  "end-to-end loses only the CPU time decoding takes away from the model on the same cores: at "
                  + ", ".join(f"{fmt(r['decode_img_s_per_core'])} img/s per core for decode vs "
                              f"{fmt(r['model_only_img_s'])} img/s for {r['model']}" for r in rows)
                  + ". The Keras peer decodes with tf.data (also parallel) but resizes by stretching and keeps all "
                    "features in memory until `predict` returns. `vs_tf_model_only` is end-to-end over TensorFlow's "
                    "compiled model-only rate: above 1 where the engine `auto` chose (ONNX Runtime) is faster.")
    if 2 in by:
        out[2] = ("Each figure is a whole process's steady rate: what a user waits for per extra image, decoding, "
                  "model and writing included, start-up excluded. Ours runs with each engine and by default (`auto`, "
                  "which timed both engines once and keeps the faster, docs/engines.md); it is ahead of the Keras "
                  "peer by decoding JPEGs at a reduced DCT scale, overlapping decoding with the model and the "
                  "engine. The naive loop calls `predict` once per image; the Keras peer batches through tf.data "
                  "but keeps every feature in memory until it saves (peak RSS table). The CPU-time limit bounds "
                  "any pipeline made of these decode, resize and model steps on this machine.")
    if 3 in by:
        out[3] = ("The features of a batch go to disk as soon as they are computed; what is resident is the model, "
                  "one input batch, one output batch, the decode look-ahead (3 batches of uint8 pixels) and the "
                  "HDF5 chunk cache (1 MiB per dataset), none of which depends on the number of images.")
    if 4 in by:
        rows = by[4].rows
        f16 = [r["vs_float32"] for r in rows if r["storage"] == "float16"]
        lzf = {r["layer"]: r["vs_float32"] for r in rows if r["storage"] == "float32+lzf"}
        chunks = by[4].extra_tables[0][2] if by[4].extra_tables else []
        text = (f"float16 stores {min(f16):.2f}–{max(f16):.2f}× the bytes of float32 (above 0.5 only where whole "
                "chunks are allocated beyond the last row). LZF alone (float32+lzf) ranges from "
                + ", ".join(f"{k} {v:.2f}×" for k, v in lzf.items())
                + ": it pays off only on sparse post-ReLU maps and costs write speed. ")
        if chunks:
            best = max(chunks, key=lambda r: r["shuffled_read_mb_s"])
            text += ("Chunk shape: " + "; ".join(f"{r['chunk']}: write {fmt(r['write_mb_s'])}, read "
                                                 f"{fmt(r['read_mb_s'])}, shuffled {fmt(r['shuffled_read_mb_s'])} MB/s"
                                                 for r in chunks)
                     + f". The fastest shuffled read is '{best['chunk']}'. Chunked layouts are needed for resizing "
                       "(resume, merge) and compression; among them, whole rows up to 1 MiB are the compromise "
                       "between per-chunk overhead (1 row) and reading unneeded rows (large chunks). Shuffled "
                       "batch reads through h5py fancy indexing are far slower than whole reads, so stage two "
                       "should read whole blocks of rows and shuffle in memory.")
        out[4] = text
    if 5 in by:
        out[5] = ("One end-to-end epoch pushes every training image through the base; the heads only see the "
                  "cached 1,280-d vectors, so all of them with their grid searches cost a fraction of one epoch. "
                  "The cache is paid for once (its extraction time is in the table) and reused by every head and "
                  "every later `make classify`.")
    if 6 in by:
        rows = [r for r in by[6].rows if isinstance(r.get("exp_N"), float)]
        if rows:
            by_n = sorted(rows, key=lambda r: r["exp_N"])
            by_d = sorted((r for r in rows if isinstance(r.get("exp_d"), float)), key=lambda r: r["exp_d"])
            out[6] = ("Measured scaling exponents (time ∝ size^k), flattest first. With N: "
                      + ", ".join(f"{r['head']} {r['exp_N']:.2f}" for r in by_n)
                      + ". With d: " + ", ".join(f"{r['head']} {r['exp_d']:.2f}" for r in by_d)
                      + ". Fixed costs (grid search folds, Keras start-up in mlp) dominate at small sizes, so "
                        "exponents below 1 mean 'not yet in the asymptotic regime', not sub-linear algorithms.")
    return out


def run_bench(numbers: list[int], quick: bool, out_dir: Path, log=print, command: str | None = None,
              strict: bool = False, scale_images: tuple[int, ...] | None = None) -> list[Section]:
    """Run the sections and write results.md/.csv/plots after each one. `strict`: a failing section raises
    (the tests) instead of being reported as failed (a long `make bench`)."""
    import tempfile

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notices: each section builds its own compiled functions on purpose
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    sizes = Sizes.quick() if quick else Sizes.full()
    if scale_images:
        sizes = dataclasses.replace(sizes, scale_images=scale_images)
    start = time.perf_counter()
    command = command or " ".join(["python", "-m", "benchmarks"] + sys.argv[1:])

    def write(sections: list[Section], sources) -> None:
        """Called after every section, so a long run that fails late keeps what it measured."""
        plot_sections(out_dir, sections)
        done = [s.number for s in sections]
        settings = [f"command: `{command}`"
                    f"{' (quick mode: tiny sizes, figures are not meaningful)' if quick else ''}",
                    f"sections: {', '.join(map(str, done))} of {', '.join(map(str, numbers))}; run time so far "
                    f"{time.perf_counter() - start:.0f} s; load average at end: "
                    f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}",
                    sources.note,
                    f"sizes: {sizes}",
                    "images are read from the page cache (warm), as in any second run over the same folder"]
        write_markdown(out_dir / "results.md", facts, settings, sections, explanations(sections),
                       profile_notes(sections))
        write_csv(out_dir / "results.csv", sections)

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        sections, _ = run_sections(numbers, sizes, Path(tmp), log, strict, write)
    return sections


def default_out() -> Path:
    return ROOT / "benchmarks"
