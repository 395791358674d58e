"""pipeline/slurm.py, word for word: both scripts in full, hostile names run through bash (the command a job runs
reaches the program as exactly the flags), every #SBATCH value escaped as sbatch reads it back, each refusal's exact
sentence and its boundary, and `sbatch`/`submit` against a stand-in sbatch on the PATH. Written against the mutants
`make mutate MODULES=pipeline/slurm.py` left alive (docs/testing.md)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from features.errors import UsageError
from features.store import partial_path, progress_path
from pipeline.config import ExtractConfig, shard_out
from pipeline.slurm import (DEPENDENCY_PLACEHOLDER, SlurmOptions, directive, job_name, log_pattern, parse_tasks, plan,
                            sbatch, submit)

CFG = ExtractConfig(backbone="vgg19", layer=["block2_pool"], data="data/pets", weights="none", out="features/pets.h5")
FLAGS = ["--backbone", "vgg19", "--data", "data/pets", "--layer", "block2_pool", "--weights", "none",
         "--out", "features/pets.h5"]

EXTRACT = """#!/bin/bash
# Sharded extraction into features/pets.h5 (3 shards): array task I runs shard I/3, resuming
# it if an earlier run of the task was interrupted. Written by `python -m pipeline slurm`.
# Resubmit one task alone:  sbatch --array=I /repo/logs/slurm/pets/extract.sbatch
#SBATCH --job-name=extract-pets
#SBATCH --array=0-2
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=02:00:00
#SBATCH --chdir=/repo
#SBATCH --output=/repo/logs/slurm/pets/extract-%A_%a.log
#SBATCH --open-mode=append
#SBATCH --requeue

exec /venv/bin/python -m pipeline extract \\
    --backbone vgg19 \\
    --data data/pets \\
    --layer block2_pool \\
    --weights none \\
    --out features/pets.h5 \\
    --workers 4 \\
    --shard "${SLURM_ARRAY_TASK_ID}/3"
"""
MERGE = """#!/bin/bash
# Joins the 3 shards of features/pets.h5 once every array task has succeeded.
#SBATCH --job-name=merge-pets
#SBATCH --cpus-per-task=1
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=02:00:00
#SBATCH --chdir=/repo
#SBATCH --output=/repo/logs/slurm/pets/merge-%j.log
#SBATCH --dependency=afterok:<array job id>
#SBATCH --kill-on-invalid-dep=yes

exec /venv/bin/python -m pipeline merge \\
    --shards-of features/pets.h5
"""


def test_both_scripts_in_full():
    p = plan(CFG, SlurmOptions(shards=3, partition="gpu", time="02:00:00", account="proj"), python="/venv/bin/python",
             cwd=Path("/repo"))
    assert p.extract_script == EXTRACT and p.merge_template == MERGE
    assert (p.out, p.shards, p.tasks, p.log_dir) == (Path("features/pets.h5"), 3, [0, 1, 2],
                                                     Path("/repo/logs/slurm/pets"))
    assert p.extract_path == Path("/repo/logs/slurm/pets/extract.sbatch")
    assert p.merge_path == Path("/repo/logs/slurm/pets/merge.sbatch")
    assert p.merge_script() == MERGE and DEPENDENCY_PLACEHOLDER == "<array job id>"
    assert p.merge_script("42") == MERGE.replace("afterok:<array job id>", "afterok:42")


def test_a_resubmission_without_gpus_keeps_its_workers_and_overwrites_only_in_the_merge():
    cfg = CFG.replace(overwrite=True, workers=2)
    p = plan(cfg, SlurmOptions(shards=2, tasks="1", gpus_per_task=0, cpus_per_task=1, log_dir="/abs/logs"),
             python="/venv/bin/python", cwd=Path("/repo"))
    lines = p.extract_script.splitlines()
    assert "#SBATCH --array=1" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert not [line for line in lines if "--gres" in line or "--partition" in line or "--account" in line
                or "--time" in line]
    assert "    --workers 2 \\" in lines and "--overwrite" not in p.extract_script
    assert "# Resubmit one task alone:  sbatch --array=I /abs/logs/extract.sbatch" in lines
    assert "#SBATCH --output=/abs/logs/extract-%A_%a.log" in lines
    assert p.merge_template.endswith("exec /venv/bin/python -m pipeline merge \\\n    --shards-of features/pets.h5 \\\n"
                                     "    --overwrite\n")
    assert p.log_dir == Path("/abs/logs") and p.tasks == [1]
    relative = plan(CFG, SlurmOptions(shards=1, log_dir="logs/x"), python="/p", cwd=Path("/repo"))
    assert relative.log_dir == Path("/repo/logs/x") and "#SBATCH --array=0-0" in relative.extract_script


def test_the_working_folder_defaults_to_the_current_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = plan(CFG, SlurmOptions(shards=2), python="/p")
    assert f"#SBATCH --chdir={tmp_path.resolve()}" in p.extract_script.splitlines()
    assert p.log_dir == tmp_path.resolve() / "logs" / "slurm" / "pets"


@pytest.mark.parametrize("spec,shards,expected", [
    (None, 3, [0, 1, 2]), ("all", 2, [0, 1]), ("2", 3, [2]), ("0", 1, [0]), ("2-3,0", 4, [0, 2, 3]),
    ("1,1-2", 3, [1, 2]), ("0-3", 4, [0, 1, 2, 3]), ("3,1", 4, [1, 3]),
])
def test_tasks_in_slurm_array_syntax(spec, shards, expected):
    assert parse_tasks(spec, shards) == expected


@pytest.mark.parametrize("spec", ["4", "0-4", "", "a", "-1", "3-1", "1;2", "1,,2"])
def test_tasks_outside_the_array_or_not_indices_are_refused(spec):
    with pytest.raises(UsageError) as err:
        parse_tasks(spec, 4)
    assert str(err.value) == (f"tasks '{spec}' is not valid. Expected array indices within 0..3 such as '1', '1,3' "
                              "or '0-2'.")


@pytest.mark.parametrize("value,line", [
    ("gpu", "#SBATCH --partition=gpu"),
    ("a-z_0.9/x%y:z=1,2+3@h", "#SBATCH --partition=a-z_0.9/x%y:z=1,2+3@h"),  # every plain character, bare
    ("", "#SBATCH --partition="),
    ("a b", '#SBATCH --partition="a b"'),
    ('say "hi"', '#SBATCH --partition="say \\"hi\\""'),
    ("back\\slash", '#SBATCH --partition="back\\\\slash"'),
    ("#1", '#SBATCH --partition="\\#1"'),
    ("it's", '#SBATCH --partition="it\'s"'),
    ("$(x)", '#SBATCH --partition="$(x)"'),
    (7, "#SBATCH --partition=7"),
])
def test_directive_values_are_bare_when_plain_and_quoted_with_escapes_otherwise(value, line):
    assert directive("partition", value) == line


def test_job_names_and_log_patterns():
    assert job_name("merge", Path("x/my cache (v2).h5")) == "merge-my_cache_v2_"
    assert job_name("extract", Path("/a b/ok-1.2_x+y.h5")) == "extract-ok-1.2_x+y"
    assert job_name("extract", Path("é#$.h5")) == "extract-_"
    assert log_pattern(Path("/logs/50%/a%b"), "extract-%A_%a.log") == "/logs/50%%/a%%b/extract-%A_%a.log"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\tb", "a\x1fb", "a\x7fb"])
def test_a_control_character_anywhere_is_refused_naming_where(bad):
    with pytest.raises(UsageError) as err:
        plan(CFG.replace(data=bad), SlurmOptions(shards=2), python="/p", cwd=Path("/repo"))
    assert str(err.value) == (f"--data {bad!r} contains a newline or another control character, which cannot go into "
                              "a job script safely. Rename it (or link it under a plain name) and retry.")
    with pytest.raises(UsageError, match=r"^--layer 'x.*' contains a newline"):
        plan(CFG.replace(layer=["block1_pool", f"x{bad}"]), SlurmOptions(shards=2), python="/p", cwd=Path("/repo"))
    with pytest.raises(UsageError, match=r"^--account 'x.*' contains a newline"):
        plan(CFG, SlurmOptions(shards=2, account=f"x{bad}"), python="/p", cwd=Path("/repo"))
    with pytest.raises(UsageError, match=r"^the python '/p.*' contains a newline"):
        plan(CFG, SlurmOptions(shards=2), python=f"/p{bad}", cwd=Path("/repo"))
    with pytest.raises(UsageError, match=r"^the working folder '/r.*' contains a newline"):
        plan(CFG, SlurmOptions(shards=2), python="/p", cwd=Path(f"/r{bad}"))


def test_blanks_and_non_ascii_letters_are_not_control_characters():
    p = plan(CFG.replace(data="my data/é ü ~"), SlurmOptions(shards=2), python="/p", cwd=Path("/repo"))
    assert "    --data 'my data/é ü ~' \\" in p.extract_script.splitlines()


@pytest.mark.parametrize("opts,cfg,message", [
    (SlurmOptions(shards=0), CFG, "shards 0 is not valid. Expected a positive number of array tasks."),
    (SlurmOptions(shards=-2), CFG, "shards -2 is not valid. Expected a positive number of array tasks."),
    (SlurmOptions(shards=3), CFG.replace(shard="0/3"),
     "--shard '0/3' cannot be combined with slurm: each array task sets its own shard; use --shards N."),
    (SlurmOptions(shards=3, gpus_per_task=-1), CFG, "gpus-per-task -1 is not valid. Expected a whole number >= 0."),
    (SlurmOptions(shards=3, cpus_per_task=0), CFG, "cpus-per-task 0 is not valid. Expected a whole number >= 1."),
])
def test_bad_options_are_refused_in_their_own_sentence(opts, cfg, message):
    with pytest.raises(UsageError) as err:
        plan(cfg, opts, python="/p", cwd=Path("/repo"))
    assert str(err.value) == message


HOSTILE = "my data #1 $(touch pwned) `id` 'q' \"dq\" \\ 50% ; & | * ~ {a,b} -x"


def _fake_program(folder: Path, name: str) -> Path:
    """An executable that writes the arguments it received, NUL-separated, to $ARGV_OUT."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / name
    program.write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$ARGV_OUT"\n')
    program.chmod(0o755)
    return program


def _run(script: str, tmp_path: Path, **env: str) -> list[str]:
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0
    out = tmp_path / "argv"
    done = subprocess.run(["bash", str(path)], env={**os.environ, "ARGV_OUT": str(out), **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out.read_bytes().decode().split("\0")[:-1]


def test_hostile_names_reach_the_program_as_exactly_the_flags_when_bash_runs_the_scripts(tmp_path):
    home = tmp_path / HOSTILE
    python = _fake_program(home / "bin $(x)", "python")
    cfg = CFG.replace(data=str(home / "data"), out=str(home / "out dir" / "c.h5"), labels="--x;touch pwned",
                      layer=["block1_pool", "a b"], overwrite=True)
    p = plan(cfg, SlurmOptions(shards=2, log_dir=str(home / "logs"), partition=HOSTILE), python=str(python),
             cwd=home)
    flags = cfg.replace(overwrite=False, workers=4).flags()
    assert _run(p.extract_script, tmp_path, SLURM_ARRAY_TASK_ID="1") == ["-m", "pipeline", "extract", *flags,
                                                                         "--shard", "1/2"]
    assert _run(p.merge_script("7"), tmp_path) == ["-m", "pipeline", "merge", "--shards-of", cfg.out, "--overwrite"]
    assert not list(tmp_path.rglob("pwned")) and not (Path.cwd() / "pwned").exists()
    resubmit = next(line for line in p.extract_script.splitlines() if line.startswith("# Resubmit"))
    words = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + resubmit.split(":  ", 1)[1]], capture_output=True,
                           text=True).stdout.split("\0")[:-1]
    assert words == ["sbatch", "--array=I", str(home / "logs" / "extract.sbatch")]


def _sbatch_value(line: str) -> str:
    """A #SBATCH value read back as sbatch's directive parser does: a double-quoted value ends at the first bare ",
    and inside it a backslash keeps the next character as it is."""
    value = line.split("=", 1)[1]
    if not value.startswith('"'):
        return value
    out, i = [], 1
    while value[i] != '"':
        if value[i] == "\\":
            i += 1
        out.append(value[i])
        i += 1
    assert value[i + 1:] == "", line
    return "".join(out)


def test_every_sbatch_value_reads_back_to_the_value_given(tmp_path):
    home = tmp_path / HOSTILE
    p = plan(CFG.replace(out=str(home / "c.h5")), SlurmOptions(shards=2, partition=HOSTILE, account='a"b', time="1:00",
                                                               log_dir=str(home / "logs")), python="/p", cwd=home)
    values = {line.split("=", 1)[0]: _sbatch_value(line) for line in p.extract_script.splitlines()
              if line.startswith("#SBATCH --") and "=" in line}
    assert values["#SBATCH --partition"] == HOSTILE and values["#SBATCH --account"] == 'a"b'
    assert values["#SBATCH --chdir"] == str(home) and values["#SBATCH --time"] == "1:00"
    assert values["#SBATCH --output"] == str(home / "logs").replace("%", "%%") + "/extract-%A_%a.log"
    assert values["#SBATCH --job-name"] == "extract-c"


def _stand_in_sbatch(tmp_path: Path, monkeypatch, body: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / "sbatch"
    program.write_text("#!/bin/sh\n" + body)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def test_sbatch_returns_the_job_id_and_refuses_a_failure_or_a_missing_sbatch(tmp_path, monkeypatch):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    _stand_in_sbatch(tmp_path, monkeypatch, 'echo "$@" > "$0.args"\nif [ -n "$FAIL" ]; then echo "no partition" >&2; '
                                            'exit 3; fi\necho " 123;cluster "\n')
    assert sbatch(script) == "123"
    assert (tmp_path / "bin" / "sbatch.args").read_text() == f"--parsable {script}\n"
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(UsageError) as err:
        sbatch(script)
    assert str(err.value) == f"sbatch {script} failed (3): no partition"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError) as err:
        sbatch(script)
    assert str(err.value) == ("sbatch was not found: run this on a SLURM login node, or add --dry-run to only print "
                              "the scripts.")


def test_submit_writes_both_scripts_and_chains_the_merge_to_the_array(tmp_path, monkeypatch):
    _stand_in_sbatch(tmp_path, monkeypatch, 'n=$(ls "$(dirname "$0")" | grep -c "^job")\ncp "$2" "$(dirname "$0")/job$n"\n'
                                            'echo $((100 + n))\n')
    p = plan(CFG.replace(out=str(tmp_path / "c.h5")), SlurmOptions(shards=2, log_dir=str(tmp_path / "logs")),
             python="/p", cwd=tmp_path)
    assert submit(p) == ("100", "101")
    assert (tmp_path / "bin" / "job0").read_text() == p.extract_script == p.extract_path.read_text()
    assert (tmp_path / "bin" / "job1").read_text() == p.merge_script("100") == p.merge_path.read_text()


def test_submit_with_overwrite_starts_only_the_submitted_shards_anew(tmp_path, monkeypatch):
    from classifiers.testing import write_cache

    _stand_in_sbatch(tmp_path, monkeypatch, "echo 5\n")
    out = tmp_path / "c.h5"
    shards = [shard_out(out, (i, 3)) for i in range(3)]
    for shard in shards:
        write_cache(shard, {"vec": np.zeros((2, 3), "float32")}, np.array([0, 1]))
        partial_path(shard).write_text("partial")
        progress_path(shard).write_text("{}")
    p = plan(CFG.replace(out=str(out)), SlurmOptions(shards=3, tasks="0,2", log_dir=str(tmp_path / "logs")),
             python="/p", cwd=tmp_path)
    submit(p)  # no overwrite: everything stays for the tasks to resume
    assert all(s.exists() and partial_path(s).exists() and progress_path(s).exists() for s in shards)
    submit(p, overwrite=True)
    for i, shard in enumerate(shards):
        kept = i == 1  # not submitted
        assert (shard.exists(), partial_path(shard).exists(), progress_path(shard).exists()) == (kept,) * 3
    submit(p, overwrite=True)  # nothing left to remove is fine
    shards[0].write_text("my notes")  # not a cache of this tool: refused, never removed
    with pytest.raises(UsageError, match="is not a feature cache of this tool"):
        submit(p, overwrite=True)
    assert shards[0].read_text() == "my notes"


# ---- the cluster's MaxArraySize, the listing at submit time, the log folder ---------------------------------------

def _stand_in_scontrol(tmp_path: Path, monkeypatch, body: str) -> None:
    folder = tmp_path / "sbin"
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/sh\n" + body)
    (folder / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_max_array_size_is_read_only_from_a_successful_scontrol_show_config(tmp_path, monkeypatch):
    """Exactly `scontrol show config` is asked; a failing scontrol, one that prints no MaxArraySize line, none on the
    PATH, or one that does not answer within SCONTROL_TIMEOUT_S, all mean 'unknown' (None)."""
    from pipeline import slurm
    from pipeline.slurm import read_max_array_size

    config = "MaxArraySize            = 1001\\n"
    _stand_in_scontrol(tmp_path, monkeypatch, f'[ "$*" = "show config" ] || exit 1\nprintf "{config}"\n'
                                              'exit "${SCONTROL_EXIT:-0}"\n')
    assert read_max_array_size() == 1001
    monkeypatch.setenv("SCONTROL_EXIT", "1")  # the line printed, but scontrol failed: not believed
    assert read_max_array_size() is None
    (tmp_path / "sbin" / "scontrol").write_text(f'#!/bin/sh\nsleep 5\nprintf "{config}"\n')
    monkeypatch.setattr(slurm, "SCONTROL_TIMEOUT_S", 0.5)
    assert read_max_array_size() is None
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert read_max_array_size() is None


def test_a_cache_names_its_jobs_with_its_capitals_kept():
    assert job_name("extract", Path("out/Pets 2024.h5")) == "extract-Pets_2024"


def test_a_throttle_below_one_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        plan(CFG, SlurmOptions(shards=3, max_running=0))
    assert str(err.value) == ("max-running 0 is not valid. Expected a positive number of array tasks allowed to run "
                              "at once.")


def test_submit_lists_a_labels_csv_with_its_named_columns_and_makes_the_log_folder_with_its_parents(
        tmp_path, monkeypatch):
    """The listing at submit time is made with every flag that shapes it (labels CSV, its path and label columns):
    the manifest reads back for exactly those flags, with the CSV's labels."""
    from features.catalog import manifest_path, manifest_source, read_manifest
    from pipeline.slurm import write_listing

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (data / name).write_bytes(b"not decoded when listed")
    labels = tmp_path / "labels.csv"
    labels.write_text("shot,species,label\na.jpg,cat,x\nb.jpg,dog,x\nc.jpg,cat,y\nd.jpg,dog,y\n")
    _stand_in_sbatch(tmp_path, monkeypatch, "echo 9\n")
    out = tmp_path / "c.h5"
    cfg = CFG.replace(data=str(data), out=str(out), labels=str(labels), path_column="shot", label_column="species")
    p = plan(cfg, SlurmOptions(shards=2, log_dir=str(tmp_path / "deep" / "er" / "logs")), python="/p", cwd=tmp_path,
             list_data=True)
    assert submit(p) == ("9", "9") and p.extract_path.exists()
    catalog, _ = read_manifest(manifest_path(out), None, manifest_source(str(data), str(labels), "shot", "species", 0))
    assert catalog.paths == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [catalog.label_names[i] for i in catalog.labels] == ["cat", "dog", "cat", "dog"]
    assert write_listing(p) == 4


def test_a_plan_without_a_listing_writes_no_manifest(tmp_path):
    from features.catalog import manifest_path
    from pipeline.slurm import write_listing

    out = tmp_path / "c.h5"
    given = plan(CFG.replace(out=str(out), manifest=str(tmp_path / "m.jsonl")), SlurmOptions(shards=2), python="/p",
                 cwd=tmp_path, list_data=True)
    assert given.listing is None and given.manifest is not None
    assert write_listing(given) == 0 and not manifest_path(out).exists() and not (tmp_path / "m.jsonl").exists()


def test_the_header_of_tasks_that_each_run_several_shards(tmp_path):
    """MaxArraySize 4 and 10 shards: 4 tasks of 3 shards each (the last of 1), said in the script's first lines."""
    p = plan(CFG, SlurmOptions(shards=10, log_dir=str(tmp_path)), python="/p", cwd=tmp_path, max_array_size=4)
    assert p.extract_script.splitlines()[1:4] == [
        "# Sharded extraction into features/pets.h5 (10 shards; MaxArraySize=4 allows array indices 0..3,",
        "# so 4 tasks): array task I runs shards 3*I to 3*I+2 of 10, one after the other, resuming each if an",
        "# earlier run of the task was interrupted. Written by `python -m pipeline slurm`."]
