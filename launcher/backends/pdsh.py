"""cluster=hostfile: DeepSpeed's pdsh runner starts the ranks of every host over ssh."""

from __future__ import annotations

from launcher.backends.common import MultiHost
from launcher.render import RunFiles, hostfile_args, train_args
from moelab.config import MoelabConfig


class Pdsh(MultiHost):
    """One `deepspeed --hostfile`; pdsh carries the rank environment (.deepspeed_env)."""

    def add_commands(self, cfg: MoelabConfig, files: RunFiles) -> None:
        files.env_file = True
        check = ["--no_ssh_check"] if cfg.cluster.no_ssh_check else []
        hosts, train = hostfile_args(cfg, files.run_dir), train_args(cfg, files.run_dir)
        files.commands = [["deepspeed", *hosts, *check, *train]]
