"""The one error type for input a user can fix, and how an entry module prints it."""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """Bad input the user can fix (a flag, a file, a setting); printed as one line naming the fix."""


def print_error(err: BaseException) -> int:
    """Prints the first line of `err` as `error: ...` on stderr; returns the exit status 2."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
