"""Every failure a user can cause ends in one line and a non-zero exit, never a traceback (issue 10, item 7);
`--debug` shows the traceback. Each case runs through `pipeline.cli.main` as a user's command line would."""
from __future__ import annotations

import os

import pytest

from features.errors import UsageError
from features.store import progress_path
from features.update import update_path
from pipeline import extraction as extract_stage
from pipeline.cli import main
from tests.conftest import fails_in_one_line
from pipeline.extraction import parse_shard


@pytest.fixture
def no_model(monkeypatch):
    """Every check below must happen before a model is built: building one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(extract_stage, "build_base", refuse)


def test_negative_workers(capsys, class_folder, tmp_path, no_model):
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--workers", "-3",
                                      "--out", str(tmp_path / "x.h5")])
    assert "workers -3 is not valid" in line and "0 for one per CPU core" in line


def test_out_that_is_a_folder(capsys, class_folder, tmp_path, no_model):
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--out", str(tmp_path)])
    assert f"--out '{tmp_path}' is a folder. Expected a file path such as {tmp_path / 'features.h5'}" in line


def test_out_in_a_folder_that_is_not_writable(capsys, class_folder, no_model):
    """/sys refuses new files even to root (a chmod would not stop root, who runs the tests in CI)."""
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--out", "/sys/new/x.h5"])
    assert "--out '/sys/new/x.h5' cannot be written: the folder '/sys' is not writable" in line
    assert "Choose another --out" in line


@pytest.mark.parametrize("length", [240, 300])
def test_out_name_too_long_for_the_filesystem(capsys, class_folder, tmp_path, no_model, length):
    """Issue 23: a 240-character name fits, but not the hidden names the store derives from it (its partial file,
    progress record, an update's scratch cache): 'File name too long' came only after the model export."""
    out = tmp_path / ("x" * (length - 3) + ".h5")
    limit, longest = os.pathconf(tmp_path, "PC_NAME_MAX"), progress_path(update_path(out)).name
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--out", str(out)])
    assert (f"--out '{out}' is too long for the filesystem at '{tmp_path}': it needs the name "
            f"'{longest[:20]}…{longest[-25:]}' ({len(longest)} bytes), over the limit of {limit} bytes per name. "
            f"Choose a --out whose name is at least {len(longest) - limit} bytes shorter.") in line
    assert list(tmp_path.iterdir()) == [class_folder]


@pytest.mark.parametrize("sidecar,message", [
    ('{"preprocess": "tf", ', "is not valid JSON"),
    ('["tf"]', "holds a list, expected an object"),
    ('{"preprocess": "tf", "input_size": "big"}', "input_size 'big' is not valid. Expected the model's input side"),
    ('{"preprocess": "tf", "input_size": 0}', "input_size 0 is not valid"),
    ('{"preprocess": 3}', "preprocess 3 is not valid. Expected a string"),
    ('{"preprocess": "mean=1/2,std=3"}', "not 1 or 3 values"),
])
def test_broken_sidecar_of_a_keras_model(capsys, class_folder, tmp_path, sidecar, message, no_model):
    model = tmp_path / "m.keras"
    model.write_bytes(b"not read: the sidecar is checked first")
    (tmp_path / "m.json").write_text(sidecar)
    line = fails_in_one_line(capsys, ["extract", "--data", str(class_folder), "--backbone", str(model),
                                      "--out", str(tmp_path / "x.h5")])
    assert message in line and ("m.json" in line or "preprocess" in line)


@pytest.mark.parametrize("make", [
    lambda p: p.write_text("notes\n"),  # not HDF5
    lambda p: p.mkdir(),  # h5py: 'Is a directory', over several lines
])
def test_a_path_that_is_not_a_cache(capsys, tmp_path, make):
    bad = tmp_path / "bad.h5"
    make(bad)
    line = fails_in_one_line(capsys, ["classify", "--features", str(bad), "--out", str(tmp_path / "r")])
    assert "bad.h5" in line


def test_os_errors_name_the_path_and_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    import pipeline.classify_cmd as classify_cmd

    def denied(cfg):
        raise PermissionError(13, "Permission denied", str(tmp_path / "r"))

    monkeypatch.setattr(classify_cmd, "classify", denied)
    line = fails_in_one_line(capsys, ["classify", "--out", str(tmp_path / "r")])
    assert line == f"error: Permission denied '{tmp_path / 'r'}'. Check the path and its permissions."
    monkeypatch.setattr(classify_cmd, "classify", lambda cfg: 1 / 0)  # an unexpected failure: type, and where to look
    line = fails_in_one_line(capsys, ["classify"], code=1)
    assert line == "error: ZeroDivisionError: division by zero. Rerun with --debug for the traceback."
    for argv in (["--debug", "classify"], ["classify", "--debug"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)


def test_a_shard_from_the_environment_names_its_variables():
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}
    with pytest.raises(UsageError, match=r"shard '4/4' \(from the environment: SLURM_ARRAY_TASK_ID='4', "
                                         r"SLURM_ARRAY_TASK_COUNT='4'\) is not valid.*Unset SLURM_ARRAY_TASK_ID/"):
        parse_shard(None, env)
    with pytest.raises(UsageError, match=r"JOB_COMPLETION_INDEX='x'"):
        parse_shard(None, {"JOB_COMPLETION_INDEX": "x", "JOB_COMPLETION_COUNT": "2"})
    with pytest.raises(UsageError, match=r"^shard '2/2' is not valid.*Pass --shard I/N\.$"):
        parse_shard("2/2", env)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/feature-cache", "feature-cache"),
                                         ("/src/pipeline/__main__.py", "python -m pipeline")])
def test_cli_usage_names_the_program_as_it_was_started(capsys, monkeypatch, argv0, prog):
    monkeypatch.setattr("sys.argv", [argv0])
    with pytest.raises(SystemExit) as exit_:
        main(["predict"])  # --model and --data missing: argparse prints the usage line
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"usage: {prog} predict ")
