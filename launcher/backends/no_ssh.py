"""cluster=no_ssh: one script per node, each started on its host by hand (or by a scheduler)."""

from __future__ import annotations

from launcher.backends.common import MultiHost
from launcher.render import RunFiles, hostfile_args, prepare_first, train_args
from moelab.config import MoelabConfig


class NoSsh(MultiHost):
    """`deepspeed --no_ssh --node_rank=N` per node: command.sh here, node_<N>.sh elsewhere."""

    def add_commands(self, cfg: MoelabConfig, files: RunFiles) -> None:
        """The launcher prepares node 0's data; the other nodes' scripts prepare their own."""
        run_dir = files.run_dir
        hosts, train = hostfile_args(cfg, run_dir), train_args(cfg, run_dir)
        nodes = [
            ["deepspeed", *hosts, "--no_ssh", f"--node_rank={n}", *train]
            for n in range(cfg.cluster.nodes)
        ]
        files.commands = nodes[:1] + [prepare_first(run_dir, cmd) for cmd in nodes[1:]]
