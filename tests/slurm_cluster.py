"""A throwaway two-node Slurm 22.05 cluster on this machine, entirely inside a temp folder.

Root only. Debian's `slurm-wlm` and `munge` (installed when missing); its own munge key and
socket (`AuthInfo=socket=`), its own `slurm.conf` (`SLURM_CONF`); no accounting, no cgroups.
The two nodes are two network hosts: `slurmd -N n1|n2` each runs in its own network and UTS
namespace (host name n1|n2), on a veth link to a bridge in this machine's namespace, with its
own address (NodeAddr); `slurmctld` stays here and listens on the bridge's address. Whatever
a job starts on a node (its ranks) inherits the node's namespaces. `stop` ends every daemon
and job step it started, removes the namespaces, the bridge and the folder, whatever state
the tests left. A watchdog thread notices a daemon that dies (slurmd 22.05 once aborted in
glibc's heap check under concurrent step launches): it stops the launchers the tests follow,
and `check` then fails each test at once, naming the daemon and the end of its output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "debug"
IFNAME = "slurm0"  # each node's link, one name on both: one GLOO_SOCKET_IFNAME fits all


def sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)


def missing_prerequisite() -> str | None:
    """Why the cluster cannot be built here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (munged and slurmd run as root, the nodes in network namespaces)"
    tools = [t for t in ("ip", "nsenter", "unshare") if shutil.which(t, path="/usr/sbin:/usr/bin")]
    if len(tools) < 3:
        return "needs iproute2's `ip` and util-linux's `nsenter` and `unshare` (the nodes' hosts)"
    if all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("slurmctld", "slurmd", "munged")):
        return None
    return "slurm-wlm and munge are not installed (.ci/run installs them)"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def ip(*args: str) -> None:
    proc = sh("ip", *args)
    if proc.returncode != 0:
        raise RuntimeError(f"Slurm test cluster: ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class NodeNetwork:
    """A bridge here and one namespace per node on a veth link to it, named after `tag`."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    undo: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def subnet(self) -> str:
        return f"10.78.{int(self.tag) % 250}"

    @property
    def bridge(self) -> str:
        return f"mlsbr{self.tag}"

    @property
    def controller(self) -> str:
        """slurmctld's address: the bridge's, in this machine's namespace."""
        return f"{self.subnet}.254"

    def namespace(self, node: str) -> str:
        return f"mls{self.tag}{node}"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{NODES.index(node) + 1}"

    def up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.undo.append(("link", "del", self.bridge))
        ip("addr", "add", f"{self.controller}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for node in NODES:
            self._node_up(node)

    def _node_up(self, node: str) -> None:
        ns, here = self.namespace(node), f"{self.namespace(node)}h"
        ip("netns", "add", ns)
        self.undo.append(("netns", "del", ns))
        ip("link", "add", here, "type", "veth", "peer", "name", IFNAME, "netns", ns)
        self.undo.append(("link", "del", here))
        ip("link", "set", here, "master", self.bridge, "up")
        ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", IFNAME)
        ip("-n", ns, "link", "set", IFNAME, "up")
        ip("-n", ns, "link", "set", "lo", "up")

    def on(self, node: str) -> list[str]:
        """The prefix that runs a command in `node`'s network namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def enter(self, node: str) -> list[str]:
        """The prefix that runs a command as host `node`: its network and its host name (not
        `ip netns exec`, whose own /sys hides the cgroup mount slurmd needs)."""
        named = 'hostname "$0" && exec "$@"'
        net = f"--net=/run/netns/{self.namespace(node)}"
        return ["nsenter", net, "unshare", "--uts", "sh", "-c", named, node]

    def link_bytes(self, node: str) -> tuple[int, int]:
        """(received, sent) bytes so far on `node`'s link, from its namespace's own counters."""
        stats = f"/sys/class/net/{IFNAME}/statistics"
        out = sh(*self.on(node), "cat", f"{stats}/rx_bytes", f"{stats}/tx_bytes").stdout.split()
        return int(out[0]), int(out[1])

    def down(self) -> None:
        """Kill what still runs on the nodes (ranks of a failed test), then remove it all."""
        for node in NODES:
            for pid in sh("ip", "netns", "pids", self.namespace(node)).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for step in reversed(self.undo):
            sh("ip", *step)
        self.undo.clear()


def slurm_conf(d: Path, ports: list[int], net: NodeNetwork) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = [  # both slurmd on one port: each has its own address
        f"NodeName={n} NodeHostname={n} NodeAddr={net.address(n)} Port={ports[1]} CPUs=4 "
        "RealMemory=1000"
        for n in NODES
    ]
    return "\n".join(
        [
            f"ClusterName=moelab{os.getpid() % 10000}",
            f"SlurmctldHost={host}({net.controller})",
            "SlurmUser=root",
            # cred_expire is also how long a requeued job waits to start again (default 120 s,
            # at least 5); a step's credential must reach slurmd within it (here: on one host)
            f"AuthInfo=socket={d}/munge.sock,cred_expire=10",
            f"SlurmctldPort={ports[0]}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # 4 CPUs per node on 2 cores: jobs overlap
            "KillWait=5",  # seconds between SIGTERM and SIGKILL when a job is cancelled
            # a requeued job may start again once cred_expire has passed, but only a periodic
            # scheduling pass starts it (defaults: every 30 s backfill, 60 s main): every 1 s
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            *nodes,
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
    )


@dataclass
class SlurmCluster:
    """The daemons of one test session; `env` points Slurm's clients at them."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moelab-slurm-")))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    net: NodeNetwork = field(default_factory=NodeNetwork)
    followers: list[subprocess.Popen[str]] = field(default_factory=list)
    died: str | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _daemon(self, name: str, *args: str) -> None:
        with (self.root / "log" / f"{name}.out").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def start(self, timeout: float = 30) -> None:
        d = self.root
        d.chmod(0o755)  # slurmd and munged refuse a private folder
        for sub in ("state", "spool/n1", "spool/n2", "log"):
            (d / sub).mkdir(parents=True)
        subprocess.run(["mungekey", "-c", "-k", str(d / "munge.key")], check=True, timeout=60)
        self._daemon(
            "munged",
            *("munged", "-F", "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock"),
            *(f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log"),
            f"--seed-file={d}/munged.seed",
        )
        self._wait(lambda: (d / "munge.sock").exists(), timeout, "munged socket")
        self.net.up()
        self.conf.write_text(slurm_conf(d, free_ports(2), self.net) + "\n")
        self._daemon("slurmctld", "slurmctld", "-D")
        for n in NODES:
            self._daemon(f"slurmd-{n}", *self.net.enter(n), "slurmd", "-D", "-N", n)
        self._wait(self.idle, timeout, "both nodes idle")
        threading.Thread(target=self._watch, name="slurm-watchdog", daemon=True).start()

    def follow(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        """A launcher following a job of this cluster: killed if a daemon dies (its job would
        never end), so that the test reading it gets to `check`."""
        self.followers.append(proc)
        return proc

    def check(self) -> None:
        """Fail with the dead daemon's name and output if one died since `start`."""
        if self.died is not None:
            raise RuntimeError(self.died)

    def _watch(self) -> None:
        while not self.stopping.wait(0.5):
            dead = [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                name, code = dead[0]
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                out = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-1500:]
                self.died = f"Slurm test cluster: {name} died ({how}); its output ends:\n{out}"
                for proc in self.followers:
                    proc.kill()
                return

    def idle(self) -> bool:
        out = sh("sinfo", "-h", "-o", "%t", env=self.env).stdout.split()
        return sorted(out) == ["idle"]

    def _wait(self, ok: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():  # type: ignore[operator]
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*"))
                raise RuntimeError(f"Slurm test cluster: no {what} after {timeout}s\n{logs}")
            time.sleep(0.1)

    def squeue(self) -> list[str]:
        """Job ids still known to the queue (pending, running or completing)."""
        return sh("squeue", "-h", "-o", "%i", env=self.env).stdout.split()

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, ExitCode, ...)."""
        out = sh("scontrol", "-o", "show", "job", job_id, env=self.env).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stepds(self) -> list[int]:
        """slurmstepd processes of this cluster (each holds its slurmd's log file open)."""
        logs = str(self.root / "log")
        pids = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd":
                    fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
                    if any(f.startswith(logs) for f in fds):
                        pids.append(int(proc.name))
        return pids

    def stop(self) -> None:
        """Cancel every job, stop the daemons, wait for job steps, remove the folder."""
        self.stopping.set()
        seen = set(self.stepds())

        def steps_left() -> bool:
            seen.update(self.stepds())
            return any(Path(f"/proc/{pid}").exists() for pid in seen)

        with contextlib.suppress(Exception):
            if self.conf.exists() and self.squeue():
                sh("scancel", "--user=root", env=self.env)
                self._wait(lambda: not self.squeue() and not steps_left(), 20, "empty queue")
        daemons = list(reversed(self.procs.values()))
        for proc in daemons:
            if proc.poll() is None:
                proc.terminate()
        for proc in daemons:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(RuntimeError):  # slurmstepd helpers outlive slurmd by ~1.4 s
            self._wait(lambda: not steps_left(), 5, "job steps gone")
        for pid in seen:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd":
                    os.kill(pid, signal.SIGKILL)
        self.net.down()
        shutil.rmtree(self.root, ignore_errors=True)
