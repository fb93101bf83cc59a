"""Launcher backends: one module per `cluster.backend`, one interface.

    local     deepspeed on this machine                          (local.py)
    hostfile  DeepSpeed's pdsh runner over ssh                   (pdsh.py)
    no_ssh    one script per node, started on each host          (no_ssh.py)
    openmpi   DeepSpeed's OpenMPI runner (mpirun)                (openmpi.py)
    slurm     one batch job, srun starts a deepspeed per node    (slurm.py, sbatch.py)

A launch asks its backend, in this order: the hosts (`resolve_hosts`, which sets the world
size), its config rules (`validate`, part of `launcher.validate`), the live cluster
(`preflight`, not on a dry run), the run dir (`render`, every file written once), then `run`;
`cancel` stops the ranks when the MLflow run cannot be created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from launcher.backends.local import Local
from launcher.backends.no_ssh import NoSsh
from launcher.backends.openmpi import OpenMpi
from launcher.backends.pdsh import Pdsh
from launcher.backends.slurm import Slurm
from launcher.hostfile import Resources
from launcher.jobs import JobOutcome
from launcher.render import RunFiles
from launcher.tracking import PendingRun
from moelab.config import MoelabConfig


class Backend(Protocol):
    """What the launcher asks of a cluster backend."""

    ranks_beside: bool
    """Every rank runs on the launcher's host (it then sends rank 0's MLflow records)."""

    def resolve_hosts(self, cfg: MoelabConfig) -> Resources | None:
        """The hosts and slots of the run (sets cluster.nodes and world_size); None when this
        machine or the scheduler decides."""
        ...

    def validate(self, cfg: MoelabConfig, planning: bool = False) -> None:
        """The backend's own config rules (ConfigError); `planning` describes a cluster."""
        ...

    def preflight(self, cfg: MoelabConfig) -> None:
        """Checks against the live cluster before anything is rendered (ConfigError)."""
        ...

    def render(self, cfg: MoelabConfig, run_dir: Path, resources: Resources | None) -> RunFiles:
        """Write the run dir (`moelab.rundir.RunDir`), each file once."""
        ...

    def run(
        self, cfg: MoelabConfig, files: RunFiles, run: PendingRun, job: JobOutcome | None = None
    ) -> int:
        """Execute the rendered run dir into MLflow run `run`; the exit code."""
        ...

    def cancel(self, reason: str) -> None:
        """Stop the ranks now (or keep them from starting): the launch cannot succeed."""
        ...


BACKENDS: dict[str, type[Backend]] = {
    "local": Local,
    "hostfile": Pdsh,
    "no_ssh": NoSsh,
    "openmpi": OpenMpi,
    "slurm": Slurm,
}
"""cluster.backend -> its backend."""


def backend_for(cfg: MoelabConfig) -> Backend:
    """A fresh backend for the config's cluster.backend (validated before)."""
    return BACKENDS[cfg.cluster.backend]()


def render(cfg: MoelabConfig, run_dir: Path, resources: Resources | None = None) -> RunFiles:
    """Render `run_dir` with the config's backend."""
    return backend_for(cfg).render(cfg, run_dir, resources)


def resolve_hosts(cfg: MoelabConfig) -> Resources | None:
    """The hosts of the config's backend (sets the world size); None on one machine."""
    return backend_for(cfg).resolve_hosts(cfg)
