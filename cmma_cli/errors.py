"""Errors a user can act on.

A :class:`CMMAError` carries one sentence that says what went wrong and what to do. The command-line
app prints it without a traceback and exits with status 2; anything else is a bug and keeps its
traceback. :func:`write_error` turns a write the user can fix (a full disk, a read-only folder) into one.
"""

from __future__ import annotations

import errno
from pathlib import Path

#: errno values of a full disk / an exhausted quota, and of a folder cmma may not write to.
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class CMMAError(Exception):
    """Something the user can fix: bad input, a missing stage, a missing key."""


def write_error(exc: BaseException, path: Path | str | None = None, permission: bool = True) -> CMMAError | None:
    """One sentence for a write of ``path`` that failed because the disk is full or the folder is not writable
    (``exc`` an :class:`OSError`, pyarrow's included), else ``None`` (anything else stays a bug). ``permission=False``
    leaves a denied permission alone (an error that may come from reading, not writing)."""
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code is None and "No space left on device" in str(exc):  # pyarrow may give the reason only in the text
        code = errno.ENOSPC
    target = path if path is not None else (exc.filename or "a file")
    if code in DISK_FULL:
        cause, fix = "the disk is full", "free some space, or choose a workspace on a disk with room with -w"
    elif code == errno.EROFS:
        cause, fix = "the file system is read-only", "choose a writable workspace with -w"
    elif code in NOT_WRITABLE and permission:
        cause = "permission denied"
        fix = f"make {Path(target).parent} writable, or choose a writable workspace with -w"
    else:
        return None
    return CMMAError(f"Could not write {target} ({cause}): {fix}, then run the command again (the files already "
                     "there were left as they were).")
