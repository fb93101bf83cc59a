"""Real two-host launches: two network namespaces on a veth link, the all-to-all crossing it.

(a) cluster=hostfile: the deepspeed runner starts the remote rank over pdsh/ssh.
(b) cluster=no_ssh: one `deepspeed --no_ssh --node_rank=N` per namespace.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import launcher_env
from netns import IFNAME, TwoHosts

TRAIN = [
    *("model=tiny_moe_top2", "zero=stage2", "parallel=ep2", "train=smoke", "train.steps=8"),
    "telemetry.system_metrics_interval=1",
]


def check_run(workdir: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["nodes"] == "2"
    assert run.data.metrics["moe/a2a_ms"] > 0, "the all-to-all ran between the hosts"
    assert 0 < run.data.metrics["moe/a2a_fraction"] < 1
    nodes = {k.split("/")[1].rsplit("-", 1)[1] for k in run.data.metrics if k.startswith("system/")}
    assert nodes == {"node0", "node1"}, "system metrics from both hosts"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses[-1] < losses[0]


def cluster_args(hosts: TwoHosts, backend: str) -> list[str]:
    return [
        f"cluster={backend}",
        f"cluster.hostfile={hosts.hostfile()}",
        f"cluster.socket_ifname={IFNAME}",
        f"cluster.master_addr={hosts.addresses[0]}",
    ]


@pytest.mark.slow
def test_hostfile_over_pdsh_ssh(two_hosts: TwoHosts, tmp_path: Path, shared_cache: Path) -> None:
    args = [
        *cluster_args(two_hosts, "hostfile"),
        f"cluster.ssh_args='{two_hosts.ssh_args}'",
        "cluster.no_ssh_check=true",
    ]
    proc = subprocess.run(
        [*two_hosts.in_ns(0), sys.executable, "-m", "launcher", *args, *TRAIN],
        cwd=tmp_path,
        env=launcher_env(tmp_path, shared_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "pdsh" in proc.stdout, "the runner went through pdsh"
    check_run(tmp_path)


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
    reader.join(timeout=10)
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "--no_ssh --node_rank=1" in Path(script).read_text()
    check_run(tmp_path)
