"""The CLI and its Make wrappers as a user meets them: a Make variable for every flag, `make clean` that keeps user
data, a `--help` written for users, quiet ends into closed pipes, and no TensorFlow start-up noise on stderr."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import quiet
from pipeline.cli import COMMANDS, SIGPIPE_STATUS, build_parser
from tests.conftest import ROOT, write_images

MAKEFILE = ROOT / "Makefile"
# $(call flag,VAR,flag) and $(if $(VAR),--flag): the two ways the Makefile turns a variable into a flag
VALUE_FLAG = re.compile(r"\$\(call flag,([A-Z_]+),([a-z][\w-]*)\)")
SWITCH_FLAG = re.compile(r"\$\(if \$\(([A-Z_]+)\),--([a-z][\w-]*)\)")
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def make_target(command: str) -> str:
    return "slurm-extract" if command == "slurm" else command


def make_variables() -> list[str]:
    text = MAKEFILE.read_text()
    return sorted({var for var, _ in VALUE_FLAG.findall(text) + SWITCH_FLAG.findall(text)} | {"CACHE"})


def command_line(target: str, cwd: Path, variables: dict[str, str]) -> list[str]:
    """What `make TARGET VAR=...` runs, as argv after `-m pipeline` (make -n: nothing runs; -o: no venv install)."""
    done = subprocess.run([MAKE, "-n", "-f", str(MAKEFILE), "-o", ".venv/.installed", target,
                           *(f"{k}={v}" for k, v in variables.items())],
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.replace("\\\n", " ").splitlines() if " -m pipeline " in line]
    assert len(lines) == 1, done.stdout
    argv = shlex.split(lines[0])
    return argv[argv.index("pipeline") + 1:]


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help") and
            a.help != argparse.SUPPRESS}


# ---- a Make variable for every flag ------------------------------------------------------------------------------

@needs_make
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_of_every_command_has_a_make_variable_and_back(command, tmp_path):
    """With every Make variable set, the target passes every flag of its command, and only flags it has."""
    variables = {name: "1" for name in make_variables()}
    argv = command_line(make_target(command), tmp_path, variables)
    assert argv.index(command) == 1 and argv[0] == "--debug", argv  # DEBUG=1, before the command
    passed = {a for a in argv[2:] if a.startswith("--")}
    sub = subparser(command)
    assert passed == options(sub), (f"make {make_target(command)}: missing {sorted(options(sub) - passed)}, "
                                    f"unknown {sorted(passed - options(sub))}")
    args = build_parser(command).parse_args(argv)  # the values reach the right flags (types, positionals)
    assert args.command == command and args.debug
    if command == "verify":
        assert args.cache == "1"


@needs_make
def test_unset_make_variables_pass_no_flags(tmp_path):
    """So the CLI's defaults stay the single source of truth."""
    assert command_line("extract", tmp_path, {}) == ["extract"]
    assert command_line("classify", tmp_path, {"LABEL_COLUMN": "breed"}) == ["classify"]
    assert command_line("extract", tmp_path, {"LABEL_COLUMN": "breed", "WORKERS": "0", "PATH_COLUMN": "file"}) == [
        "extract", "--path-column", "file", "--label-column", "breed", "--workers", "0"]


def test_a_make_variable_means_the_same_flag_in_every_target():
    text = MAKEFILE.read_text()
    meaning: dict[str, set[str]] = {}
    for var, flag in VALUE_FLAG.findall(text) + SWITCH_FLAG.findall(text):
        meaning.setdefault(var, set()).add(flag)
    assert {var: flags for var, flags in meaning.items() if len(flags) > 1} == {}


def test_every_make_variable_is_documented():
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    missing = [var for var in make_variables() if not re.search(rf"`{var}[`=]|\b{var}=", docs)]
    assert missing == []


# ---- make clean keeps user data ----------------------------------------------------------------------------------

def make_tree(root: Path) -> None:
    shutil.copy(MAKEFILE, root / "Makefile")
    for folder in ["build/lib", "feature_cache.egg-info", "pkg/__pycache__", ".pytest_cache/v", "mutants/pkg",
                   "cache/engines", "results/20250101-120000/best", ".venv/lib/__pycache__", "data/ants",
                   "predictions/run__best"]:
        (root / folder).mkdir(parents=True)
    for file in ["pkg/m.py", "pkg/__pycache__/m.cpython-311.pyc", "cache/a.h5", "cache/engines/x.onnx",
                 "results/20250101-120000/best/model.json", ".venv/lib/__pycache__/x.pyc", "data/ants/1.jpg",
                 "predictions/run__best/new.csv", "predictions/run__best/new.h5"]:
        (root / file).write_text("x")


def run_make(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FEATURE_CACHE_DIR", "MAKEFLAGS")} | (env or {})
    return subprocess.run([MAKE, *args], cwd=root, capture_output=True, text=True, timeout=60, env=env)


@needs_make
def test_make_clean_removes_build_artefacts_only(tmp_path):
    make_tree(tmp_path)
    done = run_make(tmp_path, "clean")
    assert done.returncode == 0, done.stderr
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    for gone in ["build", "feature_cache.egg-info", "pkg/__pycache__", ".pytest_cache", "mutants"]:
        assert gone not in left
    for kept in ["cache/a.h5", "cache/engines/x.onnx", "results/20250101-120000/best/model.json", "pkg/m.py",
                 ".venv/lib/__pycache__/x.pyc", "data/ants/1.jpg", "predictions/run__best/new.csv"]:
        assert kept in left


@needs_make
def test_make_clean_data_lists_then_deletes_caches_and_results(tmp_path):
    make_tree(tmp_path)
    done = run_make(tmp_path, "clean-data")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ("caches live in cache/ (the default; set FEATURE_CACHE_DIR to move them), results in results/, "
            "predictions in predictions/") in out
    assert re.search(r"^  cache/  \S+, 2 files$", out, re.M) and re.search(r"^  results/  \S+, 1 files$", out, re.M)
    assert re.search(r"^  predictions/  \S+, 2 files$", out, re.M)
    assert out.index("deleting") < out.index("deleted.")
    assert not any((tmp_path / d).exists() for d in ("cache", "results", "predictions"))
    assert (tmp_path / "data" / "ants" / "1.jpg").exists() and (tmp_path / "build").exists()
    again = run_make(tmp_path, "clean-data")
    assert again.returncode == 0 and "nothing to delete" in again.stdout


@needs_make
def test_make_clean_data_follows_feature_cache_dir_and_refuses_a_folder_holding_this_one(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    make_tree(work)
    elsewhere = tmp_path / "scratch" / "features"
    elsewhere.mkdir(parents=True)
    (elsewhere / "b.h5").write_text("x")
    done = run_make(work, "clean-data", env={"FEATURE_CACHE_DIR": str(elsewhere)})
    assert done.returncode == 0, done.stderr
    assert f"caches live in {elsewhere}/ (from FEATURE_CACHE_DIR)" in done.stdout
    assert not elsewhere.exists() and (tmp_path / "scratch").exists() and (work / "cache" / "a.h5").exists()
    for bad in [".", "..", str(tmp_path)]:  # the working folder itself, or one above it: refused, nothing deleted
        refused = run_make(work, "clean-data", f"FEATURE_CACHE_DIR={bad}")
        assert refused.returncode != 0 and "refusing to delete" in refused.stderr, refused.stdout
        assert (work / "Makefile").exists() and (work / "data" / "ants" / "1.jpg").exists()
        assert (tmp_path / "scratch").exists()


# ---- --help ------------------------------------------------------------------------------------------------------

def test_top_level_help_is_for_users_with_stages_and_examples(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser(prog="feature-cache").parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: feature-cache")
    assert "Two-stage transfer learning" in text and "(extract)" in text and "(classify)" in text
    assert "feature-cache extract --data path/to/images" in text and "feature-cache COMMAND --help" in text
    assert "The thin CLI" not in text and "exit code" not in text  # not the module's note for developers
    for name in COMMANDS:  # each command listed with its one-line help
        assert re.search(rf"^    {name}\s+\S", text, re.M) or re.search(rf"^    {name}\n\s+\S", text, re.M), name


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_a_help_line_and_its_own_help(command, capsys):
    assert COMMANDS[command][1].strip()
    with pytest.raises(SystemExit) as done:
        build_parser(command).parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m pipeline {command}") and COMMANDS[command][1] in text


# ---- closed pipes ------------------------------------------------------------------------------------------------

def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    return env | {"PYTHONPATH": str(ROOT)} | extra


@pytest.mark.parametrize("args", [["backbones"], ["layers", "--backbone", "vgg19"]])
def test_output_into_a_pipe_closed_early_ends_quietly(args):
    """`python -m pipeline backbones | head -3`, with the reader gone before the first write: no message on stderr
    (no 'error: BrokenPipeError', no 'Exception ignored'), the exit status of a command ended by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == SIGPIPE_STATUS == 141
    assert err == ""


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(monkeypatch, capsys):
    from pipeline import cli, inspect_cmd

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_cmd, "run_backbones", broken)
    assert cli.main(["backbones"]) == 1
    assert capsys.readouterr().err.startswith("error: BrokenPipeError")


# ---- TensorFlow's start-up noise ---------------------------------------------------------------------------------

NOISE = re.compile(r"E0000|cuInit|absl|oneDNN|tensorflow/|cudart_stub|cpu_feature_guard")


def test_an_extraction_through_the_cli_prints_no_tensorflow_noise(tmp_path):
    """TF_CPP_MIN_LOG_LEVEL unset, as in a user's shell: stderr has the progress bar, the ONNX export's line with
    its elapsed time, and nothing from TensorFlow."""
    for k, name in enumerate(["cats", "dogs"]):
        write_images(tmp_path / "data" / name, 3, seed=k)
    done = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", str(tmp_path / "data"),
                           "--backbone", "vgg19", "--weights", "none", "--image-size", "32", "--layer", "block1_pool",
                           "--out", str(tmp_path / "c.h5")],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "c.h5").exists()
    noisy = [line for line in re.split(r"[\r\n]", done.stderr) if NOISE.search(line)]
    assert noisy == []
    assert re.search(r"exporting the model to ONNX \(random weights: not kept\): 00:\d\d", done.stderr)  # no silent wait


def test_filtered_stderr_drops_what_tensorflow_would_and_keeps_the_rest(capfd, monkeypatch):
    """The file-descriptor-level filter around `import tensorflow`, fed absl-style lines as the C++ code writes
    them; --debug (keep_tensorflow_logs) and a user's TF_CPP_MIN_LOG_LEVEL=0 keep everything."""
    lines = [quiet.BANNER,
             "I0000 00:00:1796614444.987927   14615 cudart_stub.cc:31] Could not find cuda drivers on your machine",
             "E0000 00:00:1796614503.553184   15142 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
             "F0000 00:00:1796614503.553184   15142 x.cc:1] fatal: shown at every level",
             "ImportError: a real problem stays visible"]
    payload = ("\n".join(lines) + "\n").encode()
    for level, kept in [("3", lines[3:]), ("2", lines[2:]), ("0", lines)]:
        monkeypatch.setenv(quiet.ENV, level)
        capfd.readouterr()
        with quiet.filtered_stderr():
            os.write(2, payload)
        assert capfd.readouterr().err.splitlines() == kept, level


def test_import_pipeline_sets_the_quiet_level_unless_the_user_set_one_and_debug_undoes_it():
    code = ("import os, sys, pipeline; from pipeline import quiet; "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], any(isinstance(f, quiet._QuietImport) for f in sys.meta_path), "
            "'tensorflow' in sys.modules); quiet.keep_tensorflow_logs(); "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], any(isinstance(f, quiet._QuietImport) for f in sys.meta_path))")
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                     text=True, timeout=120).stdout.split()
    assert run(cli_env()) == ["3", "True", "False", "0", "False"]
    assert run(cli_env(TF_CPP_MIN_LOG_LEVEL="1")) == ["1", "True", "False", "1", "False"]
