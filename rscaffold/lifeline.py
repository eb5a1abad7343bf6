"""Processes that never outlive the process that started them.

:func:`die_with_parent` asks the kernel to signal this process when its parent dies (Linux
``PR_SET_PDEATHSIG``, through ``ctypes``: the standard library has no binding) and, for other
systems and for the race where the parent died before the request, watches the parent from a
thread and exits when it is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL, *, exit_code: int = 1, poll_s: float = 0.5) -> None:
    """End this process when ``parent`` (the pid that started it) dies: the kernel sends ``sig``
    (Linux), and a watch thread exits with ``exit_code`` once this process's parent is no longer
    ``parent`` (re-parented to init or a subreaper)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(exit_code)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
