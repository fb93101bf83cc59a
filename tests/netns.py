"""Two "hosts" on one machine: network namespaces joined by a veth pair, an sshd in each.

Root only. Everything created is named after this process and removed by `teardown`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
IFNAME = "eth77"  # the same name in both namespaces, so one GLOO_SOCKET_IFNAME fits all


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60)


def missing_prerequisite() -> str | None:
    """Why the two-host network cannot be built here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") is None or shutil.which("pdsh") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "openssh-server", "pdsh"]
        proc = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
            proc = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:
            return "could not install openssh-server and pdsh: " + proc.stderr[-300:]
    return None


@dataclass
class TwoHosts:
    """The namespaces, their addresses and the ssh material of one test session."""

    workdir: Path
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    created: list[str] = field(default_factory=list)

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
        return ["ip", "netns", "exec", self.namespaces[n]]

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
        self._start_sshd()

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
