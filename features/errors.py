"""The one exception type for mistakes a user can make (bad flag, bad file): the CLI prints it as one line."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(ValueError):
    """A user-caused error; its message names the bad value and what would be valid."""


def did_you_mean(value: str, valid: Iterable[str], n: int = 5) -> str:
    """' Did you mean: a, b?' for the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(value, list(valid), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
