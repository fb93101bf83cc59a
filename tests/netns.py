"""Two "hosts" on one machine: network namespaces joined by a veth pair, an sshd in each.

Each host also has its own host name (a UTS namespace held by a sleeping process), so what
runs there, the sshd and all it starts included, reports `moelab-a` or `moelab-b`.
Root only. Everything created is named after this process and removed by `teardown`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
IFNAME = "eth77"  # the same name in both namespaces, so one GLOO_SOCKET_IFNAME fits all
HOSTNAMES = ("moelab-a", "moelab-b")


@dataclass(frozen=True)
class HostProcess:
    """What /proc shows of a process on one of the hosts."""

    env: dict[str, str]
    cpus: frozenset[int]  # the CPUs it may run on (its affinity)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60)


def missing_prerequisite() -> str | None:
    """Why the two-host network cannot be built here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "needs util-linux's `nsenter` and `unshare`"
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") is None or shutil.which("pdsh") is None:
        return "needs openssh-server and pdsh (.ci/run installs them)"
    return None


@dataclass
class TwoHosts:
    """The namespaces, their addresses and the ssh material of one test session."""

    workdir: Path
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    created: list[str] = field(default_factory=list)
    holders: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """One sleeping process per host holding its UTS namespace (its host name)."""

    @property
    def namespaces(self) -> list[str]:
        return [f"ml{self.tag}a", f"ml{self.tag}b"]

    @property
    def addresses(self) -> list[str]:
        return [f"{SUBNET}.1", f"{SUBNET}.2"]

    @property
    def key(self) -> Path:
        return self.workdir / "ssh" / "id_ed25519"

    @property
    def ssh_args(self) -> str:
        return (
            f"-i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR -o BatchMode=yes"
        )

    def in_ns(self, n: int) -> list[str]:
        """Prefix that runs a command on host `n`: its network and its host name."""
        return ["nsenter", f"--target={self.holders[n].pid}", "--net", "--uts", "--"]

    def link_bytes(self, n: int) -> int:
        """Bytes received plus sent so far on host `n`'s end of the link (kernel counters)."""
        out = sh("ip", "-n", self.namespaces[n], "-j", "-s", "link", "show", "dev", IFNAME)
        stats = json.loads(out.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    def process_of(self, n: int, needle: str) -> HostProcess | None:
        """The environment and CPUs of a process on host `n` whose command line contains
        `needle`."""
        for pid in sh("ip", "netns", "pids", self.namespaces[n], check=False).stdout.split():
            with contextlib.suppress(OSError):
                if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    pairs = (v.decode(errors="replace").partition("=") for v in raw if v)
                    env = {k: v for k, _, v in pairs}
                    return HostProcess(env, frozenset(os.sched_getaffinity(int(pid))))
        return None

    def hostfile(self) -> Path:
        path = self.workdir / "hostfile"
        path.write_text("".join(f"{a} slots=1\n" for a in self.addresses))
        return path

    def setup(self) -> None:
        a, b = self.namespaces
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
        va, vb = f"mlv{self.tag}a", f"mlv{self.tag}b"
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, veth, addr in ((a, va, self.addresses[0]), (b, vb, self.addresses[1])):
            sh("ip", "link", "set", veth, "netns", ns)
            sh("ip", "-n", ns, "link", "set", veth, "name", IFNAME)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, name in zip((a, b), HOSTNAMES, strict=True):
            self._hold_uts(ns, name)
        self._start_sshd()

    def _hold_uts(self, ns: str, name: str) -> None:
        """A process in namespace `ns` with a new UTS namespace whose host name is `name`."""
        set_name = f"hostname {name} && exec sleep infinity"
        holder = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", set_name]
        )  # ip and unshare exec, no fork: the pid is the holder's
        self.holders.append(holder)
        for _ in range(100):
            probe = sh(*self.in_ns(len(self.holders) - 1), "hostname", check=False)
            if probe.stdout.strip() == name:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the host name of {ns} did not become {name}")

    def _start_sshd(self) -> None:
        ssh = self.workdir / "ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        shutil.copyfile(f"{self.key}.pub", ssh / "authorized_keys")
        for n, addr in enumerate(self.addresses):
            conf = ssh / f"sshd_{n}.conf"
            conf.write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {ssh / 'host_key'}\n"
                f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                f"PidFile {ssh / f'sshd_{n}.pid'}\n"
            )
            sh(*self.in_ns(n), "/usr/sbin/sshd", "-f", str(conf), "-E", str(ssh / f"sshd_{n}.log"))
        self._wait_for_ssh()

    def _wait_for_ssh(self) -> None:
        for _ in range(50):
            probe = subprocess.run(
                [*self.in_ns(0), "ssh", *self.ssh_args.split(), self.addresses[1], "true"],
                capture_output=True,
                timeout=30,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("sshd in the second namespace did not answer")

    def teardown(self) -> None:
        for pid_file in (self.workdir / "ssh").glob("sshd_*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), 15)
        for ns in self.created:
            # Kill whatever still runs inside (ranks of a failed test), then drop the namespace.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()
        for holder in self.holders:
            holder.kill()
            holder.wait(timeout=10)
        self.holders.clear()
