"""Leave a process without the interpreter's module teardown.

With torch, DeepSpeed or MLflow loaded, Python's shutdown (collecting every module) takes 1-2 s
of CPU; every rank, and the launcher after it, would pay that at the end of each run while the
caller waits. The exit handlers still run (atexit: the lifeline's goodbye, logging's flush,
MLflow's), and output is flushed.

DeepSpeed's own launcher processes, its runner (`deepspeed`) and the per-host
`deepspeed.launcher.launch`, skip it too (`skip_deepspeed_launcher_teardown`, from moelab's
sitecustomize): about 0.8 s each, paid one after the other after the last rank has exited.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

# The modules whose `main` is DeepSpeed's runner and its per-host launcher.
DEEPSPEED_LAUNCHERS = ("deepspeed.launcher.runner", "deepspeed.launcher.launch")

_exit_statuses: list[str | int | None] = []  # what this process passed to sys.exit, in order


def exit_now(code: int) -> NoReturn:
    """Run the exit handlers, flush, and end the process with `code`; a normal exit instead
    while a non-daemon thread still runs (its work must not be cut short)."""
    others = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if others:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def skip_deepspeed_launcher_teardown() -> None:
    """Called before anything else registers an exit handler: if this process turns out to be
    DeepSpeed's runner or `launch.py`, it ends after its last exit handler with the status it
    would have had, without the teardown. Their `main` ends only by returning or by `sys.exit`
    (fingerprinted in tests/test_dscompat.py), so the status is known: `sys.exit`'s argument,
    recorded here, or 0. After an uncaught exception the interpreter ends as usual."""
    real_exit = sys.exit

    def recording_exit(status: str | int | None = None) -> NoReturn:
        _exit_statuses.append(status)
        real_exit(status)

    sys.exit = recording_exit
    atexit.register(_leave_if_deepspeed_launcher)  # registered first: runs last


def _leave_if_deepspeed_launcher() -> None:
    status = _exit_statuses[-1] if _exit_statuses else None
    status = 0 if status is None else status
    # sys.last_value: an uncaught exception, printed; exit status 1 (or SIGINT's re-raise)
    if not is_deepspeed_launcher() or hasattr(sys, "last_value") or not isinstance(status, int):
        return
    _flush()
    os._exit(status)


def is_deepspeed_launcher() -> bool:
    """Whether the main module is DeepSpeed's runner (the `deepspeed` script imports its `main`,
    or `python -m`) or its per-host `deepspeed.launcher.launch`."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    entry_module = getattr(getattr(main, "main", None), "__module__", None)
    return spec_name in DEEPSPEED_LAUNCHERS or entry_module in DEEPSPEED_LAUNCHERS


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
