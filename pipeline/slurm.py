"""A sharded extraction as a SLURM job array plus a dependent merge: two short, readable sbatch scripts.

Array task I runs `python -m pipeline extract <the user's flags> --out OUT --shard I/N`; the shard count is written
into the script, so a task resubmitted alone (`sbatch --array=I extract.sbatch`, or `--tasks I`) still runs shard I/N,
and because extraction resumes, a requeued, pre-empted or resubmitted task continues its shard where it stopped.
The merge job (`python -m pipeline merge --shards-of OUT`) waits for `afterok` of the array. The scripts hold only
resources and the CLI call; all logic stays in the Python stages.

DATA is listed once, at submit time, into a manifest beside the cache (features/catalog.py, `write_manifest`); every
task reads only its own rows of it (`--manifest`), so no task walks DATA or stats another task's files. The array is
sized for the cluster: its indices stay below SLURM's MaxArraySize (`scontrol show config`), so when there are more
shards than that, each task runs a contiguous range of them (`--shard A-B/N`), one after the other; `--max-running K`
lets at most K tasks run at once (`--array=...%K`).

Every value in a script is quoted for its reader: the command line with `shlex.quote` (bash), `#SBATCH` values in
double quotes with \\, " and # escaped (sbatch splits directives itself and reads that back verbatim), `%` in a log
path doubled (sbatch's filename patterns), and the job name reduced to [A-Za-z0-9_.+-]. Names holding a newline or
another control character are refused: no quoting keeps them out of a comment line or a log name.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from features.catalog import discover, manifest_path, manifest_source, write_manifest
from features.errors import UsageError
from features.store import discard_partial, existing_cache
from features.tars import KEPT_FOLDER
from pipeline.config import ExtractConfig, shard_out
from pipeline.merge import merged_out

DEPENDENCY_PLACEHOLDER = "<array job id>"
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize: array indices 0..1000
SCONTROL_TIMEOUT_S = 30  # a login node whose controller does not answer must not hold the submission


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of the array; the extraction itself is entirely described by the ExtractConfig."""

    shards: int
    tasks: str | None = None  # array indices to (re)submit, e.g. "1,3" or "2-3"; None: all
    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int = 4
    time: str | None = None
    account: str | None = None
    log_dir: str | None = None  # default: logs/slurm/<merged cache's stem>
    max_running: int | None = None  # at most this many tasks at once (`--array=...%K`); None: as the cluster allows


@dataclass(frozen=True)
class SlurmPlan:
    out: Path  # the merged cache; shard I is shard_out(out, (I, shards))
    shards: int
    tasks: list[int]
    log_dir: Path  # the scripts and every job's log
    extract_script: str
    merge_template: str  # the merge script, its dependency still DEPENDENCY_PLACEHOLDER
    per_task: int = 1  # shards each array task runs: task I runs shards per_task*I .. per_task*I + per_task - 1
    manifest: Path | None = None  # the listing of DATA the tasks read
    listing: ExtractConfig | None = None  # what `submit` lists into `manifest` (None: the manifest was given)

    def shards_of(self, task: int) -> range:
        """The shards array task `task` runs."""
        return range(task * self.per_task, min((task + 1) * self.per_task, self.shards))

    @property
    def extract_path(self) -> Path:
        return self.log_dir / "extract.sbatch"

    @property
    def merge_path(self) -> Path:
        return self.log_dir / "merge.sbatch"

    def merge_script(self, array_job: str = DEPENDENCY_PLACEHOLDER) -> str:
        return self.merge_template.replace(DEPENDENCY_PLACEHOLDER, array_job)


def parse_tasks(spec: str | None, shards: int) -> list[int]:
    """Array indices from 'all' / None, '3', '1,3' or '0-2' (SLURM's syntax), each within 0..shards-1."""
    if spec is None or spec == "all":
        return list(range(shards))
    indices: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            indices += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        indices = []
    if not indices or not all(0 <= i < shards for i in indices):
        raise UsageError(f"tasks '{spec}' is not valid. Expected array indices within 0..{shards - 1} "
                         "such as '1', '1,3' or '0-2'.")
    return sorted(set(indices))


def _array_spec(tasks: list[int], count: int, max_running: int | None = None) -> str:
    """SLURM's --array value: `0-{count-1}` for every task, else the indices; `%K` throttles it to K at once."""
    spec = f"0-{count - 1}" if tasks == list(range(count)) else ",".join(map(str, tasks))
    return spec + (f"%{max_running}" if max_running else "")


def read_max_array_size() -> int | None:
    """The cluster's MaxArraySize (array indices must stay below it), from `scontrol show config`; None when there
    is no scontrol or it does not answer (not on a SLURM login node)."""
    try:
        done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", done.stdout, re.MULTILINE) if done.returncode == 0 else None
    return int(found.group(1)) if found else None


def tasks_for(shards: int, max_array_size: int | None) -> tuple[int, int]:
    """(array tasks, shards per task): one shard a task while the indices 0..shards-1 stay below `max_array_size`,
    else the fewest shards per task that keep them below it (task I runs a contiguous range, the last one may run
    fewer)."""
    per_task = 1 if not max_array_size or shards <= max_array_size else -(-shards // max_array_size)
    return -(-shards // per_task), per_task


def _command(python: str, argv: list[str], last: str = "") -> list[str]:
    """`exec python -m pipeline ...` with one flag (and its value) per line, so the script reads like the flags.
    Every token is shell-quoted, flags included: a value that looks like a flag is still only a word."""
    lines, current = [], [shlex.quote(python), "-m", "pipeline", argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--"):
            lines.append(" ".join(current))
            current = []
        current.append(shlex.quote(arg))
    lines += [" ".join(current)] + ([last] if last else [])
    return ["exec " + " \\\n    ".join(lines)]


_PLAIN = re.compile(r"[A-Za-z0-9_./%:=,+@-]*")


def directive(option: str, value: object) -> str:
    """`#SBATCH --option=value`; a value with blanks, quotes or # goes in double quotes, \\ " # escaped, which is
    how sbatch's own directive parser (not a shell) reads a value back verbatim."""
    text = str(value)
    if not _PLAIN.fullmatch(text):
        text = '"' + re.sub(r'([\\"#])', r"\\\1", text) + '"'
    return f"#SBATCH --{option}={text}"


def job_name(kind: str, out: Path) -> str:
    """`extract-<cache stem>` in a charset every SLURM tool shows as it is (others become '_')."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', out.stem)}"


def log_pattern(log_dir: Path, name: str) -> str:
    """The --output path: a literal % of the folder doubled, so only `name`'s %A/%a/%j are patterns."""
    return f"{str(log_dir).replace('%', '%%')}/{name}"


def refuse_control_characters(cfg: ExtractConfig, opts: SlurmOptions, **more: str) -> None:
    """A newline (or any control character) in a name would break out of a comment or a directive line of the
    script: refuse it, naming the flag, before anything is written."""
    named = [(f"--{k.replace('_', '-')}", v) for k, v in [*dataclasses.asdict(cfg).items(),
                                                           *dataclasses.asdict(opts).items()]]
    named += [(f"the {k.replace('_', ' ')}", v) for k, v in more.items()]
    for flag, value in named:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise UsageError(f"{flag} {text!r} contains a newline or another control character, which cannot "
                                 "go into a job script safely. Rename it (or link it under a plain name) and retry.")


def plan(cfg: ExtractConfig, opts: SlurmOptions, python: str = sys.executable, cwd: Path | None = None,
         max_array_size: int | None = None, list_data: bool = False) -> SlurmPlan:
    """Both scripts for `cfg` split into `opts.shards` shards; nothing is written or submitted. `max_array_size`: the
    cluster's MaxArraySize (None: no limit); `list_data`: `submit` lists DATA once into a manifest beside the cache
    (`features.catalog.manifest_path`) for the tasks to read, unless `cfg.manifest` names a listing already written
    (False: each task lists DATA itself)."""
    if opts.shards < 1:
        raise UsageError(f"shards {opts.shards} is not valid. Expected a positive number of array tasks.")
    if opts.max_running is not None and opts.max_running < 1:
        raise UsageError(f"max-running {opts.max_running} is not valid. Expected a positive number of array tasks "
                         "allowed to run at once.")
    if cfg.shard is not None:
        raise UsageError(f"--shard '{cfg.shard}' cannot be combined with slurm: each array task sets its own shard; "
                         "use --shards N.")
    for name, value, least in [("gpus-per-task", opts.gpus_per_task, 0), ("cpus-per-task", opts.cpus_per_task, 1)]:
        if value < least:
            raise UsageError(f"{name} {value} is not valid. Expected a whole number >= {least}.")
    cwd = (cwd or Path.cwd()).resolve()
    refuse_control_characters(cfg, opts, python=python, working_folder=str(cwd))
    out = merged_out(cfg)
    log_dir = Path(opts.log_dir) if opts.log_dir else Path("logs") / "slurm" / out.stem
    log_dir = log_dir if log_dir.is_absolute() else cwd / log_dir
    count, per_task = tasks_for(opts.shards, max_array_size)
    tasks = parse_tasks(opts.tasks, count)
    listing = None
    if cfg.manifest is None and list_data:
        cfg, listing = cfg.replace(manifest=str(manifest_path(out))), cfg
    # --overwrite is applied once, by `submit`: a requeued task must resume its shard, not restart it.
    job_cfg = cfg.replace(out=str(out), overwrite=False, workers=cfg.workers or opts.cpus_per_task)
    resources = [directive(k, v) for k, v in [("partition", opts.partition), ("account", opts.account),
                                              ("time", opts.time)] if v]
    if per_task == 1:
        what = [f"# Sharded extraction into {out} ({opts.shards} shards): array task I runs shard I/{opts.shards}, "
                "resuming",
                "# it if an earlier run of the task was interrupted. Written by `python -m pipeline slurm`."]
        shard = f'--shard "${{SLURM_ARRAY_TASK_ID}}/{opts.shards}"'
    else:
        what = [f"# Sharded extraction into {out} ({opts.shards} shards; MaxArraySize={max_array_size} allows array "
                f"indices 0..{max_array_size - 1},", f"# so {count} tasks): array task I runs shards {per_task}*I to "
                f"{per_task}*I+{per_task - 1} of {opts.shards}, one after the other, resuming each if an",
                "# earlier run of the task was interrupted. Written by `python -m pipeline slurm`."]
        shard = (f'--shard "$((SLURM_ARRAY_TASK_ID * {per_task}))-$((SLURM_ARRAY_TASK_ID * {per_task} + '
                 f'{per_task - 1}))/{opts.shards}"')
    if cfg.manifest:
        what.append(f"# DATA was listed once, at submit time, into {cfg.manifest}; each task reads only its rows.")
    extract = [
        "#!/bin/bash",
        *what,
        "# Resubmit one task alone:  sbatch --array=I " + shlex.quote(str(log_dir / "extract.sbatch")),
        directive("job-name", job_name("extract", out)),
        f"#SBATCH --array={_array_spec(tasks, count, opts.max_running)}",
        f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
        *([f"#SBATCH --gres=gpu:{opts.gpus_per_task}"] if opts.gpus_per_task else []),
        *resources,
        directive("chdir", cwd),
        directive("output", log_pattern(log_dir, "extract-%A_%a.log")),
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "",
        *_command(python, ["extract", *job_cfg.flags()], shard),
    ]
    merge = [
        "#!/bin/bash",
        f"# Joins the {opts.shards} shards of {out} once every array task has succeeded.",
        directive("job-name", job_name("merge", out)),
        "#SBATCH --cpus-per-task=1",
        *resources,
        directive("chdir", cwd),
        directive("output", log_pattern(log_dir, "merge-%j.log")),
        f"#SBATCH --dependency=afterok:{DEPENDENCY_PLACEHOLDER}",
        "#SBATCH --kill-on-invalid-dep=yes",
        "",
        *_command(python, ["merge", "--shards-of", str(out), *(["--overwrite"] if cfg.overwrite else [])]),
    ]
    return SlurmPlan(out, opts.shards, tasks, log_dir, "\n".join(extract) + "\n", "\n".join(merge) + "\n", per_task,
                     Path(cfg.manifest) if cfg.manifest else None, listing)


def sbatch(script: Path) -> str:
    """Submit one script and return its job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("sbatch was not found: run this on a SLURM login node, or add --dry-run to only print the "
                         "scripts.") from None
    if done.returncode:
        raise UsageError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def write_listing(p: SlurmPlan) -> int:
    """List DATA once into the plan's manifest (when the plan lists it); returns the number of rows listed."""
    if p.listing is None or p.manifest is None:
        return 0
    cfg = p.listing
    catalog = discover(cfg.data, cfg.labels, cfg.path_column, cfg.label_column, p.manifest.parent / KEPT_FOLDER)
    write_manifest(p.manifest, catalog, manifest_source(cfg.data, cfg.labels, cfg.path_column, cfg.label_column,
                                                        cfg.augment))
    return sum(catalog.view_counts(cfg.augment))


def submit(p: SlurmPlan, overwrite: bool = False) -> tuple[str, str]:
    """List DATA into the manifest (when the plan lists it), write the scripts, submit the array, then the merge that
    depends on it; (array job id, merge job id).

    With `overwrite`, the submitted tasks' old shard files are removed first, so the tasks start their shards anew.
    """
    p.log_dir.mkdir(parents=True, exist_ok=True)
    write_listing(p)
    if overwrite:
        for shard in (shard_out(p.out, (i, p.shards)) for task in p.tasks for i in p.shards_of(task)):
            existing_cache(shard)  # never removes a file this tool did not write
            shard.unlink(missing_ok=True)
            discard_partial(shard)
    p.extract_path.write_text(p.extract_script)
    array_job = sbatch(p.extract_path)
    p.merge_path.write_text(p.merge_script(array_job))
    return array_job, sbatch(p.merge_path)
