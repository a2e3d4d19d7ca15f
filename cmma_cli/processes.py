"""Worker processes that never outlive the command that started them.

A killed ``cmma fetch``, ``cmma preprocess`` or ``cmma train`` must not leave its worker processes (structure
readers, featurizers, DDP ranks) running on, and writing, behind it: each one calls :func:`die_with_parent` when
it starts (a pool's ``initializer``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the process that started it) dies, however it dies.

    On Linux the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent's
    pid. Either way a parent already gone by now ends this process at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="cmma-parent-watch", daemon=True).start()


def die_with_starter() -> None:
    """:func:`die_with_parent` for the process that started this one: a pool's ``initializer``. (Under the
    forkserver start method that is the fork server, which itself ends when the command does.)"""
    die_with_parent(os.getppid())
