"""The run directory: the one contract between the head node and the ranks.

The launcher writes a run dir (on storage every host sees) before anything runs; the ranks
read their config from it and write checkpoints, the MLflow spool and hang dumps into it.
Every file name of a run lives here and nowhere else. Torch-free: the launcher imports it.

    config.yaml          resolved config (ranks: --config)     ds_config.json   DeepSpeed's config
    hostfile             the hostfile the run used             .deepspeed_env   pdsh's rank env
    command.sh           the exact command, re-runnable        node_<N>.sh      no_ssh node N
    job.sbatch           Slurm batch script                    hostfile.slurm   Slurm's nodes
    slurm-<job>.out/.err the batch script's output             hostfile.slurm.node<N>  node N's
    train.log            every rank's output                   train-node<N>.log  Slurm node N
    mlflow_run.json      the MLflow run id (moelab.runref)     mlflow_spool.*   write-ahead spool
    spool_artifacts/     artifacts waiting for the server      checkpoints/     DeepSpeed's + meta
    stop_requested       the launcher's stop request           hang/            hang dumps
    .hydra/              Hydra's record of the composition     moelab.log       Hydra's job log
    plots/               rank 0's expert-load plots (PNG)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's files under `root`."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        """The resolved config every rank loads."""
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        """DeepSpeed's config, built from the resolved config."""
        return self.root / "ds_config.json"

    @property
    def hostfile(self) -> Path:
        """A copy of the hostfile the run was launched with."""
        return self.root / "hostfile"

    @property
    def slurm_hostfile(self) -> Path:
        """The hostfile a Slurm job writes from its allocation."""
        return self.root / "hostfile.slurm"

    @property
    def deepspeed_env(self) -> Path:
        """The rank environment DeepSpeed's pdsh runner carries to other hosts."""
        return self.root / ".deepspeed_env"

    @property
    def script(self) -> Path:
        """command.sh: the environment and the exact command, re-runnable by hand."""
        return self.root / "command.sh"

    def node_script(self, node_rank: int) -> Path:
        """The script of node `node_rank` (command.sh for node 0)."""
        return self.script if node_rank == 0 else self.root / f"node_{node_rank}.sh"

    @property
    def sbatch(self) -> Path:
        """The Slurm batch script."""
        return self.root / "job.sbatch"

    @property
    def log(self) -> Path:
        """Every rank's output, as the launcher streams it."""
        return self.root / "train.log"

    def node_log(self, node_rank: int | str) -> Path:
        """The output of Slurm node `node_rank` (or of every node: srun's pattern `%n`)."""
        return self.root / f"train-node{node_rank}.log"

    def slurm_output(self, job_id: str, stream: str = "out") -> Path:
        """The batch script's stdout (`out`) or stderr (`err`) of job `job_id` (or `%j`)."""
        return self.root / f"slurm-{job_id}.{stream}"

    def slurm_node_hostfile(self, node_rank: int) -> Path:
        """The copy of hostfile.slurm that names node `node_rank`'s GPUs as its slots."""
        return self.root / f"{self.slurm_hostfile.name}.node{node_rank}"

    @property
    def run_ref(self) -> Path:
        """The MLflow run id and tracking URI (`moelab.runref`)."""
        return self.root / "mlflow_run.json"

    @property
    def spool(self) -> Path:
        """Rank 0's write-ahead record of its MLflow calls (JSON lines)."""
        return self.root / "mlflow_spool.jsonl"

    @property
    def spool_offset(self) -> Path:
        """How far the spool has reached the server."""
        return self.root / "mlflow_spool.offset"

    @property
    def spool_lock(self) -> Path:
        """Held by whoever replays the spool."""
        return self.root / "mlflow_spool.lock"

    @property
    def spool_artifacts(self) -> Path:
        """Artifacts logged while the server was away."""
        return self.root / "spool_artifacts"

    @property
    def plots(self) -> Path:
        """Rank 0's expert-load heatmaps, also logged to MLflow under plots/."""
        return self.root / "plots"

    @property
    def checkpoints(self) -> Path:
        """DeepSpeed's checkpoints (one global_step<N> folder each) and moelab's meta.json."""
        return self.root / "checkpoints"

    @property
    def checkpoint_meta(self) -> Path:
        """moelab's record of the newest complete checkpoint (tag, step, layout)."""
        return self.checkpoints / "meta.json"

    @property
    def stop_request(self) -> Path:
        """Written by the launcher on its first SIGTERM/SIGINT: the ranks stop after a step."""
        return self.root / "stop_requested"

    @property
    def hydra(self) -> Path:
        """Hydra's record of how the config was composed (its config and overrides)."""
        return self.root / ".hydra"

    @property
    def hydra_log(self) -> Path:
        """Hydra's log of the launcher's job (named after hydra.job.name)."""
        return self.root / "moelab.log"

    @property
    def hang(self) -> Path:
        """Hang dumps and heartbeats (`moelab.hang`)."""
        return self.root / "hang"
