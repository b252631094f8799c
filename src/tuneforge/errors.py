"""User-facing errors.

Anything a user can fix (a bad config key, a malformed data line, a missing model path) raises
:class:`UserError`. The CLI prints its message without a traceback and exits with code 2.
Everything else is a bug in tuneforge and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by the user's input, with a message that says what to fix."""

    exit_code = 2


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """Return ``" — did you mean 'x'?"`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
