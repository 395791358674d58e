"""Memory budget: parse `--memory-budget 2GiB`, size reads to fit it, and measure the peak actually used.

Why: a VGG19 `block2_pool` cache of 10k images is ~20 GiB, so every read is sized from the budget, and the
run reports the peak resident memory it really reached (sampled, so short spikes of < 10 ms may be missed).
"""
from __future__ import annotations

import re
import resource
import sys
import threading
from pathlib import Path

from features.errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648; '500MB' -> 500000000; '1024' -> 1024 bytes.

    >>> parse_bytes("1.5KiB")
    1536
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"Invalid memory size {text!r}. Expected a number with an optional unit "
                         f"(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. '2GiB'.")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"Memory size must be positive. Received: {text!r}.")
    return value


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far, an upper bound)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Context manager sampling RSS in a daemon thread; `.peak_growth` is the peak above the RSS at entry.

    >>> with PeakMemory() as mem:
    ...     buf = bytearray(50_000_000)
    >>> mem.peak_growth >= 0
    True
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def peak_growth(self) -> int:
        return max(0, self.peak - self.start)
