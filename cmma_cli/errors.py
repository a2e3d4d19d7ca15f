"""Errors a user can act on.

A :class:`CMMAError` carries one sentence that says what went wrong and what to do. The command-line
app prints it without a traceback and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class CMMAError(Exception):
    """Something the user can fix: bad input, a missing stage, a missing key."""
