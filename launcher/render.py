"""Render the run directory: everything the launcher runs is on disk before it runs.

What every backend shares (the resolved config, DeepSpeed's config, the rank environment, the
re-runnable scripts); each backend (`launcher.backends`) adds its own commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from launcher import tracking
from launcher.errors import ConfigError
from launcher.hostfile import Resources
from moelab import startup
from moelab.config import MoelabConfig
from moelab.dsconfig import build_ds_config
from moelab.rundir import RunDir
from moelab.shapes import threads_per_rank

# Forwarded from the launcher's environment to every rank when set.
PASS_THROUGH = (
    *("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_HOME", "PYTHONPATH"),
    "DEEPSPEED_TIMEOUT",
)
PASS_THROUGH_PREFIXES = ("NCCL_", "CUDA_")
"""Also forwarded (DeepSpeed's runner forwards NCCL_* only from a head with a GPU, CUDA_* never)."""
PER_HOST = ("CUDA_VISIBLE_DEVICES",)
"""Never forwarded: each host's DeepSpeed launcher sets its own from the hostfile's slots."""
DS_WRAPS = re.compile(r"[^\w@%+=:,./-]")
"""A value with such a character is put in double quotes by DeepSpeed's runner (add_export)."""


@dataclass
class RunFiles:
    """What the launcher wrote into the run dir and will execute."""

    paths: RunDir
    commands: list[list[str]]
    """One command per script: the head's first, then node 1.. for backend no_ssh."""
    env: dict[str, str] = field(default_factory=dict)
    env_file: bool = False
    """Write .deepspeed_env (pdsh carries it to the other hosts)."""

    @property
    def run_dir(self) -> Path:
        return self.paths.root

    @property
    def command(self) -> list[str]:
        return self.commands[0]

    @property
    def script(self) -> Path:
        return self.paths.script

    def node_script(self, node_rank: int) -> Path:
        return self.paths.node_script(node_rank)

    @property
    def log(self) -> Path:
        return self.paths.log


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def absolutize(cfg: MoelabConfig, run_dir: Path, resources: Resources | None) -> None:
    """Fix paths and addresses so every rank on every host reads the same ones."""
    cfg.run_dir = str(run_dir.resolve())
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).resolve())
    cfg.data.data_files = [str(Path(f).resolve()) for f in cfg.data.data_files]
    if cfg.cluster.master_port is None:
        cfg.cluster.master_port = free_port()
    if resources is not None:
        cfg.cluster.master_addr = cfg.cluster.master_addr or resources.first_host


def hostfile_args(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    """deepspeed's options naming the hosts: the run dir's hostfile, filters, the master."""
    c = cfg.cluster
    args = [f"--hostfile={RunDir(run_dir).hostfile}"]
    args += [f"--include={c.include}"] if c.include else []
    args += [f"--exclude={c.exclude}"] if c.exclude else []
    args += [f"--num_nodes={c.num_nodes}"] if c.num_nodes > 0 else []
    return [*args, f"--master_addr={c.master_addr}", f"--master_port={c.master_port}"]


def train_args(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    """What deepspeed runs on every rank (--no_local_rank: LOCAL_RANK comes from the env)."""
    return [
        "--no_local_rank",
        *cfg.launch.extra_args,
        "--module",
        "moelab.train",
        "--config",
        str(RunDir(run_dir).config),
    ]


def prepare_first(run_dir: Path, command: list[str]) -> list[str]:
    """`command`, run once the data is prepared on that host (`python -m moelab.datacache`:
    at once when the cache's receipt holds, else `moelab.data`'s full preparation)."""
    config = str(RunDir(run_dir).config)
    return ["python", "-m", "moelab.datacache", "--config", config, "--", *command]


def rank_env(cfg: MoelabConfig, slots_per_host: int) -> dict[str, str]:
    """Environment every rank needs on top of its host's."""
    threads = threads_per_rank(os.cpu_count(), slots_per_host, cfg.train.threads_per_rank)
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.update({k: v for k, v in os.environ.items() if v and forwarded(k)})
    if cfg.cluster.socket_ifname:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = cfg.cluster.socket_ifname
    if cfg.cluster.ssh_args:
        env["PDSH_SSH_ARGS_APPEND"] = cfg.cluster.ssh_args
    env.update(cfg.cluster.env)
    # moelab's sitecustomize first: DeepSpeed's launcher processes skip importing MLflow
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (startup.FOLDER, env.get("PYTHONPATH"))))
    return env


def forwarded(key: str) -> bool:
    """Whether the launcher's variable `key` goes to every rank on every host."""
    return key in PASS_THROUGH or (key.startswith(PASS_THROUGH_PREFIXES) and key not in PER_HOST)


def env_file_value(key: str, value: str) -> str:
    """`value` as written in .deepspeed_env so that it reaches the ranks of every host as it is.

    DeepSpeed's pdsh runner strips each value, puts it in double quotes if it has a character
    outside [\\w@%+=:,./-], and joins `export KEY=VALUE; ` into the one command pdsh runs on
    every host through the remote shell, pdsh first replacing %n, %h and %% in it. So: % is
    doubled and, when DeepSpeed adds the quotes, \\ " $ ` get a backslash; leading or trailing
    whitespace (stripped) and line breaks (a line each) cannot be carried.
    """
    if value != value.strip() or "\n" in value or "\r" in value:
        raise ConfigError(
            f"The rank variable {key}={value!r} cannot reach other hosts through .deepspeed_env: "
            f"remove its leading or trailing whitespace and line breaks (cluster.env.{key} or "
            "the launcher's environment)."
        )
    value = value.replace("%", "%%")
    return re.sub(r'([\\"$`])', r"\\\1", value) if DS_WRAPS.search(value) else value


def write_scripts(files: RunFiles) -> None:
    """command.sh (and node_N.sh): the environment and the command, re-runnable by hand."""
    bin_dir = Path(sys.executable).parent
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted(files.env.items())]
    if files.env_file:
        env_file = files.paths.deepspeed_env
        env_lines = (f"{k}={env_file_value(k, v)}\n" for k, v in sorted(files.env.items()))
        env_file.write_text("".join(env_lines))
        exports.append(f"export DS_ENV_FILE={shlex.quote(str(env_file))}")
    for n, command in enumerate(files.commands):
        lines = [
            "#!/usr/bin/env bash",
            "# Rendered by moelab-launch. Re-run by hand with: bash " + files.node_script(n).name,
            "set -euo pipefail",
            f"cd {shlex.quote(os.getcwd())}",
            f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"',
            *exports,
            "exec " + shlex.join(command),
        ]
        files.node_script(n).write_text("\n".join(lines) + "\n")
        files.node_script(n).chmod(0o755)


def render_run_dir(
    cfg: MoelabConfig, run_dir: Path, resources: Resources | None, slots: int | None = None
) -> RunFiles:
    """What every backend writes: config.yaml (resolved), ds_config.json and the hostfile;
    the rank environment (`slots`: ranks per host, for the threads per rank). The backend
    then adds its commands and writes its scripts once."""
    paths = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    absolutize(cfg, run_dir, resources)
    if resources is not None and cfg.cluster.hostfile:
        shutil.copyfile(cfg.cluster.hostfile, paths.hostfile)
    OmegaConf.save(OmegaConf.structured(cfg), paths.config)
    paths.ds_config.write_text(json.dumps(build_ds_config(cfg), indent=2) + "\n")
    if slots is None and resources is not None:
        slots = max(len(s) for s in resources.hosts.values())
    env = rank_env(cfg, slots or cfg.cluster.nproc_per_node) | tracking.rank_env(cfg)
    return RunFiles(paths, commands=[], env=env)
