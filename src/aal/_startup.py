"""Quiet start-up of the ``aal`` command: a Ctrl-C while modules are still importing.

Importing torch and aal takes a second or more. A Ctrl-C (or SIGTERM) in that time would raise
``KeyboardInterrupt`` inside some import and print a long traceback, before
:func:`aal.cli.main` has a chance to catch anything. So, only when this process *is* the
command (``aal ...`` or ``python -m aal ...``, never a library import), ``aal/__init__`` first
installs handlers that print one line and exit at once (130 for SIGINT, 143 for SIGTERM):
nothing has been written yet, so there is nothing to clean up. :func:`aal.cli.main` replaces
them with its own as its first step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


def launched_as_cli() -> bool:
    """Whether this process was started as ``aal ...`` (the console script) or ``python ... -m aal ...``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "aal":
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and argv[i + 1 : i + 2] == ["aal"] for i, a in enumerate(argv))


def _exit_quietly(signum: int, _frame: object) -> None:
    name = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"aal: {name} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def guard_cli_startup() -> None:
    """Install the quiet start-up handlers when this process is the ``aal`` command (see module doc)."""
    if launched_as_cli() and in_main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_quietly)
