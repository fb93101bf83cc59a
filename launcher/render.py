"""Render the run directory: everything the launcher runs is on disk before it runs."""

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

from launcher import gpus, tracking
from launcher.hostfile import Resources
from launcher.validate import ConfigError
from moelab.config import MoelabConfig
from moelab.dsconfig import build_ds_config

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
    """What the launcher wrote and will execute."""

    run_dir: Path
    commands: list[list[str]]
    """One command per script: the head's first, then node 1.. for backend no_ssh."""
    env: dict[str, str] = field(default_factory=dict)
    env_file: bool = False
    """Write .deepspeed_env (pdsh carries it to the other hosts)."""

    @property
    def command(self) -> list[str]:
        return self.commands[0]

    @property
    def script(self) -> Path:
        return self.run_dir / "command.sh"

    def node_script(self, node_rank: int) -> Path:
        return self.script if node_rank == 0 else self.run_dir / f"node_{node_rank}.sh"

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


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


def _hostfile_args(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    c = cfg.cluster
    args = [f"--hostfile={run_dir / 'hostfile'}"]
    args += [f"--include={c.include}"] if c.include else []
    args += [f"--exclude={c.exclude}"] if c.exclude else []
    args += [f"--num_nodes={c.num_nodes}"] if c.num_nodes > 0 else []
    return [*args, f"--master_addr={c.master_addr}", f"--master_port={c.master_port}"]


def _train_args(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    # --no_local_rank: Hydra-style argv on the ranks; LOCAL_RANK comes from the env.
    return [
        "--no_local_rank",
        *cfg.launch.extra_args,
        "--module",
        "moelab.train",
        "--config",
        str(run_dir / "config.yaml"),
    ]


def local_command(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    """deepspeed on this machine: --num_gpus ranks, or the GPUs CUDA_VISIBLE_DEVICES names.

    With --num_gpus DeepSpeed replaces CUDA_VISIBLE_DEVICES by 0..N-1, so set devices are
    named with --include instead: DeepSpeed writes those ids into the ranks'
    CUDA_VISIBLE_DEVICES as they are, hence physical ids, and the variable is unset for
    DeepSpeed itself, which then counts (and checks the ids against) all of the host's GPUs.
    """
    c, train = cfg.cluster, _train_args(cfg, run_dir)
    port = f"--master_port={c.master_port}"
    ids = gpus.local_gpus() if "CUDA_VISIBLE_DEVICES" in os.environ else []
    if not ids:
        return ["deepspeed", f"--num_gpus={c.nproc_per_node}", port, *train]
    include = f"--include=localhost:{','.join(ids[: c.nproc_per_node])}"
    return ["env", "-u", "CUDA_VISIBLE_DEVICES", "deepspeed", include, port, *train]


def prepare_first(run_dir: Path, command: list[str]) -> list[str]:
    """`command`, run once the data is prepared on that host (`python -m moelab.datacache`:
    at once when the cache's receipt holds, else `moelab.data`'s full preparation)."""
    config = str(run_dir / "config.yaml")
    return ["python", "-m", "moelab.datacache", "--config", config, "--", *command]


def deepspeed_commands(
    cfg: MoelabConfig, run_dir: Path, nodes: int, env: dict[str, str] | None = None
) -> list[list[str]]:
    """The exact deepspeed CLI invocation(s) for the cluster backend (`env`: the ranks')."""
    c, train, env = cfg.cluster, _train_args(cfg, run_dir), env or {}
    if c.backend == "local":
        return [local_command(cfg, run_dir)]
    hosts = _hostfile_args(cfg, run_dir)
    if c.backend == "no_ssh":  # the launcher prepares node 0's data; the others do their own
        node = [["deepspeed", *hosts, "--no_ssh", f"--node_rank={n}", *train] for n in range(nodes)]
        return node[:1] + [prepare_first(run_dir, cmd) for cmd in node[1:]]
    launcher: list[str] = []
    if c.backend == "openmpi":
        launcher = ["--launcher=openmpi", f"--launcher_args={mpirun_args(cfg, env)}"]
    check = ["--no_ssh_check"] if c.no_ssh_check else []
    return [["deepspeed", *launcher, *hosts, *check, *train]]


def mpirun_args(cfg: MoelabConfig, env: dict[str, str]) -> str:
    """mpirun options: ssh options, the interface between hosts, and `-x NAME` for each rank
    variable (mpirun copies its value from its own environment, command.sh's exports, as it is:
    DeepSpeed's `-x NAME=VALUE` would keep the quotes it adds around values with spaces)."""
    c, args = cfg.cluster, []
    if c.ssh_args:
        args += ["--mca", "plm_rsh_args", c.ssh_args]
    if c.socket_ifname:
        args += ["--mca", "btl_tcp_if_include", c.socket_ifname]
        args += ["--mca", "oob_tcp_if_include", c.socket_ifname]
    for key in sorted(env):
        args += ["-x", key]
    return shlex.join(args)


def rank_env(cfg: MoelabConfig, slots_per_host: int) -> dict[str, str]:
    """Environment every rank needs on top of its host's."""
    threads = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // slots_per_host)
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.update({k: v for k, v in os.environ.items() if v and forwarded(k)})
    if cfg.cluster.socket_ifname:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = cfg.cluster.socket_ifname
    if cfg.cluster.ssh_args:
        env["PDSH_SSH_ARGS_APPEND"] = cfg.cluster.ssh_args
    env.update(cfg.cluster.env)
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
        env_file = files.run_dir / ".deepspeed_env"
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


def render(cfg: MoelabConfig, run_dir: Path, resources: Resources | None = None) -> RunFiles:
    """Write config.yaml (resolved), ds_config.json, the hostfile and the scripts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    absolutize(cfg, run_dir, resources)
    if resources is not None and cfg.cluster.hostfile:
        shutil.copyfile(cfg.cluster.hostfile, run_dir / "hostfile")
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    ds_config = build_ds_config(cfg)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    slots = max(len(s) for s in resources.hosts.values()) if resources else None
    env = rank_env(cfg, slots or cfg.cluster.nproc_per_node) | tracking.rank_env(cfg, run_dir)
    files = RunFiles(
        run_dir=run_dir,
        commands=deepspeed_commands(cfg, run_dir, cfg.cluster.nodes, env),
        env=env,
        env_file=cfg.cluster.backend == "hostfile",
    )
    if cfg.cluster.backend == "slurm":
        from launcher.slurm import write_sbatch

        files.commands = [["sbatch", "--parsable", str(write_sbatch(files, cfg))]]
    write_scripts(files)
    return files
