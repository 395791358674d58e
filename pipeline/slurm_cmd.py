"""`python -m pipeline slurm <extract flags> --shards N`: submit the extraction as a job array plus a dependent merge."""
from __future__ import annotations

import argparse

from pipeline import extract_cmd
from pipeline.slurm import DEFAULT_MAX_ARRAY_SIZE, SlurmOptions, plan, read_max_array_size, submit


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every extract flag (the tasks run exactly those), then the array's resources."""
    extract_cmd.add_arguments(p)
    d = SlurmOptions(shards=1)
    g = p.add_argument_group("SLURM")
    g.add_argument("--shards", type=int, required=True,
                   help="number of shards: one array task each, or a contiguous range each when there are more than "
                        "the cluster's MaxArraySize allows")
    g.add_argument("--tasks", default=d.tasks, help="only these array indices, e.g. 1 or 1,3 (resubmit failed tasks)")
    g.add_argument("--partition", default=d.partition)
    g.add_argument("--gpus-per-task", type=int, default=d.gpus_per_task, help="--gres=gpu:K per task; 0: CPU jobs")
    g.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="CPU cores per task (image decoding)")
    g.add_argument("--time", default=d.time, help="time limit per task, e.g. 02:00:00")
    g.add_argument("--account", default=d.account)
    g.add_argument("--log-dir", default=d.log_dir, help="scripts and logs; default logs/slurm/<output name>")
    g.add_argument("--max-running", type=int, default=d.max_running,
                   help="run at most K array tasks at once (--array=...%%K); default: as many as the cluster allows")
    g.add_argument("--dry-run", action="store_true", help="print both scripts; write and submit nothing")


def run(args: argparse.Namespace) -> int:
    cfg = extract_cmd.config_from_args(args)
    opts = SlurmOptions(args.shards, args.tasks, args.partition, args.gpus_per_task, args.cpus_per_task, args.time,
                        args.account, args.log_dir, args.max_running)
    found = read_max_array_size()
    p = plan(cfg, opts, max_array_size=found or DEFAULT_MAX_ARRAY_SIZE, list_data=True)
    if args.dry_run:
        print(f"# ---- {p.extract_path} ----\n{p.extract_script}\n# ---- {p.merge_path} ----\n{p.merge_script()}")
        assumed = "" if found else (f" MaxArraySize: no answer from `scontrol show config` here, SLURM's default "
                                    f"{DEFAULT_MAX_ARRAY_SIZE} assumed.")
        listed = f" DATA is listed once into {p.manifest} and" if p.listing else ""
        print(f"# dry run: nothing written or submitted. Without --dry-run{listed} both scripts are written to "
              f"{p.log_dir} and submitted, the merge with the array's job id.{assumed}")
        return 0
    array_job, merge_job = submit(p, cfg.overwrite)
    tasks = ",".join(map(str, p.tasks)) if len(p.tasks) <= 10 else f"{len(p.tasks)} tasks from {p.tasks[0]}"
    each = f", {p.per_task} shards a task" if p.per_task > 1 else ""
    print(f"submitted array job {array_job} (tasks {tasks} of {p.shards} shards{each}) and merge job "
          f"{merge_job} (after all succeed) -> {p.out}\n"
          f"scripts and logs: {p.log_dir}  (squeue -j {array_job},{merge_job} to follow)")
    return 0
