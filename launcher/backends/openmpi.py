"""cluster=openmpi: DeepSpeed's OpenMPI runner starts the ranks of every host with mpirun."""

from __future__ import annotations

import shlex

from launcher.backends.common import MultiHost
from launcher.render import RunFiles, hostfile_args, train_args
from moelab.config import MoelabConfig


class OpenMpi(MultiHost):
    """One `deepspeed --launcher=openmpi`; mpirun forwards the rank variables by name."""

    def add_commands(self, cfg: MoelabConfig, files: RunFiles) -> None:
        launcher = ["--launcher=openmpi", f"--launcher_args={mpirun_args(cfg, files.env)}"]
        check = ["--no_ssh_check"] if cfg.cluster.no_ssh_check else []
        hosts, train = hostfile_args(cfg, files.run_dir), train_args(cfg, files.run_dir)
        files.commands = [["deepspeed", *launcher, *hosts, *check, *train]]


def mpirun_args(cfg: MoelabConfig, env: dict[str, str]) -> str:
    """mpirun options: no core binding, ssh options, the interface between hosts, and `-x NAME`
    for each rank variable (mpirun copies its value from its own environment, command.sh's
    exports, as it is: DeepSpeed's `-x NAME=VALUE` would keep the quotes it adds around values
    with spaces)."""
    # mpirun binds each rank to one core (2 ranks or fewer) or one socket; DeepSpeed's other
    # launchers bind nothing, and a rank's threads (train.threads_per_rank) assume its host's cores
    c, args = cfg.cluster, ["--bind-to", "none"]
    if c.ssh_args:
        args += ["--mca", "plm_rsh_args", c.ssh_args]
    if c.socket_ifname:
        args += ["--mca", "btl_tcp_if_include", c.socket_ifname]
        args += ["--mca", "oob_tcp_if_include", c.socket_ifname]
    for key in sorted(env):
        args += ["-x", key]
    return shlex.join(args)
