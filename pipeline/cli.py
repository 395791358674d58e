"""The thin CLI: parse flags, call exactly one stage function, turn user errors into one line and a non-zero exit.

Every failure ends in one line on stderr and a non-zero exit: 2 for a usage error (a bad flag, a missing or
unusable path), 1 for anything else, never a traceback; `--debug` (before or after the command) shows it.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; the table below
is the only place that knows them all.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from features.errors import UsageError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("pipeline.extract_cmd", "push images once through a frozen, truncated backbone into an HDF5 cache"),
    "layers": ("pipeline.inspect_cmd", "list a backbone's layers (cut points) with output shapes"),
    "backbones": ("pipeline.inspect_cmd", "list registered backbones"),
    "weights": ("pipeline.inspect_cmd", "pre-fetch ImageNet weights into the Keras cache (needs internet)"),
    "classify": ("pipeline.classify_cmd", "train and rank many cheap heads on cached features"),
    "predict": ("pipeline.predict_cmd", "apply a saved head to new images"),
    "audit": ("pipeline.audit_cmd", "find near-duplicates (leakage), likely label errors and outliers in a cache"),
    "finetune": ("pipeline.finetune_cmd", "fine-tune the backbone + best head end to end (two phases) from a saved model"),
    "verify": ("pipeline.verify_cmd", "check every row of a cache against its checksums and for NaN/inf"),
    "merge": ("pipeline.merge_cmd", "join the shards of one extraction into a single cache"),
    "slurm": ("pipeline.slurm_cmd", "submit a sharded extraction as a SLURM job array plus a dependent merge"),
    "demo": ("pipeline.demo_cmd", "extract + classify on the shipped data and model"),
}


CONSOLE_SCRIPT = "feature-cache"  # pyproject.toml [project.scripts]


def program_name(argv0: str) -> str:
    """What the user typed to start us, for the usage line: the console script, else the module form (argv[0] is
    then the path of pipeline/__main__.py, which the user did not type)."""
    return CONSOLE_SCRIPT if os.path.basename(argv0) == CONSOLE_SCRIPT else "python -m pipeline"


def build_parser(command: str | None = None, prog: str = "python -m pipeline") -> argparse.ArgumentParser:
    """All commands are listed; only the chosen one's module is imported (keeps `--help` and start-up fast)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: an absent sub-command flag must not reset a --debug given before the command
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == command:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name}_arguments", getattr(mod, "add_arguments", None))(p)
            p.set_defaults(_run=getattr(mod, f"run_{name}", getattr(mod, "run", None)))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the user's screen
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command, program_name(sys.argv[0])).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: partial work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place that turns any failure into one line)
        if args.debug:
            raise
        line, code = one_line(err)
        print(f"error: {line}", file=sys.stderr)
        return code


def one_line(err: Exception) -> tuple[str, int]:
    """(message, exit code): a user's mistake as it is worded, anything else with its type and where to look.
    Whitespace is collapsed, so a library's multi-line message still ends in one line."""
    text = " ".join(str(err).split()) or "(no message)"
    if isinstance(err, UsageError):
        return text, 2
    if isinstance(err, USER_OS_ERRORS):
        if err.strerror is None:  # raised with a message of its own
            return text, 2
        where = f" '{err.filename}'" if err.filename else ""
        return f"{err.strerror}{where}. Check the path and its permissions.", 2
    return f"{type(err).__name__}: {text}. Rerun with --debug for the traceback.", 1


# path problems a user causes and can fix by naming another path
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
