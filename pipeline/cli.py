"""The thin CLI: parse flags, call exactly one stage function, turn user errors into one line and a non-zero exit.

Every failure ends in one line on stderr and a non-zero exit: 2 for a usage error (a bad flag, a missing or
unusable path), 1 for anything else, never a traceback; `--debug` (before or after the command) shows it.
Output into a pipe that closes early (`python -m pipeline backbones | head -3`) ends quietly with 141, the status
of a command ended by SIGPIPE (what `set -o pipefail` reports for `yes | head`). TensorFlow's start-up log lines are
kept off stderr (pipeline/quiet.py) unless `--debug` is given.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; the table below
is the only place that knows them all.
"""
from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

from features.errors import UsageError
from pipeline import quiet

# what `python -m pipeline --help` says above and below the command list (%(prog)s: what the user typed)
DESCRIPTION = """\
Two-stage transfer learning. Stage one (extract) pushes every image once through a frozen, possibly truncated
pretrained network and caches the activations in HDF5; stage two (classify) trains and ranks many cheap heads on
the cached features in seconds; predict applies the best to new images."""
EPILOG = """\
examples:
  %(prog)s demo                                   both stages on the shipped ants-vs-bees photos, offline
  %(prog)s extract --data path/to/images          stage one: a cache under cache/ ($FEATURE_CACHE_DIR)
  %(prog)s classify                               stage two: every cache under cache/ -> results/<time>/
  %(prog)s predict --model results/<run>/best --data path/to/new/images
  %(prog)s COMMAND --help                         the flags of one command

Every failure ends in one line on stderr and a non-zero exit; --debug shows the traceback and TensorFlow's log.
The same commands run as make targets (make extract DATA=path/to/images ...): see README.md."""

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
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a failure and TensorFlow's own log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
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
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # decided before any command module (and so TensorFlow) is imported
    if debug:
        quiet.keep_tensorflow_logs()
    else:
        quiet.silence_tensorflow()
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        parser = build_parser(command, program_name(sys.argv[0]))
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help (or a usage error) ends inside argparse
            sys.stdout.flush()  # into a pipe that may have closed: handled below like any output
            raise
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not as a message at interpreter exit
        return code
    except KeyboardInterrupt:
        print("interrupted: partial work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place that turns any failure into one line)
        if isinstance(err, BrokenPipeError) and stdout_reader_gone():
            return end_quietly()
        if debug:
            raise
        line, code = one_line(err)
        print(f"error: {line}", file=sys.stderr)
        return code


SIGPIPE_STATUS = 141  # 128 + SIGPIPE: how a shell reports a command whose reader went away


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (`| head` has what it wanted). A BrokenPipeError from
    anything else, such as a dead worker process's pipe, stays an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False


def end_quietly() -> int:
    """Nothing more to say to a closed pipe: what is still buffered goes to /dev/null (so the flush at exit cannot
    fail again with a message), nothing goes to stderr, and the exit status is SIGPIPE's."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_STATUS


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
    full = disk_full(err)
    if full:
        return full, 2
    return f"{type(err).__name__}: {text}. Rerun with --debug for the traceback.", 1


def disk_full(err: Exception) -> str | None:
    """The one line for a write that a full disk, a quota or a file-size limit stopped, wherever it was raised (the
    stores word their own: `features.schema.WriteFailed`); HDF5's errors quote the errno and file in their message."""
    import errno
    import re

    code = err.errno if isinstance(err, OSError) and err.errno else None
    found = None if code else re.search(r"errno = (\d+)", str(err))
    code = int(found.group(1)) if found else code
    if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    name = getattr(err, "filename", None) or next(iter(re.findall(r"filename = '([^']*)'", str(err))), None)
    where = f" while writing '{name}'" if name else ""
    return (f"the disk is full or a file-size limit was reached ({os.strerror(code)}){where}: free space (or raise the "
            "limit: ulimit -f) and rerun the same command.")


# path problems a user causes and can fix by naming another path
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
