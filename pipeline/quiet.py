"""TensorFlow's start-up chatter stays off the user's screen, unless asked for (`--debug`, or TF_CPP_MIN_LOG_LEVEL).

On a machine without a GPU, the first `import tensorflow` of a process prints lines such as

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796614444.987927   14615 cudart_stub.cc:31] Could not find cuda drivers on your machine, ...

and the first device query `E0000 ... cuda_platform.cc:52] failed call to cuInit: ...`. What silences what
(TensorFlow 2.21; tests/test_cli.py checks the result):

- TF_CPP_MIN_LOG_LEVEL=3, set here unless the user set it, silences TensorFlow's own C++ log: the cuInit error,
  cpu_feature_guard's instruction-set note, oneDNN's note. TF_CPP_MIN_LOG_LEVEL=2 still shows the cuInit error.
- The cudart_stub lines come from absl's C++ logging while TensorFlow's shared libraries load, before anything reads
  a setting: no environment variable stops them (TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel, ABSL_MIN_LOG_LEVEL,
  GRPC_VERBOSITY were tried). So the import of `tensorflow` runs with file descriptor 2 (stderr) sent to a temporary
  file; afterwards every captured line is passed on except absl-style log lines below the TF_CPP_MIN_LOG_LEVEL
  severity (1: INFO, 2: also WARNING, 3: also ERROR; FATAL always shows) and absl's banner above: what TensorFlow
  would have filtered, had it been able to. An import that fails still shows everything else it printed.
- Python-side logs of the `absl` and `tensorflow` loggers get the matching threshold (WARNING at 1, ERROR at 2 and 3)
  when TensorFlow has loaded, unless a level was set on them already.

`import pipeline` calls `silence_tensorflow()` (this module imports no TensorFlow); the CLI calls
`keep_tensorflow_logs()` for `--debug`, which undoes all of it, also for the worker processes it starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "3"
NOISY_MODULE = "tensorflow"
BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl/glog line prefix: severity letter, MMDD hh:mm:ss.micros (absl before InitializeLog: 0000 00:00:<epoch s>),
# thread id, file:line]
LOG_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 4}  # 4: FATAL is never filtered
PYTHON_LEVEL = {1: logging.WARNING, 2: logging.ERROR, 3: logging.ERROR}
PYTHON_LOGGERS = {"absl": "absl.logging", "tensorflow": "tensorflow"}  # logger -> module that must be loaded first

_state = {"env_set": False, "loggers_set": []}


def min_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0: show everything)."""
    try:
        return int(os.environ.get(ENV, "0"))
    except ValueError:
        return 0


def is_noise(line: str, level: int) -> bool:
    """Whether TensorFlow would have dropped this captured stderr line at TF_CPP_MIN_LOG_LEVEL=level.

    >>> stub = "I0000 00:00:1796614444.987927   14615 cudart_stub.cc:31] Could not find cuda drivers on your machine"
    >>> cuinit = "E0000 00:00:1796614850.09 9 cuda_platform.cc:52] failed call to cuInit"
    >>> is_noise(stub, 3), is_noise(stub, 0), is_noise(cuinit, 3), is_noise(cuinit, 2)
    (True, False, True, False)
    >>> is_noise("Traceback (most recent call last):", 3), is_noise("F0000 00:00:1796614850.09 9 x.cc:1] abort", 3)
    (False, False)
    """
    if level <= 0:
        return False
    if line.rstrip("\r\n") == BANNER:
        return True
    match = LOG_LINE.match(line)
    return bool(match) and SEVERITY[match.group(1)] < level


def _dup_stderr() -> int | None:
    """A copy of file descriptor 2 (after flushing sys.stderr into it), or None where there is none."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        return os.dup(2)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def filtered_stderr():
    """Send file descriptor 2 to a temporary file for the block, then pass on what is not noise (see `is_noise`)."""
    level = min_level()
    saved = _dup_stderr() if level > 0 else None
    if saved is None:  # nothing to filter, or no file descriptor 2: run the block as it is
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not is_noise(line, level))
            if kept and sys.stderr is not None:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader:
    """Runs the real loader of `tensorflow` inside `filtered_stderr` and hands the module back to it."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.inner  # leave no trace of the wrapper
        with filtered_stderr():
            self.inner.exec_module(module)
        quiet_python_loggers()


class _QuietImport:
    """A `sys.meta_path` finder that only wraps the loader of the top-level `tensorflow` package."""

    def find_spec(self, name, path=None, target=None):
        if name != NOISY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_python_loggers() -> None:
    """The `absl` and `tensorflow` loggers at the TF_CPP_MIN_LOG_LEVEL threshold, where still unset and loaded."""
    level = PYTHON_LEVEL.get(min(min_level(), 3))
    if level is None:
        return
    for name, module in PYTHON_LOGGERS.items():
        logger = logging.getLogger(name) if module in sys.modules else None  # absl makes its logger on import
        if logger is not None and logger.level == logging.NOTSET:
            logger.setLevel(level)
            _state["loggers_set"].append(name)


def silence_tensorflow() -> None:
    """TF_CPP_MIN_LOG_LEVEL=3 unless set, and the filtered import of TensorFlow; idempotent, imports nothing heavy."""
    if ENV not in os.environ:
        os.environ[ENV] = QUIET_LEVEL
        _state["env_set"] = True
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
    if NOISY_MODULE in sys.modules:
        quiet_python_loggers()


def keep_tensorflow_logs() -> None:
    """Undo `silence_tensorflow` (`--debug`): TensorFlow's default level 0, unless the user set one, and no filter.
    The level is set rather than removed so that worker processes, which import `pipeline` again, keep it too."""
    if _state["env_set"]:
        os.environ[ENV] = "0"
        _state["env_set"] = False
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _QuietImport)]
    for name in _state["loggers_set"]:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _state["loggers_set"].clear()
