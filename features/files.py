"""Writing a file so that a crash, a full disk or a kill never leaves a complete-looking one under its name."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name beside `path`, then rename: a crash never leaves a complete-looking file."""
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # same suffix: Keras and skops check it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
