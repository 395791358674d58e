"""One writer per output: an exclusive lock beside the file, and who holds it.

The lock is `filelock`'s (fcntl.flock on Unix: the kernel releases it when the holding process dies, however it dies,
so a killed run never blocks the next one). Who holds it (pid, host, since when) goes into a sidecar written after the
lock is taken; it is read only when taking the lock fails, so a sidecar left by a killed process is never believed
while the lock is free, and the next holder overwrites it.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from features.errors import UsageError


def lock_path(path: Path) -> Path:
    """Hidden, like the partial file: it stays after the run (deleting a lock file races with runs opening it)."""
    return path.with_name(f".{path.name}.lock")


def holder_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock.json")


def _holder(path: Path) -> str:
    try:
        info = json.loads(holder_path(path).read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


@contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold `path`'s lock for the block, or refuse at once in one line naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(path)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"{path} is being written by another run ({_holder(path)}; lock {lock_path(path)}). "
                         "Wait for it to finish, or stop that run; a killed run releases the lock by itself.") from None
    try:
        tmp = holder_path(path).with_name(holder_path(path).name + f".{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        os.replace(tmp, holder_path(path))
        yield
    finally:
        holder_path(path).unlink(missing_ok=True)
        lock.release()
