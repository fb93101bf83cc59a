"""cluster=slurm's batch script (job.sbatch).

The job runs one `deepspeed --no_ssh --node_rank=$SLURM_NODEID` per node through `srun`,
after preparing the data on that node; each starts that node's ranks on the GPUs Slurm gave
the node (its CUDA_VISIBLE_DEVICES). DeepSpeed's own `--launcher=slurm` is not used: it runs
`srun python -u <script>` (no `--module`) and leaves RANK/MASTER_ADDR to MPI discovery.

What the script runs on the nodes besides deepspeed (this node's hostfile and GPUs, the
requeue after Slurm's signal, the end of an unfollowed run) is `launcher.slurm_job`.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from launcher.render import RunFiles, train_args
from launcher.slurm_job import MODULE
from moelab.config import MoelabConfig
from moelab.rundir import RunDir

TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
OWN_OPTIONS = ("-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-o", "--output", "-e",
               "--error", "-p", "--partition", "-t", "--time", "-A", "--account", "--signal",
               "--requeue", "--no-requeue", "--open-mode")  # fmt: skip
"""sbatch options job.sbatch sets from cluster.* (an extra line must not contradict them)."""
STOP_SIGNAL = "USR1"
"""What Slurm sends the batch shell (only: `B:`) cluster.slurm_signal_seconds before the limit."""


def requeue_options(seconds: int) -> list[str]:
    """sbatch options of a requeueable job: requeue allowed, the early signal to the batch shell."""
    return ["--requeue", f"--signal=B:{STOP_SIGNAL}@{seconds}"]


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
        "--open-mode=append",  # a requeued job (same id) adds to its logs
        *([f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []),
        *([f"--partition={c.slurm_partition}"] if c.slurm_partition else []),
        *([f"--account={c.slurm_account}"] if c.slurm_account else []),
        *(requeue_options(c.slurm_signal_seconds) if c.slurm_requeue else ["--no-requeue"]),
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


def write_sbatch(files: RunFiles, cfg: MoelabConfig) -> Path:
    """<run dir>/job.sbatch: the allocation, the ranks' environment and the srun step."""
    c, run_dir = cfg.cluster, files.run_dir
    hostfile, env = files.paths.slurm_hostfile, dict(files.env)
    if not cfg.train.threads_per_rank:  # the node's cores, not the submitting host's
        env.pop("OMP_NUM_THREADS", None)
    srun = [
        *("srun", "--ntasks-per-node=1", f"--nodes={c.nodes}", f"--ntasks={c.nodes}"),
        *("--kill-on-bad-exit=1", f"--output={files.paths.node_log('%n')}", "--open-mode=append"),
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
        *run_step(cfg, files, f"{shlex.join(srun)} bash -c {shlex.quote(node_step(cfg, run_dir))}"),
    ]
    if not c.wait:  # nobody follows the job: it ends its MLflow run itself
        lines.append(f"python -m {MODULE} end-run {shlex.quote(str(run_dir))} $code || true")
    files.paths.sbatch.write_text("\n".join([*lines, "exit $code"]) + "\n")
    return files.paths.sbatch


def run_step(cfg: MoelabConfig, files: RunFiles, step: str) -> list[str]:
    """The srun step, its exit code in $code. With cluster.slurm_requeue the step runs in the
    background so that the signal's trap runs at once (bash defers traps while a foreground
    command runs): it writes the run's stop request, the ranks finish their step and
    checkpoint, and the job requeues itself if the run is unfinished (`requeue` below)."""
    if not cfg.cluster.slurm_requeue:
        return ["set +e", step, "code=$?"]
    stop, run_dir = shlex.quote(str(files.paths.stop_request)), shlex.quote(str(files.run_dir))
    said = (
        f"moelab: job $SLURM_JOB_ID got {STOP_SIGNAL} (time limit or preemption ahead): the "
        "ranks stop after this step with a checkpoint, then the job requeues"
    )
    return [
        f"rm -f {stop}  # a stop request of the attempt before a requeue",
        "STOPPED=0 SIGNALED=0",
        f'on_stop() {{ STOPPED=1 SIGNALED=1; echo "{said}" >&2; touch {stop}; }}',
        f"trap on_stop {STOP_SIGNAL}",
        "set +e",
        f"{step} &",
        "pid=$!",
        "while :; do SIGNALED=0; wait $pid; code=$?; [ $SIGNALED = 1 ] || break; done",
        'if [ "$STOPPED" = 1 ] && [ "$code" = 0 ]; then',
        f"  python -m {MODULE} requeue {run_dir} && exit 0",
        "fi",
    ]
