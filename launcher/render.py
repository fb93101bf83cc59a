"""Render the run directory: everything the launcher runs is on disk before it runs."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moelab.config import MoelabConfig
from moelab.engine import build_ds_config


@dataclass
class RunFiles:
    """What the launcher wrote and will execute."""

    run_dir: Path
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def script(self) -> Path:
        return self.run_dir / "command.sh"

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def absolutize(cfg: MoelabConfig, run_dir: Path) -> None:
    """Fix paths relative to the launch directory so every rank reads the same ones."""
    cfg.run_dir = str(run_dir.resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).resolve())
    cfg.data.data_files = [str(Path(f).resolve()) for f in cfg.data.data_files]
    if cfg.cluster.master_port is None:
        cfg.cluster.master_port = free_port()


def deepspeed_command(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    """The exact deepspeed CLI invocation (local backend)."""
    c = cfg.cluster
    return [
        "deepspeed",
        f"--num_gpus={c.nproc_per_node}",
        f"--master_port={c.master_port}",
        "--no_local_rank",  # Hydra-style argv on the ranks; LOCAL_RANK comes from the env
        *cfg.launch.extra_args,
        "--module",
        "moelab.train",
        "--config",
        str(run_dir / "config.yaml"),
    ]


def rank_env(cfg: MoelabConfig) -> dict[str, str]:
    """Environment the ranks need on top of the launcher's."""
    threads = cfg.train.threads_per_rank or max(
        1, (os.cpu_count() or 1) // cfg.cluster.nproc_per_node
    )
    return {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def write_script(files: RunFiles) -> None:
    """command.sh: the environment and the command, re-runnable by hand."""
    bin_dir = Path(sys.executable).parent
    lines = [
        "#!/usr/bin/env bash",
        "# Rendered by moelab-launch. Re-run by hand with: bash command.sh",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"',
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(files.env.items())),
        "exec " + shlex.join(files.command),
    ]
    files.script.write_text("\n".join(lines) + "\n")
    files.script.chmod(0o755)


def render(cfg: MoelabConfig, run_dir: Path) -> RunFiles:
    """Write config.yaml (resolved), ds_config.json and command.sh into run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    absolutize(cfg, run_dir)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    ds_config = build_ds_config(cfg)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    files = RunFiles(run_dir=run_dir, command=deepspeed_command(cfg, run_dir), env=rank_env(cfg))
    write_script(files)
    return files
