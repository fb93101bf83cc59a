"""Leave a process without the interpreter's module teardown.

With torch, DeepSpeed or MLflow loaded, Python's shutdown (collecting every module) takes 1-2 s
of CPU; every rank, and the launcher after it, would pay that at the end of each run while the
caller waits. The exit handlers still run (atexit: the lifeline's goodbye, logging's flush,
MLflow's), and output is flushed.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Run the exit handlers, flush, and end the process with `code`; a normal exit instead
    while a non-daemon thread still runs (its work must not be cut short)."""
    others = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if others:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
