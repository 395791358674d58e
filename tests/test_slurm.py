"""`python -m pipeline slurm`: the scripts it writes, and a real run on a private single-node SLURM
(tests/slurm_cluster.py): array tasks extract shards, a killed shard resumes when its task is resubmitted alone,
and the dependent merge equals a one-process extraction bit for bit."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from features.backbones import get_backbone
from features.errors import UsageError
from features.model import build_base
from features.store import CacheWriter
from pipeline import extract_cmd
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.slurm import SlurmOptions, parse_tasks, plan
from tests.conftest import ROOT, run_cli, write_images
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the session fixture)
from tests.test_merge import assert_identical

CFG = ExtractConfig(backbone="vgg19", layer=["block2_pool"], data="data/pets", weights="none")
JOB_TIMEOUT_S = 240


def test_config_flags_rebuild_the_config():
    """What a job script runs (`cfg.flags()`) parses back to the same config."""
    parser = argparse.ArgumentParser()
    extract_cmd.add_arguments(parser)
    cfg = CFG.replace(layer=["block1_pool", "block2_pool"], image_size=64, jit=True, devices="0,1", out="o.h5")
    assert extract_cmd.config_from_args(parser.parse_args(cfg.flags())) == cfg
    assert ExtractConfig().flags() == []


def test_array_and_merge_scripts(tmp_path):
    p = plan(CFG, SlurmOptions(shards=3, partition="gpu", time="02:00:00", account="proj", log_dir=str(tmp_path)),
             python="/venv/bin/python", cwd=Path("/repo"))
    out = "features/pets__vgg19__block2_pool__w-none.h5"
    assert p.out == Path(out) and p.tasks == [0, 1, 2]
    for line in ["#SBATCH --array=0-2", "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --account=proj", "#SBATCH --chdir=/repo",
                 f"#SBATCH --output={tmp_path}/extract-%A_%a.log", "#SBATCH --requeue",
                 "exec /venv/bin/python -m pipeline extract \\", f"    --out {out} \\", "    --workers 4 \\",
                 '    --shard "${SLURM_ARRAY_TASK_ID}/3"']:
        assert line in p.extract_script.splitlines(), line
    merge = p.merge_script("123").splitlines()
    for line in ["#SBATCH --dependency=afterok:123", "#SBATCH --kill-on-invalid-dep=yes",
                 f"#SBATCH --output={tmp_path}/merge-%j.log", "exec /venv/bin/python -m pipeline merge \\",
                 f"    --shards-of {out}"]:
        assert line in merge, line
    assert "--gres" not in plan(CFG, SlurmOptions(shards=2, gpus_per_task=0)).extract_script
    assert "#SBATCH --array=1,3\n" in plan(CFG, SlurmOptions(shards=4, tasks="1,3")).extract_script


@pytest.mark.parametrize("opts,cfg,message", [
    (SlurmOptions(shards=0), CFG, "shards 0 is not valid"),
    (SlurmOptions(shards=3, tasks="3"), CFG, r"tasks '3' is not valid. Expected array indices within 0\.\.2"),
    (SlurmOptions(shards=3), CFG.replace(shard="0/3"), "--shard '0/3' cannot be combined with slurm"),
    (SlurmOptions(shards=3, gpus_per_task=-1), CFG, "gpus-per-task -1 is not valid"),
])
def test_bad_options_name_the_value(opts, cfg, message):
    with pytest.raises(UsageError, match=message):
        plan(cfg, opts)


def test_tasks_use_slurm_array_syntax():
    assert parse_tasks(None, 3) == [0, 1, 2]
    assert parse_tasks("2,0-1", 4) == [0, 1, 2]


def test_make_slurm_extract_dry_run_prints_both_scripts_and_writes_nothing(tmp_path):
    logs = tmp_path / "logs"
    done = subprocess.run(["make", "-s", "slurm-extract", "STAMP=", f"PY={sys.executable}", "BACKBONE=vgg19",
                           "LAYER=block2_pool", "DATA=data/pets", "WEIGHTS=none", "SHARDS=2", f"LOG_DIR={logs}",
                           "DRY_RUN=1"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"# ---- {logs}/extract.sbatch ----" in done.stdout and "#SBATCH --array=0-1" in done.stdout
    assert "#SBATCH --dependency=afterok:<array job id>" in done.stdout
    assert not logs.exists()


def wait_for(cluster: SlurmCluster, *jobs: str) -> dict[str, str]:
    """Block until every task of `jobs` has ended; {job id (array tasks as A_I): final state}."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        shown = [subprocess.run(["scontrol", "-o", "show", "job", job], env=cluster.env, capture_output=True,
                                text=True) for job in jobs]
        states = {}
        for record in "".join(s.stdout for s in shown).splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", record))
            name = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if "ArrayTaskId" in fields else fields["JobId"]
            states[name] = fields["JobState"]
        if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
                          for s in states.values()):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"jobs {jobs} did not end within {JOB_TIMEOUT_S} s: {states}\n"
                        f"{''.join(s.stderr for s in shown)}\n{cluster.logs()}")
        time.sleep(1)


def submit(cluster: SlurmCluster, flags: list[str], *extra: str) -> tuple[str, str]:
    done = run_cli("slurm", *flags, *extra, env=cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"submitted array job (\d+) .* merge job (\d+)", done.stdout)
    assert found, done.stdout
    return found[1], found[2]


@pytest.mark.slurm
def test_array_extraction_resubmitted_task_resumes_and_merge_equals_a_single_run(slurm_cluster, tmp_path,
                                                                                 monkeypatch):
    for k, name in enumerate(["ants", "bees"]):
        write_images(tmp_path / "data" / name, 12, seed=20 + k)
    weights = tmp_path / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 64).save_weights(weights)  # one set of weights for every process
    cfg = ExtractConfig(backbone="vgg19", weights=str(weights), data=str(tmp_path / "data"), layer=["block2_pool"],
                        image_size=64, batch_size=4, workers=1, out=str(tmp_path / "features" / "pets.h5"))
    single = extract(cfg.replace(out=str(tmp_path / "single.h5")), verbose=False).path

    # Shard 1 of 3 interrupted after its first batch, as a pre-empted task leaves it.
    real_write, calls = CacheWriter.write, []

    def write_then_stop(self, *args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(CacheWriter, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg.replace(shard="1/3", workers=1), verbose=False)
    monkeypatch.undo()

    logs = tmp_path / "logs"
    flags = [*cfg.replace(workers=0).flags(), "--shards", "3", "--gpus-per-task", "0", "--cpus-per-task", "1",
             "--log-dir", str(logs)]
    array, merge = submit(slurm_cluster, flags, "--tasks", "0,2")
    states = wait_for(slurm_cluster, array, merge)
    assert states == {f"{array}_0": "COMPLETED", f"{array}_2": "COMPLETED", merge: "FAILED"}, states
    merge_log = (logs / f"merge-{merge}.log").read_text()
    assert "shard(s) 1 (pets.shard1-of-3.h5: 4 of 8 files done) of 3 incomplete" in merge_log, merge_log

    array, merge = submit(slurm_cluster, flags, "--tasks", "1")  # the failed task alone, and a new merge
    states = wait_for(slurm_cluster, array, merge)
    assert states == {f"{array}_1": "COMPLETED", merge: "COMPLETED"}, states
    task_log = (logs / f"extract-{array}_1.log").read_text()
    assert "resumed: " in task_log and "4 processed in this run" in task_log, task_log
    assert "#SBATCH --array=1\n" in (logs / "extract.sbatch").read_text()
    assert_identical(tmp_path / "features" / "pets.h5", single)
