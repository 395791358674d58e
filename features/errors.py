"""The one exception type for mistakes a user can make (bad flag, bad file): the CLI prints it as one line; and
helpers that word such mistakes alike wherever they are caught."""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path


class UsageError(ValueError):
    """A user-caused error; its message names the bad value and what would be valid."""


def did_you_mean(value: str, valid: Iterable[str], n: int = 5) -> str:
    """' Did you mean: a, b?' for the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(value, list(valid), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_name_lengths(flag: str, value: str | Path, paths: Iterable[Path]) -> None:
    """Refuse `value` (what `flag` received) in one line when one of `paths` (the output, and the hidden names a
    stage derives from it) has a part that does not exist yet and is longer than its filesystem allows.

    Why up front: the OSError 'File name too long' would otherwise come when that name is first written, which can be
    after a model export or a whole run. Parts that exist are fine; a filesystem that states no limit is not checked.
    The error names the longest part, so that the shortening it asks for is enough for every name.
    """
    over = []
    for path in paths:
        path, new = Path(os.path.abspath(path)), []
        while not os.path.lexists(path) and path != path.parent:  # os.path: Path.exists raises on too long a name
            new.append(path.name)
            path = path.parent
        try:
            limit = os.pathconf(path, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
        over += [(len(os.fsencode(name)) - limit, name, path, limit) for name in new
                 if len(os.fsencode(name)) > limit]
    if over:
        excess, name, folder, limit = max(over)
        shown = name if len(name) <= 50 else f"{name[:20]}…{name[-25:]}"
        raise UsageError(f"{flag} '{value}' is too long for the filesystem at '{folder}': it needs the name '{shown}' "
                         f"({limit + excess} bytes), over the limit of {limit} bytes per name. Choose a {flag} whose "
                         f"name is at least {excess} bytes shorter.")
