"""Execute a rendered run directory: stream the ranks' output and mirror it to train.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from launcher.hostfile import Resources, active_resources
from launcher.render import RunFiles
from launcher.validate import ConfigError
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


def execute(files: RunFiles) -> int:
    """Run command.sh in its own process group; signals to the launcher reach all ranks."""
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
