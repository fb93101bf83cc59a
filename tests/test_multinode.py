"""Real two-host launches: two network namespaces on a veth link, the all-to-all crossing it.

(a) cluster=hostfile: the deepspeed runner starts the remote rank over pdsh/ssh.
(b) cluster=no_ssh: one `deepspeed --no_ssh --node_rank=N` per namespace.
(c) cluster=openmpi: mpirun starts the remote rank over ssh.

Each host has its own name (moelab-a, moelab-b). Every run must show two hosts in its tags, and
the bytes counted on host b's end of the link must cover the all-to-all bytes its rank sent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from helpers import launcher_env, unavailable
from netns import HOSTNAMES, IFNAME, HostProcess, TwoHosts

TRAIN = [
    *("model=tiny_moe_top2", "zero=stage2", "parallel=ep2", "train=smoke", "train.steps=8"),
    "telemetry.system_metrics_interval=1",
]
PROBE = "MOELAB_PROBE"
RANK = "\0-m\0moelab.train\0"
"""In the command line of a rank (python -m moelab.train), not of DeepSpeed's launcher."""
CPUS = frozenset(os.sched_getaffinity(0))
"""The CPUs a rank may run on, as every process here: no backend pins a rank to fewer."""


class LinkBytes:
    """Bytes through host b's end of the link (received + sent) from creation to `stop`."""

    def __init__(self, hosts: TwoHosts) -> None:
        self.hosts, self.before, self.bytes = hosts, hosts.link_bytes(1), 0

    def stop(self) -> int:
        self.bytes = self.hosts.link_bytes(1) - self.before
        return self.bytes


class RankOnB(threading.Thread):
    """Host b's rank as /proc shows it (environment, CPUs), read while the run lasts."""

    def __init__(self, hosts: TwoHosts) -> None:
        super().__init__(daemon=True)
        self.hosts, self.done = hosts, threading.Event()
        self.seen: HostProcess | None = None
        self.start()

    def run(self) -> None:
        while self.seen is None and not self.done.is_set():
            self.seen = self.hosts.process_of(1, RANK)
            time.sleep(0.1)

    def stop(self) -> HostProcess:
        self.done.set()
        self.join(timeout=10)
        assert self.seen is not None, "no rank was seen on host b"
        return self.seen


def a2a_bytes_sent(client: MlflowClient, run: Any) -> float:
    """All-to-all bytes a rank sent to the other over the run: `moe/a2a_bytes_total` at the last
    step (mean over the ranks, which send alike: ep_size 2, equal shapes)."""
    total = client.get_metric_history(run.info.run_id, "moe/a2a_bytes_total")
    assert total, "moe/a2a_bytes_total was logged"
    return max(total, key=lambda m: m.step).value


def check_run(workdir: Path, link: LinkBytes, node_ids: bool = True) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["world_size"] == "2" and tags["nodes"] == "2" and tags["ep_size"] == "2"
    assert run.data.metrics["moe/a2a_ms"] > 0, "the all-to-all ran"
    assert 0 < run.data.metrics["moe/a2a_fraction"] < 1
    sent = a2a_bytes_sent(client, run)
    assert link.bytes >= sent > 0, f"{link.bytes} B on the link, rank 1 sent {sent:.0f} B"
    assert tags["hostnames"] == ",".join(HOSTNAMES), "each rank on its own host"
    assert tags["layout"] == "world=2 local=1 ep=2 hosts=2"
    keys = [k for k in run.data.metrics if k.startswith("system/")]
    system = [k.split("/")[1].rsplit("-node", 1) for k in keys]  # system/<host>-node<N>/...
    assert {host for host, _ in system} == set(HOSTNAMES), "system metrics from both hosts"
    if node_ids:
        assert {node for _, node in system} == {"0", "1"}, "each host's node index"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]


def cluster_args(hosts: TwoHosts, backend: str) -> list[str]:
    return [
        f"cluster={backend}",
        f"cluster.hostfile={hosts.hostfile()}",
        f"cluster.socket_ifname={IFNAME}",
        f"cluster.master_addr={hosts.addresses[0]}",
    ]


def probe_value(marker: Path) -> str:
    """A value a shell splits, expands or runs part of (`touch marker`) unless it is quoted
    right, with what pdsh replaces (%n, %h, %%) unless escaped."""
    touch = f"touch {marker}"
    return f"a b;{touch}; \"$({touch})\" `{touch}` \\ 'q' %n %h %%"


def hydra_quoted(value: str) -> str:
    """`value` as a quoted Hydra override value (a backslash stays one unless before a quote)."""
    return "'" + value.replace("'", "\\'") + "'"


def launch_over_ssh(
    hosts: TwoHosts, workdir: Path, cache: Path, args: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], LinkBytes, HostProcess]:
    """`moelab-launch ARGS` on host a; the link's bytes and host b's rank."""
    link, rank = LinkBytes(hosts), RankOnB(hosts)
    proc = subprocess.run(
        [*hosts.in_ns(0), sys.executable, "-m", "launcher", *args, *TRAIN],
        cwd=workdir,
        env=launcher_env(workdir, cache) | env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    link.stop()
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return proc, link, rank.stop()


@pytest.mark.slow
def test_hostfile_over_pdsh_ssh(two_hosts: TwoHosts, tmp_path: Path, shared_cache: Path) -> None:
    """Also: a cluster.env value with spaces, quotes, `;`, $(...), backquotes, a backslash and
    %-sequences reaches host b's rank as it is, and no part of it runs as a command."""
    args, value = over_ssh_with_probe(two_hosts, "hostfile", tmp_path)
    proc, link, rank = launch_over_ssh(two_hosts, tmp_path, shared_cache, args, {})
    assert "pdsh" in proc.stdout, "the runner went through pdsh"
    assert rank.env.get(PROBE) == value
    assert rank.cpus == CPUS, f"host b's rank may run on CPUs {sorted(rank.cpus)} only"
    assert not (tmp_path / "injected").exists(), "part of a cluster.env value ran as a command"
    check_run(tmp_path, link)


def over_ssh_with_probe(hosts: TwoHosts, backend: str, tmp_path: Path) -> tuple[list[str], str]:
    """The overrides of a launch over ssh carrying the probe value, and that value."""
    value = probe_value(tmp_path / "injected")
    args = [
        *cluster_args(hosts, backend),
        f"cluster.ssh_args='{hosts.ssh_args}'",
        "cluster.no_ssh_check=true",
        f"+cluster.env.{PROBE}={hydra_quoted(value)}",
    ]
    return args, value


@pytest.mark.slow
def test_openmpi_over_ssh(two_hosts: TwoHosts, tmp_path: Path, shared_cache: Path) -> None:
    """mpirun starts host b's rank over ssh; the rank finds its place through mpi4py."""
    if shutil.which("mpirun") is None:
        unavailable("cluster=openmpi needs mpirun (Debian: openmpi-bin)")
    if importlib.util.find_spec("mpi4py") is None:
        unavailable("cluster=openmpi needs mpi4py (DeepSpeed's MPI discovery) in the venv")
    args, value = over_ssh_with_probe(two_hosts, "openmpi", tmp_path)
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc, link, rank = launch_over_ssh(two_hosts, tmp_path, shared_cache, args, root)
    assert "mpirun" in proc.stdout, "the runner went through mpirun"
    assert rank.env.get(PROBE) == value and rank.env.get("OMPI_COMM_WORLD_RANK") == "1"
    # mpirun would pin each rank to one core (both hosts' rank to core 0 here, one machine)
    assert rank.cpus == CPUS, f"host b's rank may run on CPUs {sorted(rank.cpus)} only"
    assert not (tmp_path / "injected").exists(), "part of a cluster.env value ran as a command"
    check_run(tmp_path, link, node_ids=False)


def drain(proc: subprocess.Popen[str], lines: list[str], node1: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "on node 1 run: bash " in line:
            node1.set()


@pytest.mark.slow
def test_no_ssh_one_command_per_node(
    two_hosts: TwoHosts, tmp_path: Path, shared_cache: Path
) -> None:
    env = launcher_env(tmp_path, shared_cache)
    link = LinkBytes(two_hosts)
    head = subprocess.Popen(
        [
            *two_hosts.in_ns(0),
            sys.executable,
            "-m",
            "launcher",
            *cluster_args(two_hosts, "no_ssh"),
            *TRAIN,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    node1 = threading.Event()
    reader = threading.Thread(target=drain, args=(head, lines, node1), daemon=True)
    reader.start()
    assert node1.wait(timeout=300), "".join(lines)[-3000:]
    script = next(ln for ln in lines if "on node 1 run: bash " in ln).split("bash ", 1)[1].strip()
    other = subprocess.run(
        [*two_hosts.in_ns(1), "bash", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert head.wait(timeout=600) == 0, "".join(lines)[-5000:]
    link.stop()
    reader.join(timeout=10)
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "--no_ssh --node_rank=1" in Path(script).read_text()
    check_run(tmp_path, link)
