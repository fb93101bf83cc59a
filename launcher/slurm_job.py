"""What a cluster=slurm job runs on its nodes (`launcher.backends.sbatch` renders the script).

    python -m launcher.slurm_job node <hostfile> deepspeed <args>   this node's deepspeed, with
                                                                    its hostfile and GPUs
    python -m launcher.slurm_job requeue <run dir>                  after Slurm's signal stopped
                                                                    the ranks: requeue the job
    python -m launcher.slurm_job end-run <run dir> <exit code>      end the MLflow run of a job
                                                                    nobody follows

A module of its own, outside `launcher.backends`: the nodes import only what these need.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from launcher.errors import ConfigError
from moelab import runref
from moelab.rundir import RunDir

MODULE = "launcher.slurm_job"


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


def requeue(run_dir: Path) -> int:
    """After the ranks stopped on the signal: `scontrol requeue` this job unless its run is
    finished (0 if requeued). The requeued job resumes from the checkpoint (train.resume)."""
    import subprocess

    from moelab.checkpoint import read_meta

    meta = read_meta(run_dir)
    if ended_status(run_dir, True) == "FINISHED":
        print("moelab: the run finished its steps; the job is not requeued", flush=True)
        return 1
    job_id = os.environ["SLURM_JOB_ID"]
    at = f"from step {meta['step']}" if meta else "from the start (no checkpoint yet)"
    print(f"moelab: requeueing job {job_id}; it resumes {at}", file=sys.stderr, flush=True)
    return subprocess.run(["scontrol", "requeue", job_id], timeout=60).returncode


def ended_status(run_dir: Path, ok: bool) -> str:
    """The MLflow status of a job that ended (`ok`: exit code 0): KILLED when it stopped before
    train.steps (train.stop_after, a stop request), else FINISHED or FAILED."""
    from moelab.checkpoint import read_meta
    from moelab.config import load_config

    if not ok:
        return "FAILED"
    meta, steps = read_meta(run_dir), load_config(RunDir(run_dir).config).train.steps
    return "KILLED" if meta is not None and meta["step"] < steps else "FINISHED"


def end_run(run_dir: Path, code: int) -> None:
    """The job's last step when nobody follows it: end its MLflow run by its exit code."""
    from launcher import tracking

    uri, run_id = runref.read(run_dir)
    tracking.end_run(uri, run_id, ended_status(run_dir, code == 0))


def main(argv: list[str]) -> None:
    if argv[1:2] == ["node"] and len(argv) > 3:
        exec_node(Path(argv[2]), argv[3:])
    if argv[1:2] == ["requeue"] and len(argv) == 3:
        sys.exit(requeue(Path(argv[2])))
    if argv[1:2] != ["end-run"] or len(argv) != 4:
        sys.exit(
            f"usage: python -m {MODULE} end-run <run dir> <exit code>\n"
            f"       python -m {MODULE} node <hostfile> deepspeed <args>\n"
            f"       python -m {MODULE} requeue <run dir>"
        )
    end_run(Path(argv[2]), int(argv[3]))


if __name__ == "__main__":
    main(sys.argv)
