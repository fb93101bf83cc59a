"""moelab.fastexit: the process ends with its code, its exit handlers run and its output is
flushed; a running non-daemon thread still gets to finish."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from moelab import fastexit
out = Path(sys.argv[1])
atexit.register(lambda: (out / "handler").write_text("ran"))
if sys.argv[2] == "thread":
    worker = lambda: (time.sleep(0.5), (out / "thread").write_text("done"))
    threading.Thread(target=worker).start()
print("unflushed", end="")
fastexit.exit_now(5)
"""


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode], env=env, capture_output=True, text=True
    )


def test_exit_code_handlers_and_output_survive(tmp_path: Path) -> None:
    out = run(tmp_path, "plain")
    assert (out.returncode, out.stdout, out.stderr) == (5, "unflushed", "")
    assert (tmp_path / "handler").read_text() == "ran"


def test_a_running_non_daemon_thread_finishes_first(tmp_path: Path) -> None:
    out = run(tmp_path, "thread")
    assert (out.returncode, out.stdout) == (5, "unflushed"), out.stderr
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "handler").read_text() == "ran"
