"""Leave a process without the interpreter's module teardown.

With torch, DeepSpeed or MLflow loaded, Python's shutdown (collecting every module) takes 1-2 s
of CPU; every rank, and the launcher after it, would pay that at the end of each run while the
caller waits. The exit handlers still run (atexit: the lifeline's goodbye, logging's flush,
MLflow's), and output is flushed.

DeepSpeed's own launcher processes, its runner (`deepspeed`) and the per-host
`deepspeed.launcher.launch`, skip it too (`skip_deepspeed_launcher_teardown`, from moelab's
sitecustomize): about 0.8 s each, paid one after the other after the last rank has exited.
And `launch.py`, which looks at its ranks once a second and sleeps one second more after the
last has gone, notices their exit at once (`wake_deepspeed_launch_on_rank_exit`): 1-2 s less
at the end of every run.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

# The modules whose `main` is DeepSpeed's runner and its per-host launcher.
DEEPSPEED_LAUNCHERS = ("deepspeed.launcher.runner", "deepspeed.launcher.launch")
DEEPSPEED_LAUNCH = DEEPSPEED_LAUNCHERS[1]
CHILD_POLL_S = 0.1  # how often a waking sleep looks for an exited child

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


def wake_deepspeed_launch_on_rank_exit(argv: list[str] | None = None) -> None:
    """In DeepSpeed's per-host `launch.py` only (`python -m deepspeed.launcher.launch`): the
    `time.sleep(1)` of its loop over the ranks (fingerprinted in tests/test_dscompat.py) ends
    as soon as a rank has exited, and at once when none is left. Other sleeps are unchanged."""
    argv = sys.orig_argv if argv is None else argv
    launched = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == DEEPSPEED_LAUNCH
    if not launched or not hasattr(os, "waitid"):  # waitid: Linux, not macOS
        return
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        spec = sys._getframe(1).f_globals.get("__spec__")
        if getattr(spec, "name", None) == DEEPSPEED_LAUNCH:
            sleep_until_a_child_exits(seconds, real_sleep)
        else:
            real_sleep(seconds)

    time.sleep = sleep  # type: ignore[assignment]  # (seconds: float), as DeepSpeed calls it


_stale_child: list[int] = []  # a child that ended a sleep early yet was never reaped after it


def sleep_until_a_child_exits(
    seconds: float, real_sleep: Callable[[float], None] = time.sleep
) -> None:
    """Sleep `seconds`, or less: until a child of this process has exited (it is left for its
    owner to reap), or not at all when this process has no child left. A child that already
    ended one such sleep and is still not reaped (not the caller's) wakes no other."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if exited is not None and exited.si_pid not in _stale_child:
            _stale_child[:] = [exited.si_pid]
            return
        left = deadline - time.monotonic()
        if left <= 0:
            return
        real_sleep(min(left, CHILD_POLL_S))
