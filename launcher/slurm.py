"""cluster=slurm: render job.sbatch, check it against the cluster, submit, follow, cancel.

The job runs one `deepspeed --no_ssh --node_rank=$SLURM_NODEID` per node through `srun`,
after preparing the data on that node; each starts that node's ranks on the GPUs Slurm gave
the node (its CUDA_VISIBLE_DEVICES). DeepSpeed's own `--launcher=slurm` is not used: it runs
`srun python -u <script>` (no `--module`) and leaves RANK/MASTER_ADDR to MPI discovery.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn

from launcher.render import RunFiles, _train_args, write_scripts
from launcher.sweep import JobOutcome
from launcher.validate import ConfigError
from moelab import runref
from moelab.config import MoelabConfig

JOB_TAG = "slurm_job_id"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "OUT_OF_MEMORY", "DEADLINE")  # fmt: skip
POLL_S = 0.5
TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
OWN_OPTIONS = ("-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-o", "--output", "-e",
               "--error", "-p", "--partition", "-t", "--time", "-A", "--account")  # fmt: skip
"""sbatch options job.sbatch sets from cluster.* (an extra line must not contradict them)."""


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
    c = cfg.cluster
    lines = [
        f"--job-name=moelab-{cfg.model.name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",  # one deepspeed launcher per node; it starts the node's ranks
        f"--time={c.slurm_time}",
        f"--output={run_dir / 'slurm-%j.out'}",
        f"--error={run_dir / 'slurm-%j.err'}",
        *([f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []),
        *([f"--partition={c.slurm_partition}"] if c.slurm_partition else []),
        *([f"--account={c.slurm_account}"] if c.slurm_account else []),
        *c.slurm_extra,
    ]
    return [f"#SBATCH {line}" for line in lines]


def node_step(cfg: MoelabConfig, run_dir: Path) -> str:
    """What srun runs once per node: the data preparation, then deepspeed with its node rank
    and master from Slurm's env (`launcher.slurm node` adds the hostfile and this node's GPUs)."""
    c = cfg.cluster
    prepare = ["python", "-m", "moelab.datacache", "--config", str(run_dir / "config.yaml")]
    node = ["python", "-m", "launcher.slurm", "node", str(run_dir / "hostfile.slurm")]
    cmd = ["deepspeed", "--no_ssh", f"--master_port={c.master_port}"]
    return (
        f"{shlex.join(prepare)} && exec {shlex.join([*node, *cmd])} "
        f'--node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" '
        + shlex.join(_train_args(cfg, run_dir))
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
    own = hostfile.with_name(f"{hostfile.name}.node{node_rank}")
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
    hostfile, env = run_dir / "hostfile.slurm", dict(files.env)
    if not cfg.train.threads_per_rank:  # the node's cores, not the submitting host's
        env.pop("OMP_NUM_THREADS", None)
    srun = [
        *("srun", "--ntasks-per-node=1", f"--nodes={c.nodes}", f"--ntasks={c.nodes}"),
        *("--kill-on-bad-exit=1", f"--output={run_dir / 'train-node%n.log'}"),
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
            f"python -m launcher.slurm end-run {shlex.quote(str(run_dir))} $code || true",
            "exit $code",
        ]
    path = run_dir / "job.sbatch"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def partitions() -> dict[str, dict[str, str]]:
    """{name: scontrol's fields} of every partition of the cluster."""
    proc = _run("scontrol", "-o", "show", "partition")
    if proc.returncode != 0:
        raise ConfigError(f"cluster=slurm cannot reach the Slurm controller: {proc.stderr.strip()}")
    found = {}
    for line in proc.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        found[fields.get("PartitionName", "")] = fields
    return found


def check_cluster(cfg: MoelabConfig) -> None:
    """Before submission: sbatch on the PATH, the partition exists and can hold the job."""
    c = cfg.cluster
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "cluster=slurm needs Slurm's sbatch on the PATH; run on a Slurm login node, "
            "or add launch.dry_run=true to only render job.sbatch."
        )
    parts = partitions()
    default = [n for n, f in parts.items() if f.get("Default") == "YES"]
    name = c.slurm_partition or (default[0] if default else None)
    if name not in parts:
        raise ConfigError(
            f"cluster.slurm_partition={name!r} is not a partition of this cluster "
            f"(sinfo lists: {', '.join(sorted(parts))}); pick one of those."
        )
    assert name is not None
    total = int(parts[name].get("TotalNodes", "0") or 0)
    if c.nodes > total:
        raise ConfigError(
            f"cluster.nodes={c.nodes} exceeds the {total} nodes of partition {name}; "
            "lower cluster.nodes or pick a larger partition."
        )
    limit, asked = minutes(parts[name].get("MaxTime", "UNLIMITED")), minutes(c.slurm_time)
    if limit is not None and asked is not None and asked > limit:
        raise ConfigError(
            f"cluster.slurm_time={c.slurm_time} exceeds partition {name}'s limit of "
            f"{parts[name]['MaxTime']}; shorten it."
        )


def submit(script: Path) -> str:
    """`sbatch --parsable job.sbatch`; the job id."""
    proc = _run("sbatch", "--parsable", str(script))
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key=value pairs ({} once Slurm has forgotten the job)."""
    out = _run("scontrol", "-o", "show", "job", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def queued(job_id: str) -> bool:
    """Still in squeue (pending, running or completing)."""
    return bool(_run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip())


def exit_code(fields: dict[str, str]) -> int:
    """The job's exit status from ExitCode=status:signal (128+signal when killed)."""
    status, _, sig = fields.get("ExitCode", "1:0").partition(":")
    code = int(status) or (128 + int(sig or 0) if int(sig or 0) else 0)
    return code if code or fields.get("JobState") == "COMPLETED" else 1


class LogTail:
    """Copies new complete lines of a growing file to the terminal and to a mirror file."""

    def __init__(self, path: Path, mirror: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""
        self.mirror: IO[bytes] = mirror.open("wb")

    def pump(self, final: bool = False) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = self.rest + f.read()
        self.offset += len(data) - len(self.rest)
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.rest = data[cut:]
        if cut:
            sys.stdout.buffer.write(data[:cut])
            sys.stdout.flush()
            self.mirror.write(data[:cut])
            self.mirror.flush()


def ask_cancel(job_id: str) -> bool:
    """Ctrl-C while following: ask on a terminal (Ctrl-C again = yes), cancel elsewhere."""
    if not sys.stdin.isatty():
        return True
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        answer = input(f"\ncancel job {job_id}? [y/N] ").strip().lower()
    except KeyboardInterrupt:
        answer = "y"
    except EOFError:
        answer = "n"
    finally:
        signal.signal(signal.SIGINT, previous)
    if answer not in ("y", "yes"):
        print(f"moelab-launch: job {job_id} keeps running (scancel {job_id} stops it)", flush=True)
    return answer in ("y", "yes")


def follow(job_id: str, files: RunFiles) -> tuple[str, int, bool]:
    """Stream node 0's log until the job has left the queue: (state, exit code, cancelled)."""
    tail = LogTail(files.run_dir / "train-node0.log", files.log)
    signals: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)

    handlers = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    shown, cancelled, fields = "", False, {}
    try:
        while True:
            tail.pump()
            fields = job_fields(job_id)
            state = fields.get("JobState", "UNKNOWN")
            if state != shown:
                where = f" on {fields.get('NodeList')}" if state == "RUNNING" else ""
                print(f"moelab-launch: job {job_id} {state}{where}", flush=True)
                shown = state
            if signals and not cancelled:
                signum = signals[-1]
                signals.clear()
                if signum == signal.SIGTERM or ask_cancel(job_id):
                    cancelled = _run("scancel", job_id).returncode == 0
            if (state in ENDED or not fields) and not queued(job_id):
                break
            time.sleep(POLL_S)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        tail.pump(final=True)
        tail.mirror.close()
    return shown, exit_code(fields), cancelled


def show_errors(run_dir: Path, job_id: str, lines: int = 30) -> None:
    """After a failure: the end of every other node's log and of the batch script's stderr."""
    from launcher.sweep import log_tail

    logs = [*sorted(run_dir.glob("train-node*.log"))[1:], run_dir / f"slurm-{job_id}.err"]
    for path in logs:
        tail = log_tail(path, lines).strip()
        if tail:
            print(f"moelab-launch: {path.name} ends with:\n{tail}", file=sys.stderr, flush=True)


def status_of(state: str, code: int, cancelled: bool) -> str:
    if cancelled or state == "CANCELLED":
        return "KILLED"
    return "FINISHED" if code == 0 and state == "COMPLETED" else "FAILED"


def run(
    cfg: MoelabConfig, files: RunFiles, uri: str, run_id: str, job: JobOutcome | None = None
) -> int:
    """Submit job.sbatch into MLflow run `run_id`, follow it, end the run; the exit code."""
    from launcher import sweep, tracking

    status: str | None = "FAILED"
    code, job_id = 1, "?"
    try:
        write_scripts(files)  # command.sh: `bash command.sh` submits the job again
        job_id = submit(write_sbatch(files, cfg))
        tracking.mlflow_client(uri).set_tag(run_id, JOB_TAG, job_id)
        print(f"moelab-launch: run {run_id}, Slurm job {job_id}, in {files.run_dir}", flush=True)
        if not cfg.cluster.wait:
            print(
                f"moelab-launch: submitted; logs: {files.run_dir}/train-node0.log; "
                f"cancel: scancel {job_id}",
                flush=True,
            )
            status, code = None, 0  # the job ends its MLflow run itself
            return code
        state, code, cancelled = follow(job_id, files)
        status = status_of(state, code, cancelled)
        code = 128 + signal.SIGINT if cancelled else code
        if status == "FAILED":
            print(f"moelab-launch: job {job_id} {state} (exit code {code})", file=sys.stderr)
            show_errors(files.run_dir, job_id)
    except ConfigError as err:
        print(f"moelab-launch: error: {err}", file=sys.stderr, flush=True)
    finally:  # never leave the run RUNNING while nobody follows the job
        if status is not None:
            tracking.end_run(uri, run_id, status)
        if job is not None:
            job.status = status or "FINISHED"
            if status == "FAILED":
                job.message = f"Slurm job {job_id} failed (exit code {code}); see {files.log}"
                tracking.log_text(uri, run_id, sweep.log_tail(files.log), sweep.TAIL_ARTIFACT)
    return code


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
            "usage: python -m launcher.slurm end-run <run dir> <exit code>\n"
            "       python -m launcher.slurm node <hostfile> deepspeed <args>"
        )
    end_run(Path(sys.argv[2]), int(sys.argv[3]))
