"""`make mutate`: mutation testing (mutmut 3) of the core modules, each against its own focused tests.

Why: a test suite that passes says nothing about the lines it never checks. mutmut changes one thing at a time in a
module (`<` to `<=`, a constant, a string, a dropped argument) and reruns the tests that reach the changed function;
a mutant no test fails on ("survived") is a behaviour nobody asserts. The target is >= 90% of each module's
non-equivalent mutants killed. docs/testing.md says how to read and fix survivors.

MODULES below is the one list: each module with the test files that must kill its mutants (a module listed among
its own tests contributes its doctests). Each module runs alone in mutants/<module>/ with its own mutmut config
(written there; the repository's pyproject.toml is not changed), so the test selection stays per module and the
folder is left for `mutmut results`, `mutmut show NAME` or `mutmut browse` run inside it. Every run starts
afresh: a cached "survived" would hide a test added since.

    python tests/mutate.py                        # every module in MODULES
    python tests/mutate.py classifiers/stats.py   # one (make mutate MODULES=classifiers/stats.py)

>>> slug("pipeline/slurm.py")
'pipeline.slurm'
>>> score(killed=95, total=100, equivalent=3)
0.979...
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90
# The packages mutmut copies (only the module under test is mutated) and what the tests read besides tests/.
SOURCES = ["features", "classifiers", "pipeline"]
ALSO_COPY = ["data", "models", "docs", "Makefile"]  # docs: the schema test compares docs/hdf5-schema.md
# In-process, fail fast, no cache or random order: mutmut itself adds -x -q and the test ids.
PYTEST_ARGS = ["-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly"]

MODULES: dict[str, list[str]] = {
    # not test_trust.py or test_disk_full.py: their extractions (27 s, 2 x 11 s plus a module fixture) would run for
    # every surviving writer mutant; test_mutants_store.py asserts the same refusals and failures in-process
    "features/store.py": ["tests/test_store.py", "tests/test_mutants_store.py", "features/store.py"],
    "features/schema.py": ["tests/test_trust.py", "tests/test_store.py", "tests/test_mutants_schema.py",
                           "features/schema.py"],
    "features/update.py": ["tests/test_mutants_update.py"],
    "features/catalog.py": ["tests/test_mutants_catalog.py", "tests/test_catalog.py"],
    "pipeline/merge.py": ["tests/test_mutants_merge.py"],
    "classifiers/stats.py": ["tests/test_stats.py", "tests/test_mutants_stats.py"],
    "classifiers/saved.py": ["tests/test_saved.py", "tests/test_mutants_saved.py", "classifiers/saved.py"],
    "pipeline/slurm.py": ["tests/test_slurm.py", "tests/test_mutants_slurm.py"],
    "features/backbones.py": ["tests/test_backbones.py", "tests/test_data_configs.py",
                              "tests/test_mutants_backbones.py"],
}

# Survivors that cannot change behaviour, per module: (function, the mutated line as mutmut writes it, why). They
# are matched by content, not by mutant number, so an edit elsewhere in the function does not silently re-target
# them; an entry that matches no survivor is reported as stale. docs/testing.md lists the same with its reasons.
_SORT = 'order = order.sort_values(["_untied", "_loss", "fit_s"], {}) if table["tied"].sum() > 1 else order'
_STRICT = "strict() has already made every NaN and inf None: json.dumps never meets one, allow_nan=False only guards"
_LEXSORT = "pandas ignores `kind` when sorting by several columns (a lexsort, always stable)"
_FALSY = "the attribute is set only to True; unset, None is as false as False"
_WHERE = "`where` only words the error, which _readable swallows (it returns False)"
_SINK = "memfd and /dev/null both take the close's writes away from the disk (Linux has memfd)"
_MEMFD_NAME = "the memfd's name is only a label (shown in /proc)"
_NO_MEMFD = "the /dev/null fallback runs only where os has no memfd_create, never on Linux"
_ABANDON_SINK = 'sink = os.memfd_create({}) if hasattr({}, "{}") else os.open({})'
_CONTIGUOUS = "contiguous data has no checksums to fail: the step only sets how many rows each read takes"
_NO_ROWS = "with no rows, `groups` is [] whatever `starts` is"
_BLOCKING = "the step only sets how many rows verify reads at once; every row is still read and reported alike"
_RDCC = "the file's default chunk cache only sets speed: rows are written through `_uncached` datasets"
_ASCII = "json.dumps writes ASCII only (ensure_ascii): any encoding reads and writes the log alike"
_COMPUTED = ("only `computed >= 0` is ever asked of a row not in the update's cache, and every row with reuse < 0 is "
             "assigned its delta row or -1 before it is")
_NOT_IN_DELTA = ("a kept row (reuse 0) is looked up in the update's cache too; it is never there (that cache holds "
                 "only the rows with reuse < 0), so it gets -1, and `out` keeps it by its reuse")
_NEWLINE = "the slice reaches past the field only into its line's trailing newline, which int() ignores"
_PREFIX = ("the split of a path's first folder and of a longer prefix of the path are the same: _split_of asks "
           "whether it starts with train/val/test, and '/' ends the first folder's name")
_LAST = "rsplit keeps the last component whatever the number of splits: [-1] is the same"
_LAYERS = "a cache has at least one layer (CacheAttrs.layers of an extraction is never empty), so `else` is unreachable"
_FLOAT64 = "a float64 buffer holds float16/float32 rows exactly, and they are stored back in the cache's own dtype"
_DONE = "CacheWriter.finalize reads rows_written and skipped of its Progress, never files_done"
_INT64 = "numpy >= 2 makes int64 the default integer on every 64-bit platform"
_COUNT = "np.fromiter's count only sizes the array in advance; without it the same values come out"
_REPEAT = ("a repeated row or place (diff 0) is gathered right by the one read too; kept rows never repeat (distinct "
           "old rows into ascending places)")
EQUIVALENT: dict[str, list[tuple[str, str, str]]] = {
    "features/store.py": [
        *[("xǁCacheWriterǁfinalize", f"attrs = dataclasses.replace(CacheAttrs.parse(f.attrs, {arg}), num_images=n,",
           "the name only words a parse error of attributes this writer wrote itself") for arg in ("None", "str(None)")],
        *[("xǁCacheWriterǁclose", line, "after a failed close the flush fails, is caught, and `_abandon` returns at "
           "once for a file marked failed: the same end state, and close never raises") for line in (
            'if self.file.id.valid or not getattr(self, "_close_failed", False):',
            'if self.file.id.valid and not getattr(None, "_close_failed", False):',
            'if self.file.id.valid and not getattr(self, "XX_close_failedXX", False):',
            'if self.file.id.valid and not getattr(self, "_CLOSE_FAILED", False):')],
        *[("x_rows_per_chunk", f"row_bytes = int(np.prod(row_shape, {arg})) * np.dtype(dtype).itemsize",
           "a shape's product is an integer with or without dtype=None") for arg in ("dtype=None", "")],
        ("x_rows_per_chunk", "return int(np.clip(CHUNK_BYTES / max(row_bytes, 1), 1, MAX_ROWS_PER_CHUNK))",
         "int() of the positive quotient floors it, as // does"),
        ("x_rows_per_chunk", "return int(np.clip(CHUNK_BYTES // max(row_bytes, 2), 1, MAX_ROWS_PER_CHUNK))",
         "a row holds at least one float16: row_bytes is never below 2"),
        *[(func, line, "codec names are case-insensitive") for func, line in [
            ("x__fixed_utf8", 'encoded = np.array([v.encode("UTF-8") for v in values], raw)'),
            ("x__fixed_utf8", 'return encoded.astype(h5py.string_dtype("UTF-8", max(encoded.dtype.itemsize, 1)))'),
            ("xǁCacheWriterǁcreate", '_per_row(f, "split", n, (), h5py.string_dtype("UTF-8", 5), TEXT_ROWS, '
                                     "compressed)"),
            ("xǁCacheWriterǁfinalize", 'text = h5py.string_dtype("UTF-8")')]],
        ("x_check_ours", "with h5py.File(path, ) as f:", "h5py opens read-only by default"),
        ("x_escaping_rows", "if not any(escape not in joined for escape in ESCAPES):",
         "the row-by-row check then always runs: the same rows, found slower"),
        *[("xǁCacheWriterǁwrite", f"values.update(paths=_fixed_utf8(paths, {arg}), labels=labels,",
           "a batch's longest path fits the column, whose width is the longest of all: stored the same")
          for arg in ("None", "")],
        *[("xǁCacheWriterǁwrite", f"split=_fixed_utf8(splits, {arg}), view=views, file_stamp=np.asarray(stamps, "
                                  "np.int64).reshape(n, 2))",
           "split names fit in 5 bytes (train, val, test, or none): stored the same at any width")
          for arg in ("None", "", "6")],
        *[("xǁCacheWriterǁwrite", f"split=_fixed_utf8(splits, 5), view=views, file_stamp=np.asarray(stamps, "
                                  f"{arg}).reshape(n, 2))",
           "stamps are Python ints: int64 with or without the dtype, cast to the int64 column anyway")
          for arg in ("None", "")],
        ("xǁCacheWriterǁ_close_file", 'if not fid.valid or getattr(self, "_close_failed", None):',
         "the default only needs to be false: None is as false as False"),
        ("xǁCacheWriterǁclose", 'if self.file.id.valid and not getattr(self, "_close_failed", None):',
         "the default only needs to be false: None is as false as False"),
        *[("xǁCacheWriterǁextend", f'f = h5py.File(partial, "r+", {arg})', _RDCC)
          for arg in ("rdcc_nbytes=None", "")],
        ("xǁCacheWriterǁextend", "if path_bytes >= old.path_bytes:",
         "at the same width the path column is written again with the same strings"),
        ("xǁCacheWriterǁextend", 'column = _per_row(f, "paths", rows, (), _fixed_utf8(["XXXX"], path_bytes).dtype, '
                                 "TEXT_ROWS,", "the width is given: any string gives the same dtype"),
        *[("xǁCacheWriterǁextend", f"column[: len(old.paths)] = _fixed_utf8(old.paths.tolist(), {arg})",
           "narrower strings assigned into the wider column are stored the same") for arg in ("None", "")],
        ("x__open", "return h5py.File(path, )", "h5py opens read-only by default"),
        *[("x__text", f'if values.dtype.kind {test}:', "the generic branch decodes fixed-length bytes the same way "
           "(plain: UTF-8, backslashreplace), one element at a time; and numpy casts the bytes of other arrays as "
           "ASCII, refusing the rest, which plain() then decodes") for test in ('== "XXSXX"', '== "s"', '!= "S"')],
        *[(f"xǁCacheWriterǁ{func}", f'f = h5py.File(partial_path(path), "{mode}", {arg})', _RDCC)
          for func, mode in (("create", "w"), ("reopen", "r+")) for arg in ("rdcc_nbytes=None", "")],
        ("xǁCacheWriterǁ_fail", 'kept = record is None or getattr(self, "_close_failed", None) or '
                               'self._readable(record.rows_written, stop)', _FALSY),
        ("xǁCacheWriterǁ_abandon", 'if not self.file.id.valid or getattr(self, "_close_failed", None):', _FALSY),
        ("xǁCacheWriterǁ_readable", "with h5py.File(partial_path(self.path), ) as f:",
         "h5py opens read-only by default"),
        ("xǁCacheWriterǁ_readable", "CacheAttrs.parse(f.attrs, None)", _WHERE),
        ("xǁCacheWriterǁ_readable", "CacheAttrs.parse(f.attrs, str(None))", _WHERE),
        ("xǁCacheWriterǁ_readable", "if lo <= hi:", "ds[lo:lo] reads nothing and cannot fail"),
        ("xǁCacheWriterǁ_abandon", 'fd = ""',
         "get_vfd_handle only fails for drivers without a descriptor; create and reopen use the default sec2 driver"),
        ("xǁCacheWriterǁ_abandon", 'sink = os.memfd_create("abandoned-hdf5") if (hasattr(os, "memfd_create")) and '
                                   'False else os.open(os.devnull, os.O_RDWR)', _SINK),
        ("xǁCacheWriterǁ_abandon", 'sink = os.memfd_create("abandoned-hdf5") if (hasattr(os, "memfd_create")) or '
                                   'True else os.open(os.devnull, os.O_RDWR)', _SINK),
        *[("xǁCacheWriterǁ_abandon", _ABANDON_SINK.format(name, "os", "memfd_create", "os.devnull, os.O_RDWR"),
           _MEMFD_NAME) for name in ('"XXabandoned-hdf5XX"', '"ABANDONED-HDF5"')],
        *[("xǁCacheWriterǁ_abandon", _ABANDON_SINK.format('"abandoned-hdf5"', module, attr, "os.devnull, os.O_RDWR"),
           _SINK) for module, attr in (("None", "memfd_create"), ("os", "XXmemfd_createXX"), ("os", "MEMFD_CREATE"))],
        *[("xǁCacheWriterǁ_abandon", _ABANDON_SINK.format('"abandoned-hdf5"', "os", "memfd_create", args), _NO_MEMFD)
          for args in ("None, os.O_RDWR", "os.devnull, None", "os.O_RDWR", "os.devnull, ")],
        *[("x__scan_block", f"step = dset.chunks[0] if dset.chunks else rows_per_chunk({args})", _CONTIGUOUS)
          for args in ("dset.shape[1:], None", "dset.shape[2:], dset.dtype")],
        *[("xǁCacheǁread", f"rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, {arg})",
           "read_blocks converts the rows to int64 itself, and only their count sizes `out`")
          for arg in ("dtype=None", "")],
        ("x__virtual_problems", 'if (not name.startswith("features/") or source in ("", "XX.XX", "..") or '
                                'Path(source).name != source', "Path('.').name is '': the next test refuses '.'"),
        ("x_read_blocks", 'order = np.argsort(rows, kind="STABLE")', "numpy reads the sort kind case-insensitively"),
        ("x_read_blocks", "with h5py.File(path, ) as file:", "h5py opens read-only by default"),
        ("x_read_attrs", "with h5py.File(path, ) as f:", "h5py opens read-only by default"),
        ("x_existing_cache", "with h5py.File(path, ) as f:", "h5py opens read-only by default"),
        *[("x_verify", f"step = max({lo}, block_bytes // max({rb}, dset.dtype.itemsize * math.prod(dset.shape[{d}:])))",
           _BLOCKING) for lo, rb, d in (("2", "1", "1"), ("1", "2", "1"), ("1", "1", "2"))],
        ("x_verify", "for lo in range(0, dset.shape[0], ):", _BLOCKING),
        ("x__nonfinite_rows", "sums = block.reshape(len(block), -2).sum(axis=1, dtype=np.float64)",
         "numpy reads a negative size as the one unknown dimension, -2 as -1"),
        *[("x_read_attrs", f"return CacheAttrs.parse(f.attrs, {where}) if f.attrs.get(VERSION_ATTR) == SCHEMA_VERSION "
                           "else None", "`where` only words a DamagedCache, which read_attrs turns into None")
          for where in ("None", "str(None)")],
        *[("xǁProgressǁappend_log", f'with open(log, "a", {arg}) as file:', _ASCII)
          for arg in ("encoding=None", "", 'encoding="UTF-8"')],
        *[(f"xǁProgressǁ{func}", f"tmp.unlink(missing_ok={arg})",
           "a missing temporary file raises FileNotFoundError, an OSError that the same handler ignores")
          for func in ("save", "start_log") for arg in ("None", "False")],
        *[("xǁProgressǁ_logged", f"lines = cls.log_path(path).read_text({arg}).splitlines()", _ASCII)
          for arg in ('encoding="UTF-8"', "encoding=None")],
        ("x_read_blocks", "starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]]) if (len(rows)) or True "
                          "else np.array([], int)", _NO_ROWS),
        *[("x_read_blocks", "starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]]) if len(rows) else "
                            f"np.array({arg})", _NO_ROWS) for arg in ("[], None", "int", "[], ")],
        ("x__write_failed", "code = None if (isinstance(cause, str)) and False else _errno(cause)",
         "a str cause takes the disk-full branch by its type, whatever code is"),
        ("x__write_failed", "record = Progress.load(path) if (kept) or True else None",
         "with kept=False the tail is the removal sentence, whatever the record says"),
    ],
    "features/schema.py": [
        ("x_plain", 'return value.decode("UTF-8", "backslashreplace")',
         "Python's codec lookup ignores case: UTF-8 is utf-8"),
        ("x__type_name", 'return getattr(kind, "__name__", ) if kind in (bool, int, float, str) else "list[str]"',
         "bool, int, float and str all have a __name__: getattr's default is never used"),
    ],
    "features/update.py": [
        ("x_computed_rows", "computed = np.full(len(catalog), -2, np.int64)", _COMPUTED),
        ("x_computed_rows", "computed = np.full(len(catalog), -1, None)",
         "float64 -1.0 and row numbers are exact in float64, and read_blocks turns the rows it gets into int64"),
        ("x_computed_rows", "computed = np.full(len(catalog), -1, )",
         "the same: float64 is np.full's default dtype for -1"),
        ("x_computed_rows", "computed[i] = delta_rows.get((catalog.paths[i], views[i]), -2)  # absent: it could not "
                            "be used (skipped)", _COMPUTED),
        ("x_computed_rows", "for i in np.flatnonzero(reuse <= 0).tolist():", _NOT_IN_DELTA),
        ("x_computed_rows", "for i in np.flatnonzero(reuse < 1).tolist():", _NOT_IN_DELTA),
        ("x_write_linked", "writer.finalize(Progress(rows_written=len(out_rows), files_done=None, skipped=skipped))",
         _DONE),
        ("x_write_linked", "writer.finalize(Progress(rows_written=len(out_rows), skipped=skipped))", _DONE),
        *[("x_write_linked", f"part.unlink(missing_ok={arg})", "the part was made by this call a moment before: it "
           "exists, and missing_ok is never asked") for arg in ("None", "False")],
        ("x_assemble", 'chunk = max(writer.file[f"features/{layer}"].chunks[0] for layer in writer.layers) if '
                       '(writer.layers) or True else 1', _LAYERS),
        ("x_assemble", 'chunk = max(writer.file[f"features/{layer}"].chunks[0] for layer in writer.layers) if '
                       'writer.layers else 2', _LAYERS),
        ("x_assemble", "block = max(1, COPY_BLOCK_BYTES // max(2, row_bytes) // chunk) * chunk",
         "row_bytes >= 2: features are stored as float16 or float32 (store.STORAGE_DTYPES), at least one value a row"),
        ("x_assemble", "buffers = {layer: np.empty((min(block, len(out)), *old.shapes[layer]), None)", _FLOAT64),
        ("x_assemble", "buffers = {layer: np.empty((min(block, len(out)), *old.shapes[layer]), )", _FLOAT64),
        ("x_assemble", "for positions, values in delta.blocks(layer, computed[idx[at]], 2 / block):",
         "read_blocks groups rows by rows // block_rows: a float block_rows groups them the same; the values read "
         "are the same"),
        ("x_assemble", "for positions, values in delta.blocks(layer, computed[idx[at]], 3 * block):",
         "how many computed rows one read covers: the values read are the same"),
        ("x_assemble", "writer.finalize(Progress(rows_written=len(out), files_done=None, skipped=skipped))", _DONE),
        ("x_assemble", "writer.finalize(Progress(rows_written=len(out), skipped=skipped))", _DONE),
        *[("x__label_map", f"return np.array([index.get(name, -2) for name in old_names] + [-1], {arg})", _INT64)
          for arg in ("None", "")],
        ("x_reusable_rows", "reuse = np.fromiter(map(rows.get, keys, itertools.repeat(-1)), np.int64, )", _COUNT),
        ("x_reusable_rows", "stamps = np.fromiter(itertools.chain.from_iterable(catalog.stamps), np.int64, )"
                            ".reshape(-1, 2)", _COUNT),
        ("x_reusable_rows", "stamps = np.fromiter(itertools.chain.from_iterable(catalog.stamps), np.int64, "
                            "2 * len(catalog)).reshape(-2, 2)", "numpy (2.4) takes any negative size as 'infer'"),
        *[("x_reusable_rows", f"splits = np.array(catalog.splits, {arg})[found]",
           "a list of str becomes a str array whatever dtype=str says") for arg in ("dtype=None", "")],
        *[("x_reusable_rows", f"labels = np.asarray(catalog.labels, {arg})[found]", _INT64) for arg in ("None", "")],
        ("xǁ_KeptRowsǁ__enter__", "self.file = h5py.File(self.old.path, )", "h5py opens read-only by default"),
        ("xǁ_KeptRowsǁread_into", "if len(src) >= 1 and ((np.diff(src) <= 0).any() or (np.diff(dst) <= 0).any()):",
         "one row: np.diff is empty, so the condition is False either way"),
        ("xǁ_KeptRowsǁread_into", "if len(src) > 1 and ((np.diff(src) < 0).any() or (np.diff(dst) <= 0).any()):",
         _REPEAT),
        ("xǁ_KeptRowsǁread_into", "if len(src) > 1 and ((np.diff(src) <= 0).any() or (np.diff(dst) < 0).any()):",
         _REPEAT),
        ("xǁ_KeptRowsǁread_into", "with np.errstate(all=None):  # rows not filled yet hold anything; only the kept "
                                  "ones are looked at", "None keeps numpy's default (warn), which raises nothing: "
                                                        "the sums are the same"),
        ("xǁ_KeptRowsǁread_into", "sums = out.reshape(len(out), -2).sum(axis=1, dtype=np.float64)[dst]",
         "numpy (2.4) takes any negative size as 'infer'"),
    ],
    "features/catalog.py": [
        # the refusal of a pattern whose folder is no folder: its matches were found under that folder, so it is one
        *[("x__from_pattern", line, "unreachable: tars.match_pattern finds entries only under an existing folder")
          for line in ("raise UsageError(None)", "\"XXfiles in a folder, e.g. 'shards/*.tar'.XX\")",
                       "\"FILES IN A FOLDER, E.G. 'SHARDS/*.TAR'.\")")],
        ("xǁ_Indexǁ__getitem__", "line = self.file.read(None)",
         "reading on to the end of the file: the two fields are sliced from the same first bytes"),
        ("xǁ_Indexǁ__getitem__", "return int(line[: self.width]), int(line[self.width + 1 : 3 * self.width + 1])",
         _NEWLINE),
        ("xǁ_Indexǁ__getitem__", "return int(line[: self.width]), int(line[self.width + 1 : 2 * self.width + 2])",
         _NEWLINE),
        ("x__manifest_members", "break",
         "a manifest lists one layout: either every entry is a tar sample (8 fields) or none is, so stopping at the "
         "first file entry finds the same members as going on"),
        ("x__check_listed", "break", "a manifest lists one layout: when the first entry is a tar sample, all are"),
        ("x__shown", 'return os.fsencode(path).decode("UTF-8", "backslashreplace")', "codec names ignore case"),
        ("x__from_tars", "labels, names = tars.class_labels(samples, classes, )",
         "tars.CLASSES_FILE is class_labels' default for the file named in its messages"),
        ("x__walk_files", "is_dir = None", "None is as false as False"),
        ("x__walk_files", 'inside = _shown(target.relative_to(real_root).as_posix()) or "XX.XX"',
         "unreachable: a link to DATA itself is caught before, as a folder already catalogued (its inode is seen)"),
        ("x__walk_files", "if type(None) is os.stat_result and stat.S_ISREG(st.st_mode):",
         "a regular file then goes to found(), which appends it and its stamp just the same"),
        ("xǁ_Statsǁsubmit", "if time.perf_counter() - start >= WAITING_STAT_S * len(paths):",
         "a chunk's time equal to the limit to the nanosecond: either way is right"),
        *[("xǁ_Statsǁsubmit", f'self.pool = ThreadPoolExecutor({args})',
           "how many threads stat, and their names: the results are gathered in submission order all the same")
          for args in ('max_workers=None, thread_name_prefix="stat"',
                       'max_workers=STAT_THREADS, thread_name_prefix=None',
                       'thread_name_prefix="stat"', 'max_workers=STAT_THREADS, ',
                       'max_workers=STAT_THREADS, thread_name_prefix="XXstatXX"',
                       'max_workers=STAT_THREADS, thread_name_prefix="STAT"')],
        ("x__walk_files", 'suffix = name[dot:].lower() if 0 <= dot < len(name) - 1 else ""  # Path(name).suffix, '
                          'lower-cased', "a name with its dot first is hidden and skipped before"),
        ("x__walk_files", "if suffix in images and name.isascii() and entry.is_file(follow_symlinks=None):",
         "None is as false as False"),
        *[("x__from_csv", "for raw, label, *split in table[[pcol, lcol] + ([scol] if scol else [])].itertuples("
                          f"{args}):", why) for args, why in (
            ("index=None, name=None", "index=None is falsy: no index column, as index=False"),
            ("index=False, ", "named tuples unpack into the same values as plain ones"))],
        *[("x__from_csv", f"labels = [index.get(label_of.get(rel, {arg}), -1) for rel in images]",
           "an image the CSV does not list looks up None, which is no class name: -1 as for ''")
          for arg in ("None", "")],
        ("x_discover", "return _from_tars(root, shards, _beside_shards(None, shards, others), labels_csv, path_column, "
                       "label_column,", "_beside_shards does not use its root argument"),
        *[("x_read_manifest", f"index = _Index(file, len(head), width, {arg})",
           "the count is only _Index.__len__, and both searches are given their bounds (files), so it is never asked")
          for arg in ("None", "files - 1", "files + 2")],
        ("x__beside_shards", 'return [(rel, reason.replace("not an image file type", "not a tar shard") if '
                             '(reason.startswith("not an image")) or True',
         "replace() changes only a reason that holds 'not an image file type', which starts with 'not an image'"),
        *[("x__from_folders", line, _PREFIX) for line in (
            'tops = {rel.rpartition("/")[0] for rel in images if "/" in rel}',
            'tops = {rel.partition("XX/XX")[0] for rel in images if "/" in rel}')],
        ("x__from_folders", "splits.append(split_of[top] if (top in split_of) and False else _split_of(top))",
         "split_of[top] is _split_of(top), computed ahead"),
        *[("x__from_tars", line, _PREFIX) for line in (
            'tops = {rel.split(None)[0] for rel in shards if "/" in rel}',
            'tops = {rel.split("XX/XX")[0] for rel in shards if "/" in rel}',
            'split_of = {rel: _split_of(rel.rsplit("/", 1)[-1]) or (_split_of(rel.split(None)[0]) if by_folder and '
            '"/" in rel',
            'split_of = {rel: _split_of(rel.rsplit("/", 1)[-1]) or (_split_of(rel.split("XX/XX")[0]) if by_folder '
            'and "/" in rel')],
        *[("x__from_tars", f'split_of = {{rel: _split_of(rel.rsplit("/", {arg})[-1]) or (_split_of(rel.split("/")[0]) '
                           'if by_folder and "/" in rel', _LAST) for arg in ("", "2")],
        *[("x__image_keys", line, _LAST) for line in (
            'for key in (rel.rsplit("/", )[-1], os.path.splitext(rel)[0].rsplit("/", 1)[-1]):',
            'for key in (rel.rsplit("/", 2)[-1], os.path.splitext(rel)[0].rsplit("/", 1)[-1]):',
            'for key in (rel.rsplit("/", 1)[-1], os.path.splitext(rel)[0].rsplit("/", )[-1]):',
            'for key in (rel.rsplit("/", 1)[-1], os.path.splitext(rel)[0].rsplit("/", 2)[-1]):')],
        ("x_read_manifest", "first_file = bisect.bisect_right(index, lo, 1, files, key=lambda e: e[1]) - 1",
         "index[0] is row 0 <= lo, so a search from 1 ends where one from 0 does"),
        *[("x_read_manifest", line, "without `files` the search also sees the closing index line, whose row (all rows) "
                                    "lies past lo, the first row of any shard of a manifest (which lists a file at "
                                    "least: discovery refuses an empty DATA)")
          for line in ("first_file = bisect.bisect_right(index, lo, 0, None, key=lambda e: e[1]) - 1",
                       "first_file = bisect.bisect_right(index, lo, 0, key=lambda e: e[1]) - 1")],
        *[("x_read_manifest", line, "without `files` the search also sees the closing index line (row = all rows), "
                                    "which is >= hi: bisect_left stops at or before it all the same")
          for line in ("last_file = bisect.bisect_left(index, hi, first_file, None, key=lambda e: e[1])",
                       "last_file = bisect.bisect_left(index, hi, first_file, key=lambda e: e[1])")],
        ("x_read_manifest", "file = open(path, )",
         "the manifest is ASCII (json.dumps escapes every other character), so text mode reads the same characters "
         "at the same offsets"),
        *[("x_write_manifest", f'f.write(json.dumps(header, {arg}).encode() + b"\\n")',
           "the header is read back with json.loads and its length taken from the line itself")
          for arg in ("separators=None", "")],
        ("x_write_manifest", 'lines.append(json.dumps(entry, separators=(",", "XX:XX")).encode() + b"\\n")',
         "an entry is a JSON array: the key separator never appears"),
        *[("x_write_manifest", f"tmp = path.with_name(path.name + {arg})",
           "the temporary file's name: it is renamed to the manifest or removed before write_manifest returns")
          for arg in ('"XX.tmpXX"', '".TMP"')],
        *[("x_write_manifest", f"counts = catalog.view_counts(augment, {arg})",
           "has_splits defaults to any(catalog.splits), which is what is passed") for arg in ("None", "")],
    ],
    "pipeline/merge.py": [
        ("x__write", "writer.finalize(Progress(rows_written=len(paths), files_done=None, skipped=skipped),", _DONE),
        ("x__write", "writer.finalize(Progress(rows_written=len(paths), skipped=skipped),", _DONE),
    ],
    "classifiers/stats.py": [
        ("x__interval", 'if correct is None and not pd.isna(row.get("ci_low", None)):',
         "a missing ci_low column gives None instead of NaN; pd.isna is True for both"),
        ("x__interval", 'if correct is None and not pd.isna(row.get("ci_low", )):', "the same, get's default None"),
        ("x__interval", 'return fold_ci(row["accuracy"], row.get("accuracy_std", None), int(scheme[2:]))',
         "a missing accuracy_std gives None instead of NaN; fold_ci's pd.isna is True for both"),
        ("x__interval", 'return fold_ci(row["accuracy"], row.get("accuracy_std", ), int(scheme[2:]))',
         "the same, get's default None"),
        ("x_choose", 'table["tied"] = table["p_vs_top"].fillna(None) >= ALPHA',
         "fillna(None) leaves NaN, and NaN >= ALPHA is False, as 0 >= ALPHA is"),
        ("x_choose", _SORT.format("kind=None"), _LEXSORT),
        ("x_choose", _SORT.format(""), _LEXSORT),
        ("x_choose", _SORT.format('kind="XXstableXX"'), _LEXSORT),
        ("x_choose", _SORT.format('kind="STABLE"'), _LEXSORT),
        ("x_mcnemar_p", "if only_a - only_b == 0:",
         "when only_a == only_b > 0 the exact test's p is 1.0 (binomtest(k, 2k)), which the early return gives"),
        ("x_mcnemar_p", "return float(binomtest(min(only_a, only_b), only_a + only_b, ).pvalue)",
         "0.5 is binomtest's default p"),
    ],
    "classifiers/saved.py": [
        *[("x_dumps", f"return json.dumps(strict(obj), indent=2, {arg})", _STRICT)
          for arg in ("allow_nan=None", "", "allow_nan=True")],
        ("x_strict", "return [strict(v) for v in (value.tolist() if (isinstance(value, np.ndarray)) and False else "
                     "value)]", "iterating an array gives numpy scalars and sub-arrays, which strict turns into the "
                                "same Python values as tolist()"),
    ],
    "pipeline/slurm.py": [
        ("x_plan", "log_dir = log_dir if (log_dir.is_absolute()) and False else cwd / log_dir",
         "joining an absolute path to cwd gives that absolute path"),
        ("x_parse_tasks", "indices = None", "None and [] are both refused by the `not indices` that follows"),
        ("x_tasks_for", "per_task = 1 if not max_array_size or shards < max_array_size else -(-shards // "
                        "max_array_size)", "at shards == max_array_size the ceiling of shards / max_array_size is 1"),
    ],
}


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def score(killed: int, total: int, equivalent: int) -> float:
    """Killed share of the mutants that can be killed at all."""
    return killed / (total - equivalent) if total > equivalent else 1.0


@dataclass
class Result:
    module: str
    seconds: float = 0.0
    status: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut's status word
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant name -> reason
    stale: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def killed(self) -> int:
        return sum(s in ("killed", "timeout") for s in self.status.values())

    @property
    def survivors(self) -> list[str]:
        return sorted(n for n, s in self.status.items() if s not in ("killed", "timeout") and n not in self.equivalent)

    @property
    def timeouts(self) -> int:
        return sum(s == "timeout" for s in self.status.values())

    @property
    def score(self) -> float:
        return score(self.killed, len(self.status), len(self.equivalent))

    def line(self) -> str:
        if self.error:
            return f"{self.module}: {self.error}"
        verdict = "ok" if self.score >= TARGET else f"below {TARGET:.0%}"
        return (f"{self.module}: {self.killed}/{len(self.status)} killed ({self.timeouts} by timeout), "
                f"{len(self.equivalent)} equivalent, "
                f"{len(self.survivors)} survived -> {self.score:.1%} ({verdict}), {self.seconds:.0f} s")


def config_toml(module: str, tests: list[str], pytest_args: list[str]) -> str:
    """The [tool.mutmut] section of one module's run (appended to a copy of pyproject.toml)."""
    def strings(items):
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (f"\n[tool.mutmut]\nsource_paths = {strings(SOURCES)}\nonly_mutate = {strings([module])}\n"
            f"also_copy = {strings(ALSO_COPY)}\npytest_add_cli_args = {strings(pytest_args)}\n"
            f"pytest_add_cli_args_test_selection = {strings(tests)}\nuse_git_change_detection = false\n"
            # a fresh worker per mutant forked from a server that has imported, never run, TensorFlow: a child
            # forked after TensorFlow ran ops can spin in its thread pools until the CPU limit kills it
            'process_isolation = "forkserver"\n'
            # mutmut's limit is (the tests' own durations + constant) x multiplier; module fixtures (a classify run, a
            # tiny backbone) are not in those durations, and the 2 cores are shared: a tight limit turns slow
            # survivors into false "timeout" kills
            "timeout_constant = 10.0\ntimeout_multiplier = 10.0\n")


def prepare(module: str, tests: list[str], pytest_args: list[str]) -> Path:
    """A fresh mutants/<module>/: links to the sources and a pyproject.toml with this module's mutmut config."""
    work = ROOT / "mutants" / slug(module)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in [*SOURCES, *ALSO_COPY, "tests"]:
        (work / name).symlink_to(ROOT / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if re.search(r"^\[tool\.mutmut\]", pyproject, re.M):
        raise SystemExit("pyproject.toml has a [tool.mutmut] section; tests/mutate.py writes one per module")
    (work / "pyproject.toml").write_text(pyproject + config_toml(module, tests, pytest_args))
    return work


def mutmut(work: Path, *args: str, log: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    command = [str(exe) if exe.exists() else "mutmut", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "w") as out:
        return subprocess.run(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def why_unrunnable(tests: list[str], pytest_args: list[str]) -> str:
    """mutmut stops when the selected tests fail without any mutant (and hides their output): show that run."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", *pytest_args, *tests], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode == 0:
        return ""
    return f"the selected tests fail without any mutant; fix them first:\n{(done.stdout + done.stderr)[-2500:]}"


def statuses(work: Path, module: str) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / f"{module}.meta").read_text())
    return {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}


def mutated_lines(work: Path, module: str) -> dict[str, list[str]]:
    """Mutant name -> the lines it changes, stripped, read from the mutated copy (every mutant there is a function
    beside the original `<function>__mutmut_orig`; `mutmut show NAME` prints the same as a diff, one process each)."""
    source = (work / "mutants" / module).read_text()
    functions = {node.name: node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    text = source.splitlines()

    def lines(name: str) -> list[str]:
        node = functions[name]
        return [line.replace(name, "_", 1).strip() for line in text[node.lineno - 1:node.end_lineno]]

    found = {}
    for name in functions:
        stem, _, number = name.rpartition("__mutmut_")
        if stem and number.isdigit() and stem + "__mutmut_orig" in functions:
            original = lines(stem + "__mutmut_orig")
            found[f"{slug(module)}.{name}"] = [line[2:] for line in difflib.ndiff(original, lines(name))
                                               if line.startswith("+ ")]
    return found


def run_module(module: str, jobs: int, deselect: list[str]) -> Result:
    result = Result(module)
    if not (ROOT / module).exists():
        result.error = "not present yet, skipped"
        return result
    tests = [t for t in MODULES[module] if (ROOT / t).exists()]
    missing = sorted(set(MODULES[module]) - set(tests))
    if missing:
        print(f"  {module}: no {', '.join(missing)} (yet); running the others", flush=True)
    pytest_args = PYTEST_ARGS + [arg for test in deselect for arg in ("--deselect", test)]
    work = prepare(module, tests, pytest_args)
    start = time.monotonic()
    done = mutmut(work, "run", "--max-children", str(jobs), log=work / "run.log")
    result.seconds = time.monotonic() - start
    if done.returncode:
        tail = (work / "run.log").read_text(errors="replace")[-1500:]
        result.error = (f"mutmut failed ({done.returncode}); see {work / 'run.log'}:\n{tail}\n"
                        f"{why_unrunnable(tests, pytest_args)}")
        return result
    result.status = statuses(work, module)
    wanted = {(func, text.strip()): why for func, text, why in EQUIVALENT.get(module, [])}
    matched, changed = set(), mutated_lines(work, module) if result.survivors else {}
    for name in result.survivors:
        func = name.rpartition(".")[2].partition("__mutmut_")[0]
        for line in changed.get(name, []):
            if (func, line) in wanted:
                result.equivalent[name] = wanted[func, line]
                matched.add((func, line))
                break
    result.stale = [f"{func}: {text}" for func, text in wanted if (func, text) not in matched]
    return result


def report(result: Result, work: Path) -> None:
    print(result.line(), flush=True)
    for entry in result.stale:
        print(f"    stale EQUIVALENT entry (no survivor matches): {entry}")
    changed = mutated_lines(work, result.module) if result.survivors else {}
    for name in result.survivors:
        lines = changed.get(name) or ["(see mutmut show " + name + ")"]
        print(f"    {result.status[name]} {name}: {lines[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATE_JOBS", "2")),
                        help="mutants tested at once (MUTATE_JOBS; default 2)")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="leave out a test that fails for an unrelated reason (pytest's --deselect); say so "
                             "beside any number taken that way")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; expected one of: {', '.join(MODULES)} "
                     "(add a new one, with its tests, to MODULES in tests/mutate.py)")
    results = []
    for module in args.modules or list(MODULES):
        print(f"mutating {module} ...", flush=True)
        result = run_module(module, args.jobs, args.deselect)
        report(result, ROOT / "mutants" / slug(module))
        results.append(result)
    print("\nmodule | mutants | killed | equivalent | score | time")
    for r in results:
        if r.error:
            print(f"{r.module} | - | - | - | {r.error.splitlines()[0]} | -")
        else:
            print(f"{r.module} | {len(r.status)} | {r.killed} | {len(r.equivalent)} | {r.score:.1%} | {r.seconds:.0f} s")
    failed = [r for r in results if (r.error and "skipped" not in r.error) or (not r.error and r.score < TARGET)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
