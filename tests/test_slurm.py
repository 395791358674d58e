"""`python -m pipeline slurm`: the scripts it writes, and a real run on a private single-node SLURM
(tests/slurm_cluster.py): array tasks extract shards, a killed shard resumes when its task is resubmitted alone,
and the dependent merge equals a one-process extraction bit for bit."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from features.backbones import get_backbone
from features.errors import UsageError
from features.model import build_base
from features.store import CacheWriter, cache_dir, read_attrs
from pipeline import extract_cmd
from pipeline.config import ExtractConfig
from pipeline.extraction import extract
from pipeline.cli import main
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
    out = str(cache_dir() / "pets__vgg19__block2_pool__w-none.h5")
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


ODD = "my data #1 $(touch pwned) 'q' \"dq\" 50%"  # blanks, a comment sign, shell syntax, quotes, a % pattern


def test_odd_names_are_quoted_for_bash_and_for_sbatch(tmp_path):
    """The command line reads back (shlex, as bash does) to exactly the flags; #SBATCH values are double-quoted
    with \\ " # escaped and % doubled, which sbatch reads back verbatim (the real-SLURM test below submits one)."""
    logs = tmp_path / ODD / "logs"
    cfg = CFG.replace(data=str(tmp_path / ODD), out=str(tmp_path / ODD / "c.h5"), labels="--x;touch pwned")
    p = plan(cfg, SlurmOptions(shards=2, log_dir=str(logs), partition="a b"), python="/v env/python",
             cwd=tmp_path / ODD)
    command = p.extract_script.split("exec ", 1)[1].replace("\\\n", " ")
    words = shlex.split(command.replace('"${SLURM_ARRAY_TASK_ID}/2"', "I/2"))
    assert words[:4] == ["/v env/python", "-m", "pipeline", "extract"] and words[-2:] == ["--shard", "I/2"]
    assert words[words.index("--data") + 1] == str(tmp_path / ODD) and words[words.index("--labels") + 1] == cfg.labels
    escaped = str(tmp_path / ODD).replace('"', '\\"').replace("#", "\\#")
    lines = p.extract_script.splitlines()
    assert f'#SBATCH --chdir="{escaped}"' in lines and '#SBATCH --partition="a b"' in lines
    assert f'#SBATCH --output="{escaped.replace("%", "%%")}/logs/extract-%A_%a.log"' in lines
    assert "#SBATCH --job-name=extract-c" in lines
    named = plan(CFG.replace(out="x/my cache (v2).h5"), SlurmOptions(shards=1))
    assert "#SBATCH --job-name=merge-my_cache_v2_\n" in named.merge_script()


@pytest.mark.parametrize("flag", ["--data", "--out", "--labels", "--log-dir", "--partition", "--layer"])
def test_names_with_a_newline_are_refused_in_one_line(flag, tmp_path, capsys):
    bad = "x\ntouch pwned;#"
    argv = ["slurm", "--backbone", "vgg19", "--weights", "none", "--data", "data/hymenoptera-small", "--shards", "2",
            "--log-dir", str(tmp_path / "logs"), flag, bad]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {flag} 'x\\ntouch pwned;#' contains a newline or another control character" in err
    assert not (tmp_path / "logs").exists() and not (ROOT / "pwned").exists()


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
@pytest.mark.slow
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


@pytest.mark.slurm
@pytest.mark.slow
def test_a_data_folder_with_an_odd_name_runs_on_real_slurm_and_nothing_is_injected(slurm_cluster, tmp_path):
    """Data, cache, logs and working folder all under a name with a blank, '#', quotes, '%' and shell syntax."""
    home = tmp_path / ODD
    for k, name in enumerate(["ants", "bees"]):
        write_images(home / "data" / name, 3, seed=30 + k)
    weights = home / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 32).save_weights(weights)
    out, logs = home / "out dir" / "pets.h5", home / "logs"
    flags = ["--backbone", "vgg19", "--weights", str(weights), "--data", str(home / "data"), "--layer", "block1_pool",
             "--image-size", "32", "--batch-size", "4", "--out", str(out), "--shards", "2", "--gpus-per-task", "0",
             "--cpus-per-task", "1", "--log-dir", str(logs)]
    done = run_cli("slurm", *flags, cwd=home, env=slurm_cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    array, merge = re.search(r"submitted array job (\d+) .* merge job (\d+)", done.stdout).groups()
    states = wait_for(slurm_cluster, array, merge)
    assert states == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", merge: "COMPLETED"}, \
        (states, [p.read_text() for p in logs.glob("*.log")])
    assert sorted(p.name for p in logs.glob("*.log")) == [f"extract-{array}_0.log", f"extract-{array}_1.log",
                                                         f"merge-{merge}.log"]
    attrs = read_attrs(out)
    assert attrs.complete and attrs.num_candidates == 6 and attrs.data_root == str(home / "data")
    assert not [p for p in tmp_path.rglob("pwned")] and not (ROOT / "pwned").exists()


def _stand_in(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + body)
    (folder / name).chmod(0o755)


SCONTROL_CONFIG = """Configuration data as of 2026-01-01T00:00:00
MaxArraySize            = 1001
MaxJobCount             = 10000
"""


def test_a_5000_shard_array_stays_below_max_array_size_and_runs_every_shard_once(tmp_path, monkeypatch, capsys):
    """`scontrol show config` says MaxArraySize = 1001: the dry run's array has indices 0..999 (throttled to 50 at
    once), and the --shard each task's bash computes names every shard 0..4999 exactly once."""
    from pipeline.extraction import shard_range
    from pipeline.slurm import read_max_array_size

    _stand_in(tmp_path / "bin", "scontrol", f"cat <<'END'\n{SCONTROL_CONFIG}END\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert read_max_array_size() == 1001
    argv = ["slurm", "--backbone", "vgg19", "--layer", "block2_pool", "--weights", "none", "--data",
            "data/hymenoptera-small", "--shards", "5000",
            "--max-running", "50", "--log-dir", str(tmp_path / "logs"), "--dry-run"]
    assert main(argv) == 0
    script = capsys.readouterr().out.split("# ---- ")[1]
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)%(\d+)$", script, re.MULTILINE)
    assert array and array.groups() == ("0", "999", "50") and int(array[2]) < 1001
    word = re.search(r'--shard ("[^"]+")$', script, re.MULTILINE)[1]
    assert word == '"$((SLURM_ARRAY_TASK_ID * 5))-$((SLURM_ARRAY_TASK_ID * 5 + 4))/5000"'
    done = subprocess.run(["bash", "-c", f"for SLURM_ARRAY_TASK_ID in $(seq {array[1]} {array[2]}); do "
                                         f"printf '%s\\n' {word}; done"], capture_output=True, text=True, check=True)
    shards = [s for value in done.stdout.split() for s in shard_range(value)]
    assert sorted(shards, key=lambda s: int(s.split("/")[0])) == [f"{i}/5000" for i in range(5000)]
    assert "--manifest" in script and not (tmp_path / "logs").exists()  # listed at submit time, not in a dry run


def test_array_tasks_are_sized_to_max_array_size_and_throttled():
    from pipeline.slurm import tasks_for

    assert tasks_for(5000, 1001) == (1000, 5) and tasks_for(1001, 1001) == (1001, 1) and tasks_for(3, None) == (3, 1)
    assert tasks_for(5001, 1001) == (1001, 5) and tasks_for(2003, 1001) == (668, 3)
    p = plan(CFG, SlurmOptions(shards=2003, tasks="667", max_running=4), max_array_size=1001)
    assert (p.per_task, p.tasks, list(p.shards_of(667))) == (3, [667], [2001, 2002])
    assert "#SBATCH --array=667%4\n" in p.extract_script
    assert "#SBATCH --array=0-2%1\n" in plan(CFG, SlurmOptions(shards=3, max_running=1)).extract_script
    with pytest.raises(UsageError, match=r"^max-running 0 is not valid. Expected a positive number"):
        plan(CFG, SlurmOptions(shards=3, max_running=0))
    with pytest.raises(UsageError, match=r"^tasks '668' is not valid. Expected array indices within 0\.\.667"):
        plan(CFG, SlurmOptions(shards=2003, tasks="668"), max_array_size=1001)


def test_submit_lists_data_once_into_the_manifest_the_tasks_read(tmp_path, monkeypatch):
    from features.catalog import discover, manifest_path, manifest_source, read_manifest
    from pipeline.slurm import submit

    for k, name in enumerate(["ants", "bees"]):
        write_images(tmp_path / "data" / name, 5, seed=k)
    _stand_in(tmp_path / "bin", "sbatch", "echo 7\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = CFG.replace(data=str(tmp_path / "data"), out=str(tmp_path / "c.h5"), augment=1)
    manifest = manifest_path(tmp_path / "c.h5")
    p = plan(cfg, SlurmOptions(shards=3, log_dir=str(tmp_path / "logs")), python="/p", cwd=tmp_path, list_data=True)
    assert f"    --manifest {manifest} \\" in p.extract_script.splitlines() and not manifest.exists()
    assert submit(p) == ("7", "7")
    listed = discover(tmp_path / "data").with_views(1)
    for i in range(3):
        part, fingerprint = read_manifest(manifest, (i, 3), manifest_source(cfg.data, None, None, None, 1))
        assert part.paths == listed.shard(i, 3).paths and fingerprint == listed.fingerprint()
    given = plan(cfg.replace(manifest=str(manifest)), SlurmOptions(shards=3), python="/p", cwd=tmp_path,
                 list_data=True)
    assert given.listing is None and f"    --manifest {manifest} \\" in given.extract_script.splitlines()


@pytest.mark.slurm
@pytest.mark.slow
def test_tasks_that_each_run_a_range_of_shards_merge_to_a_single_run(slurm_cluster, tmp_path, monkeypatch):
    """5 shards where the array may have 3 indices (a MaxArraySize of 3, given to `plan`): 3 tasks run shards 0-1, 2-3
    and 4, each reading its rows from the manifest listed at submit time, and the merge equals a one-process run."""
    from pipeline.slurm import submit

    for k, name in enumerate(["ants", "bees"]):
        write_images(tmp_path / "data" / name, 7, seed=50 + k)
    weights = tmp_path / "w.weights.h5"
    keras.utils.set_random_seed(0)
    build_base(get_backbone("vgg19"), "none", 32).save_weights(weights)
    cfg = ExtractConfig(backbone="vgg19", weights=str(weights), data=str(tmp_path / "data"), layer=["block1_pool"],
                        image_size=32, batch_size=4, workers=1, out=str(tmp_path / "features" / "pets.h5"))
    single = extract(cfg.replace(out=str(tmp_path / "single.h5")), verbose=False).path
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    p = plan(cfg, SlurmOptions(shards=5, gpus_per_task=0, cpus_per_task=1, log_dir=str(tmp_path / "logs"),
                               max_running=2), max_array_size=3, list_data=True)
    assert (p.per_task, p.tasks) == (2, [0, 1, 2]) and "#SBATCH --array=0-2%2\n" in p.extract_script
    array, merge = submit(p)
    states = wait_for(slurm_cluster, array, merge)
    assert states == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
                      merge: "COMPLETED"}, (states, [log.read_text() for log in (tmp_path / "logs").glob("*.log")])
    assert p.manifest.exists() and sorted(f.name for f in (tmp_path / "features").glob("pets.shard*")) == [
        f"pets.shard{i}-of-5.h5" for i in range(5)]
    assert_identical(tmp_path / "features" / "pets.h5", single)
