"""A throwaway two-node Slurm 22.05 cluster on this machine, entirely inside a temp folder.

Root only. Debian's `slurm-wlm` and `munge` (installed when missing); its own munge key and
socket (`AuthInfo=socket=`), its own `slurm.conf` (`SLURM_CONF`), one `slurmctld` and two
`slurmd -N n1|n2` on 127.0.0.1 with free ports; no accounting, no cgroups. `stop` ends every
daemon and job step it started and removes the folder, whatever state the tests left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
NODES = ("n1", "n2")
PARTITION = "debug"


def sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)


def missing_prerequisite() -> str | None:
    """Why the cluster cannot be built here (None when it can); installs the packages."""
    if os.geteuid() != 0:
        return "needs root (munged and slurmd run as root)"
    if all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("slurmctld", "slurmd", "munged")):
        return None
    if shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        return "could not install slurm-wlm and munge: " + proc.stderr[-300:]
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(d: Path, ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = [
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=4 RealMemory=1000"
        for n, p in zip(NODES, ports[1:], strict=True)
    ]
    return "\n".join(
        [
            f"ClusterName=moelab{os.getpid() % 10000}",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            f"AuthInfo=socket={d}/munge.sock",
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
            *nodes,
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
    )


@dataclass
class SlurmCluster:
    """The daemons of one test session; `env` points Slurm's clients at them."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moelab-slurm-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _daemon(self, name: str, *args: str) -> None:
        log = (self.root / "log" / f"{name}.out").open("wb")
        self.procs.append(
            subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env)
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
        self.conf.write_text(slurm_conf(d, free_ports(3)) + "\n")
        self._daemon("slurmctld", "slurmctld", "-D")
        for n in NODES:
            self._daemon(f"slurmd-{n}", "slurmd", "-D", "-N", n)
        self._wait(self.idle, timeout, "both nodes idle")

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
        seen = set(self.stepds())

        def steps_left() -> bool:
            seen.update(self.stepds())
            return any(Path(f"/proc/{pid}").exists() for pid in seen)

        with contextlib.suppress(Exception):
            if self.conf.exists() and self.squeue():
                sh("scancel", "--user=root", env=self.env)
                self._wait(lambda: not self.squeue() and not steps_left(), 20, "empty queue")
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
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
        shutil.rmtree(self.root, ignore_errors=True)
