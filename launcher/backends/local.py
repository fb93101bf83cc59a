"""cluster=local: deepspeed starts every rank on this machine."""

from __future__ import annotations

import os

from launcher import gpus
from launcher.backends.common import Supervised
from launcher.render import RunFiles, train_args
from launcher.rules import require
from moelab.config import MoelabConfig


class Local(Supervised):
    """One host, one `deepspeed --num_gpus` (or `--include` of the visible GPUs)."""

    ranks_beside = True

    def validate(self, cfg: MoelabConfig, planning: bool = False) -> None:
        c = cfg.cluster
        if planning:
            return
        require(c.nodes == 1, "cluster=local runs on one node; set nodes=1.")
        require(
            c.world_size in (0, c.nproc_per_node),
            f"cluster.world_size={c.world_size} is not the {c.nproc_per_node} ranks of "
            "cluster=local; drop cluster.world_size.",
        )
        validate_local_gpus(c.nproc_per_node)

    def add_commands(self, cfg: MoelabConfig, files: RunFiles) -> None:
        files.commands = [local_command(cfg, files)]


def local_command(cfg: MoelabConfig, files: RunFiles) -> list[str]:
    """deepspeed on this machine: --num_gpus ranks, or the GPUs CUDA_VISIBLE_DEVICES names.

    With --num_gpus DeepSpeed replaces CUDA_VISIBLE_DEVICES by 0..N-1, so set devices are
    named with --include instead: DeepSpeed writes those ids into the ranks'
    CUDA_VISIBLE_DEVICES as they are, hence physical ids, and the variable is unset for
    DeepSpeed itself, which then counts (and checks the ids against) all of the host's GPUs.
    """
    c, train = cfg.cluster, train_args(cfg, files.run_dir)
    port = f"--master_port={c.master_port}"
    ids = gpus.local_gpus() if "CUDA_VISIBLE_DEVICES" in os.environ else []
    if not ids:
        return ["deepspeed", f"--num_gpus={c.nproc_per_node}", port, *train]
    include = f"--include=localhost:{','.join(ids[: c.nproc_per_node])}"
    return ["env", "-u", "CUDA_VISIBLE_DEVICES", "deepspeed", include, port, *train]


def validate_local_gpus(ranks: int) -> None:
    """On a GPU host the local ranks get the visible GPUs, one each, by physical index."""
    count, ids = gpus.gpu_count(), gpus.local_gpus()
    if count == 0 or not ids:
        return  # no GPU (or CUDA_VISIBLE_DEVICES hides them all): the ranks are CPU processes
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    bad = gpus.not_indices(ids, count)
    require(
        not bad,
        f"CUDA_VISIBLE_DEVICES={shown} names {','.join(bad)}, which is not the index of one of "
        f"this host's {count} GPUs (0-{count - 1}); list GPU indices such as 0,1 there.",
    )
    where = f"CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "this host"
    require(
        ranks <= len(ids),
        f"cluster.nproc_per_node={ranks} exceeds the {len(ids)} GPUs of {where} (one rank per "
        "GPU); lower it, or leave it unset to start one rank per visible GPU.",
    )
