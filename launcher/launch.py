"""Execute a rendered run directory: stream the ranks' output and mirror it to train.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from launcher.render import RunFiles


def execute(files: RunFiles) -> int:
    """Run command.sh in its own process group; signals to the launcher reach all ranks."""
    proc = subprocess.Popen(
        ["bash", str(files.script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ.copy(),
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert proc.stdout is not None
        with files.log.open("wb") as log:
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
