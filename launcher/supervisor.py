"""The process supervisor: runs a rendered run dir's command.sh (deepspeed) in its own process
group, streams the ranks' output to the terminal and train.log, forwards signals (first as a
stop request the ranks honour after a step), and names the first rank that died."""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

from launcher.render import RunFiles
from moelab import lifeline
from moelab.hang import HANG_EXIT
from moelab.rundir import RunDir

received: list[int] = []
"""Signals the last `supervise` got (the run was stopped on purpose when non-empty)."""
aborted: list[str] = []
"""Why the launcher itself stopped this launch's ranks (`abort`), when non-empty."""
_running: list[subprocess.Popen[bytes]] = []
_lock = threading.Lock()


def abort(reason: str) -> None:
    """Stop this launch's ranks now (or keep them from starting): it cannot succeed."""
    with _lock:
        aborted.append(reason)
        for proc in _running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


class RankWatch(threading.Thread):
    """Names the first rank on this host that was killed (kill -9, OOM killer, segfault).

    Ranks connect to an abstract Unix socket (`moelab.lifeline`) and say goodbye when they
    leave through Python. The kernel closes a killed rank's connection as it dies, before
    DeepSpeed's launcher polls its children or a peer's collective fails, so the first
    connection closed without a goodbye names the rank whatever noticed the death first.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.name = f"moelab-lifeline-{os.getpid()}-{secrets.token_hex(6)}"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind("\0" + self.name)
        self.server.listen(64)
        self.first_dead = ""
        self.done = threading.Event()

    def env(self) -> dict[str, str]:
        """What the launched command's environment needs for the local ranks to connect."""
        return {lifeline.ENV: self.name}

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        said: dict[socket.socket, bytes] = {}
        while not self.done.is_set():
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.server:
                    conn, _ = self.server.accept()
                    sel.register(conn, selectors.EVENT_READ)
                    said[conn] = b""
                    continue
                chunk = sock.recv(4096)
                said[sock] += chunk
                if not chunk:
                    sel.unregister(sock)
                    sock.close()
                    self._closed(said.pop(sock))
        sel.close()
        self.server.close()

    def _closed(self, said: bytes) -> None:
        if self.first_dead or said.endswith(lifeline.GOODBYE):
            return
        rank, _, pid = said.decode(errors="replace").partition("\n")[0].partition(" ")
        self.first_dead = f"rank {rank} (pid {pid}) exited first"


def forward_signal(pid: int, signum: int, run_dir: Path) -> None:
    """First signal: the stop file the ranks poll after every step (they finish the step and
    write a checkpoint; DeepSpeed's launcher would terminate them at once); a second: the
    whole process group."""
    if not received:
        received.append(signum)
        RunDir(run_dir).stop_request.touch()
        print(
            f"moelab-launch: signal {signum}: ranks stop after this step; again to kill", flush=True
        )
        return
    received.append(signum)
    print(f"moelab-launch: signal {signum}: killing the ranks", flush=True)
    os.killpg(pid, signal.SIGKILL)


def supervise(files: RunFiles, append: bool = False) -> int:
    """Run command.sh in its own process group; signals to the launcher reach all ranks."""
    received.clear()
    files.paths.stop_request.unlink(missing_ok=True)  # a stop request of an earlier attempt
    if len(files.commands) > 1:
        for n in range(1, len(files.commands)):
            print(f"moelab-launch: on node {n} run: bash {files.node_script(n)}", flush=True)
    watch = RankWatch()
    with _lock:
        if aborted:
            return 1
        watch.start()
        proc = subprocess.Popen(
            ["bash", str(files.script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | watch.env(),
        )
        _running.append(proc)

    def forward(signum: int, _frame: FrameType | None) -> None:
        forward_signal(proc.pid, signum, files.run_dir)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stream(proc, files, append)
        code = proc.wait()
    finally:
        with _lock:
            _running.remove(proc)
        watch.done.set()
        watch.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code != 0 and watch.first_dead and not aborted and code != HANG_EXIT:  # hang: own line
        print(f"moelab-launch: {watch.first_dead}; the others were stopped", flush=True)
    return code


def stream(proc: subprocess.Popen[bytes], files: RunFiles, append: bool) -> None:
    """Copy the ranks' output to stdout and train.log (appended to when resuming)."""
    assert proc.stdout is not None
    with files.log.open("ab" if append else "wb") as log:
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line)


def prepare_data(files: RunFiles, append: bool) -> int:
    """Tokenize and cache the corpus on this host before any rank starts (the cache's receipt
    checked here, else `python -m moelab.datacache`; the ranks only load the cache), its output
    the start of train.log; the exit code, 128 + SIGINT on Ctrl-C."""
    received.clear()
    cached = cached_data(files.paths.config)
    if cached is not None:  # no interpreter to start: the receipt holds
        with files.log.open("ab" if append else "wb") as log:
            for out in (sys.stdout.buffer, log):
                out.write(cached.encode())
                out.flush()
        return 0
    config = str(files.paths.config)
    command = [sys.executable, "-m", "moelab.datacache", "--config", config]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | files.env
    )
    try:
        stream(proc, files, append)
        return proc.wait()
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the preparation too
        proc.wait()
        received.append(signal.SIGINT)
        return 128 + signal.SIGINT


def cached_data(config: Path) -> str | None:
    """moelab.datacache's lines for a run whose data the cache's receipt says is prepared;
    None when the data must be prepared (or the check cannot tell)."""
    import time

    from moelab import datacache
    from moelab.config import load_config

    start = time.perf_counter()
    cfg = load_config(config)
    summary = datacache.ready(cfg)
    return (
        None
        if summary is None
        else datacache.ready_lines(cfg, summary, time.perf_counter() - start)
    )
