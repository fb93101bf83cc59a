"""moelab.fastexit: the process ends with its code, its exit handlers run and its output is
flushed; a running non-daemon thread still gets to finish. DeepSpeed's runner and launch.py,
under moelab's sitecustomize, end as they would have but for the module teardown, and launch.py
ends as soon as its rank has, not one to two seconds later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.render import free_port
from moelab import fastexit, startup

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


# A sitecustomize behind moelab's (which runs it next): it leaves files named after the process
# (the runner `deepspeed`, `launch` or the rank's script) when its exit handler runs (.atexit)
# and when the module teardown reaches it (.teardown).
TEARDOWN_PROBE = """
import atexit, os, sys, types
NAME = "launch" if any(a.startswith("--world_info") for a in sys.argv) else sys.argv[0]
MARK = os.path.join({out!r}, os.path.basename(NAME) + ".teardown")
atexit.register(lambda: open(MARK.replace(".teardown", ".atexit"), "w").close())
class Probe:
    def __del__(self, _open=os.open, _write=os.write, _close=os.close, _mark=MARK):
        fd = _open(_mark, os.O_WRONLY | os.O_CREAT, 0o644); _write(fd, b"torn down"); _close(fd)
holder = types.ModuleType("teardown_probe")  # a module: the teardown clears it
holder.probe = Probe()
sys.modules[holder.__name__] = holder
"""


def ds_launch(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv` (DeepSpeed's runner or launch.py) with moelab's sitecustomize and the probe."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(TEARDOWN_PROBE.format(out=str(tmp_path)))
    path = os.pathsep.join([startup.FOLDER, str(probe)])
    env = os.environ | {"PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def torn_down(tmp_path: Path, stage: str = "teardown") -> list[str]:
    """The processes that reached `stage`: their module teardown, or their exit handlers."""
    return sorted(p.name.removesuffix(f".{stage}") for p in tmp_path.glob(f"*.{stage}"))


@pytest.mark.parametrize("code", [0, 3])
def test_deepspeeds_launchers_skip_teardown_with_the_ranks_status(
    tmp_path: Path, code: int
) -> None:
    """The real `deepspeed` runner starts `launch.py`, which starts one rank exiting `code`:
    both launchers run their exit handlers and end with that status, without the module
    teardown; the rank (no launcher) tears down as usual."""
    (tmp_path / "rank.py").write_text(f"import sys\nsys.exit({code})\n")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    argv = [deepspeed, "--num_gpus=1", f"--master_port={free_port()}", "rank.py"]
    out = ds_launch(tmp_path, argv)
    assert out.returncode == code, out.stderr[-3000:]
    assert torn_down(tmp_path) == ["rank.py"], out.stderr[-3000:]
    assert torn_down(tmp_path, "atexit") == ["deepspeed", "launch", "rank.py"]
    # Unhooked, launch.py sleeps a whole second after it has seen the rank exit 0 (and looks
    # only once a second): its exit handler would run 1 s after the rank's teardown or later.
    rank_gone, launch_done = (tmp_path / "rank.py.teardown", tmp_path / "launch.atexit")
    lag = (launch_done.stat().st_mtime_ns - rank_gone.stat().st_mtime_ns) / 1e9
    assert lag < 1.0, f"launch.py ended {lag:.2f} s after its rank"


def test_a_launcher_that_raises_tears_down_and_fails(tmp_path: Path) -> None:
    """An uncaught exception in `launch.py` (its --world_info is not base64 JSON): printed,
    status 1, the usual teardown."""
    argv = [sys.executable, "-m", "deepspeed.launcher.launch", "--world_info=notjson", "x.py"]
    out = ds_launch(tmp_path, argv)
    assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr[-3000:]
    assert torn_down(tmp_path) == ["launch"]


# moelab.fastexit.sleep_until_a_child_exits in a process of its own (pytest's may hold children
# of other tests): seconds each call took, requested 30 (or 0.5: the stale child).
WAKING = """
import json, subprocess, sys, time
from moelab.fastexit import sleep_until_a_child_exits as wait
def took(seconds):
    t = time.monotonic(); wait(seconds); return time.monotonic() - t
child = subprocess.Popen(["sleep", "0.3"])
out = {"exits": took(30), "exited": child.poll()}
out["none_left"] = took(30)
stray = subprocess.Popen(["true"])  # never reaped below: not the caller's
out["stray_first"], out["stray_again"] = took(30), took(0.5)
print(json.dumps(out))
"""


def test_a_waking_sleep_ends_when_a_child_exits_or_none_is_left() -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", WAKING], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took = json.loads(proc.stdout)
    assert took["exits"] < 20 and took["exited"] == 0, took  # `sleep 0.3` ended it
    assert took["none_left"] < 20, took
    assert took["stray_first"] < 20, took
    assert took["stray_again"] >= 0.5, f"a child nobody reaps woke the next sleep too: {took}"


def test_only_deepspeeds_launch_gets_the_waking_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", time.sleep)  # restored after the test
    original = time.sleep
    for argv in (["python", "-u", "-m", "moelab.train"], ["deepspeed", "--num_gpus=1", "x.py"]):
        fastexit.wake_deepspeed_launch_on_rank_exit(argv)
        assert time.sleep is original, argv
    fastexit.wake_deepspeed_launch_on_rank_exit(["python", "-u", "-m", fastexit.DEEPSPEED_LAUNCH])
    assert time.sleep is not original
    t = time.monotonic()
    time.sleep(0.3)  # called from here, not from launch.py: a plain sleep, children or not
    assert time.monotonic() - t >= 0.3
