"""Execute a rendered run directory: stream the ranks' output and mirror it to train.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from launcher.hostfile import Resources, active_resources
from launcher.render import RunFiles
from launcher.validate import ConfigError
from moelab.checkpoint import STOP_FILE
from moelab.config import MULTI_HOST_BACKENDS, MoelabConfig


def resolve_cluster(cfg: MoelabConfig) -> Resources | None:
    """Hosts and world size from the hostfile (multi-host backends); None on one machine."""
    c = cfg.cluster
    if c.backend not in MULTI_HOST_BACKENDS:
        return None
    if not c.hostfile:
        raise ConfigError(f"cluster={c.backend} needs cluster.hostfile=<path>.")
    resources = active_resources(c)
    c.nodes = len(resources.hosts)
    c.world_size = resources.world_size
    return resources


RANK_MODULE = "moelab.train"
received: list[int] = []
"""Signals the last `execute` got (the run was stopped on purpose when non-empty)."""


def rank_processes(pid: int) -> dict[int, Any]:
    """{global rank: psutil.Process} of the training ranks started under `pid` on this host."""
    import psutil

    ranks: dict[int, Any] = {}
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:  # deepspeed's per-node launcher names the module too, but has no RANK
                rank = child.environ().get("RANK") if RANK_MODULE in child.cmdline() else None
                if rank is not None:
                    ranks[int(rank)] = child
            except (psutil.Error, ValueError):
                continue
    except psutil.Error:
        pass
    return ranks


class RankWatch(threading.Thread):
    """Notes the first rank that exits while the others still run (who died: kill -9, OOM)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.first_dead = pid, ""
        self.done = threading.Event()

    def run(self) -> None:
        seen: dict[int, Any] = {}
        settled = False  # the deepspeed launcher starts a host's ranks together
        while not self.done.wait(0.5):
            if not settled:  # a scan reads every process of the host: stop once two agree
                found = rank_processes(self.pid)
                settled = bool(found) and found.keys() == seen.keys()
                seen |= found
            gone = [r for r, p in seen.items() if not p.is_running() or p.status() == "zombie"]
            if gone and len(gone) < len(seen):
                proc = seen[gone[0]]
                self.first_dead = f"rank {gone[0]} (pid {proc.pid}) exited first"
                return


def forward_signal(pid: int, signum: int, run_dir: Path) -> None:
    """First signal: the stop file the ranks poll after every step (they finish the step and
    write a checkpoint; DeepSpeed's launcher would terminate them at once); a second: the
    whole process group."""
    if not received:
        received.append(signum)
        (run_dir / STOP_FILE).touch()
        print(
            f"moelab-launch: signal {signum}: ranks stop after this step; again to kill", flush=True
        )
        return
    received.append(signum)
    print(f"moelab-launch: signal {signum}: killing the ranks", flush=True)
    os.killpg(pid, signal.SIGKILL)


def execute(files: RunFiles, append: bool = False) -> int:
    """Run command.sh in its own process group; signals to the launcher reach all ranks."""
    received.clear()
    (files.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
    if len(files.commands) > 1:
        for n in range(1, len(files.commands)):
            print(f"moelab-launch: on node {n} run: bash {files.node_script(n)}", flush=True)
    proc = subprocess.Popen(
        ["bash", str(files.script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ.copy(),
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        forward_signal(proc.pid, signum, files.run_dir)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    watch = RankWatch(proc.pid)
    watch.start()
    try:
        stream(proc, files, append)
        code = proc.wait()
    finally:
        watch.done.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code != 0 and watch.first_dead:
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
