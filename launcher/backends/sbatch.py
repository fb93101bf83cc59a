"""cluster=slurm's batch script (job.sbatch) and the commands it runs on the nodes.

The job runs one `deepspeed --no_ssh --node_rank=$SLURM_NODEID` per node through `srun`,
after preparing the data on that node; each starts that node's ranks on the GPUs Slurm gave
the node (its CUDA_VISIBLE_DEVICES). DeepSpeed's own `--launcher=slurm` is not used: it runs
`srun python -u <script>` (no `--module`) and leaves RANK/MASTER_ADDR to MPI discovery.

On the nodes: `python -m launcher.backends.sbatch node <hostfile> deepspeed ...` adds the
node's hostfile and GPUs; `... end-run <run dir> <code>` ends the MLflow run of a job nobody
follows.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from launcher.errors import ConfigError
from launcher.render import RunFiles, train_args
from moelab import runref
from moelab.config import MoelabConfig
from moelab.rundir import RunDir

TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
OWN_OPTIONS = ("-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-o", "--output", "-e",
               "--error", "-p", "--partition", "-t", "--time", "-A", "--account")  # fmt: skip
"""sbatch options job.sbatch sets from cluster.* (an extra line must not contradict them)."""
MODULE = "launcher.backends.sbatch"


def minutes(limit: str) -> int | None:
    """A Slurm time limit in minutes (None if it is not in one of Slurm's formats)."""
    m = TIME.match(limit)
    if m is None:
        return None
    if m.group(1) is not None:  # days-hours[:minutes[:seconds]]
        d, h, mi, s = (int(g or 0) for g in m.group(1, 2, 3, 4))
        return d * 1440 + h * 60 + mi + (s > 0)
    mi, s, s2 = (int(g or 0) for g in m.group(5, 6, 7))
    if m.group(7) is not None:  # hours:minutes:seconds
        return mi * 60 + s + (s2 > 0)
    return mi + (s > 0)


def option_name(line: str) -> str:
    return line.split("=", 1)[0].split()[0]


def sbatch_header(cfg: MoelabConfig, run_dir: Path) -> list[str]:
    c, paths = cfg.cluster, RunDir(run_dir)
    lines = [
        f"--job-name=moelab-{cfg.model.name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",  # one deepspeed launcher per node; it starts the node's ranks
        f"--time={c.slurm_time}",
        f"--output={paths.slurm_output('%j')}",
        f"--error={paths.slurm_output('%j', 'err')}",
        *([f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []),
        *([f"--partition={c.slurm_partition}"] if c.slurm_partition else []),
        *([f"--account={c.slurm_account}"] if c.slurm_account else []),
        *c.slurm_extra,
    ]
    return [f"#SBATCH {line}" for line in lines]


def node_step(cfg: MoelabConfig, run_dir: Path) -> str:
    """What srun runs once per node: the data preparation, then deepspeed with its node rank
    and master from Slurm's env (`node` below adds the hostfile and this node's GPUs)."""
    c, paths = cfg.cluster, RunDir(run_dir)
    prepare = ["python", "-m", "moelab.datacache", "--config", str(paths.config)]
    node = ["python", "-m", MODULE, "node", str(paths.slurm_hostfile)]
    cmd = ["deepspeed", "--no_ssh", f"--master_port={c.master_port}"]
    return (
        f"{shlex.join(prepare)} && exec {shlex.join([*node, *cmd])} "
        f'--node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" '
        + shlex.join(train_args(cfg, run_dir))
    )


def node_args(hostfile: Path, node_rank: int, visible: str | None) -> list[str]:
    """deepspeed's --hostfile (and --include) for node `node_rank` of the job.

    DeepSpeed hands a node's ranks the hostfile's slots 0..N-1 as CUDA_VISIBLE_DEVICES. When
    Slurm named the node's GPUs (`visible`, physical ids) this node's slots are those ids
    instead: a copy of the hostfile wide enough for them, and an --include with every node's
    slots (the other nodes' count is all that matters here; each node picks its own ids).
    """
    if not visible:
        return [f"--hostfile={hostfile}"]
    hosts = [line.split() for line in hostfile.read_text().splitlines() if line.strip()]
    per_node = int(hosts[node_rank][1].removeprefix("slots="))
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    if len(ids) < per_node or not all(d.isdigit() for d in ids):
        raise ConfigError(
            f"node {hosts[node_rank][0]} has CUDA_VISIBLE_DEVICES={visible}, not {per_node} GPU "
            "indices; request cluster.gpus_per_node GPUs per node for cluster.nproc_per_node ranks."
        )
    ids = ids[:per_node]
    own = RunDir(hostfile.parent).slurm_node_hostfile(node_rank)
    width = max(per_node, *(int(d) + 1 for d in ids))
    own.write_text("".join(f"{h[0]} slots={width}\n" for h in hosts))
    every = ",".join(str(i) for i in range(per_node))
    slots = [f"{h[0]}:{','.join(ids) if n == node_rank else every}" for n, h in enumerate(hosts)]
    return [f"--hostfile={own}", f"--include={'@'.join(slots)}"]


def exec_node(hostfile: Path, command: list[str]) -> NoReturn:
    """Run `command` (deepspeed ...) with this node's node_args; Slurm's variables say which."""
    env = dict(os.environ)
    visible = env.pop("CUDA_VISIBLE_DEVICES", None)  # DeepSpeed sets the ranks' own
    try:
        args = node_args(hostfile, int(env["SLURM_NODEID"]), visible)
    except ConfigError as err:
        sys.exit(f"moelab: error: {err}")
    os.execvpe(command[0], [command[0], *args, *command[1:]], env)


def write_sbatch(files: RunFiles, cfg: MoelabConfig) -> Path:
    """<run dir>/job.sbatch: the allocation, the ranks' environment and the srun step."""
    c, run_dir = cfg.cluster, files.run_dir
    hostfile, env = files.paths.slurm_hostfile, dict(files.env)
    if not cfg.train.threads_per_rank:  # the node's cores, not the submitting host's
        env.pop("OMP_NUM_THREADS", None)
    srun = [
        *("srun", "--ntasks-per-node=1", f"--nodes={c.nodes}", f"--ntasks={c.nodes}"),
        *("--kill-on-bad-exit=1", f"--output={files.paths.node_log('%n')}"),
    ]
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by moelab-launch: {c.nodes} nodes x {c.nproc_per_node} ranks per node "
        f"= world size {cfg.world_size}.",
        *sbatch_header(cfg, run_dir),
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"',
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( (${{SLURM_CPUS_ON_NODE:-1}} + "
        f"{c.nproc_per_node} - 1) / {c.nproc_per_node} ))}}",
        f'if [ "$SLURM_JOB_NUM_NODES" != {c.nodes} ]; then',
        f'  echo "moelab: got $SLURM_JOB_NUM_NODES nodes, the run needs {c.nodes}" >&2; exit 2',
        "fi",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "# DeepSpeed's world is the allocation; rank 0 runs on its first node, reached by the",
        "# address Slurm itself uses for that node (NodeAddr; the node name when unset).",
        f'printf "%s slots={c.nproc_per_node}\\n" "${{NODES[@]}}" > {shlex.quote(str(hostfile))}',
        'MASTER_ADDR=$(scontrol -o show node "${NODES[0]}" |'
        ' sed -n "s/.* NodeAddr=\\([^ ]*\\).*/\\1/p")',
        "export MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}",
        f"{shlex.join(srun)} bash -c {shlex.quote(node_step(cfg, run_dir))}",
    ]
    if not c.wait:  # nobody follows the job: it ends its MLflow run itself
        lines[-1] = f"set +e; {lines[-1]}"
        lines += [
            "code=$?",
            f"python -m {MODULE} end-run {shlex.quote(str(run_dir))} $code || true",
            "exit $code",
        ]
    files.paths.sbatch.write_text("\n".join(lines) + "\n")
    return files.paths.sbatch


def end_run(run_dir: Path, code: int) -> None:
    """The job's last step when nobody follows it: end its MLflow run by its exit code."""
    from launcher import tracking

    uri, run_id = runref.read(run_dir)
    tracking.end_run(uri, run_id, "FINISHED" if code == 0 else "FAILED")


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"] and len(sys.argv) > 3:
        exec_node(Path(sys.argv[2]), sys.argv[3:])
    if sys.argv[1:2] != ["end-run"] or len(sys.argv) != 4:
        sys.exit(
            f"usage: python -m {MODULE} end-run <run dir> <exit code>\n"
            f"       python -m {MODULE} node <hostfile> deepspeed <args>"
        )
    end_run(Path(sys.argv[2]), int(sys.argv[3]))
