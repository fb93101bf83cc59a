"""cluster=slurm: check the job against the cluster, render job.sbatch, submit, follow, cancel.

The job script is rendered by `launcher.backends.sbatch`; what it runs on the nodes besides
deepspeed is `launcher.slurm_job`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO

from launcher import sweep, tracking
from launcher.backends.sbatch import OWN_OPTIONS, minutes, option_name, write_sbatch
from launcher.errors import ConfigError, fail
from launcher.hostfile import Resources
from launcher.jobs import JobOutcome
from launcher.render import RunFiles, render_run_dir, write_scripts
from launcher.rules import require
from launcher.slurm_job import ended_status
from launcher.tracking import PendingRun
from moelab.checkpoint import read_meta
from moelab.config import MoelabConfig

JOB_TAG = "slurm_job_id"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "OUT_OF_MEMORY", "DEADLINE")  # fmt: skip
POLL_S = 0.5


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
    """Copies new complete lines of a growing file to the terminal and to a mirror file
    (`append`: only what is added from now on, the mirror appended to: a resumed run)."""

    def __init__(self, path: Path, mirror: Path, append: bool = False) -> None:
        self.offset = path.stat().st_size if append and path.exists() else 0
        self.path, self.rest = path, b""
        self.mirror: IO[bytes] = mirror.open("ab" if append else "wb")

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


def follow(job_id: str, files: RunFiles, append: bool = False) -> tuple[str, int, bool]:
    """Stream node 0's log until the job has left the queue (a requeued job stays in it):
    (state, exit code, cancelled)."""
    tail = LogTail(files.paths.node_log(0), files.log, append)
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


def show_errors(files: RunFiles, job_id: str, lines: int = 30) -> None:
    """After a failure: the end of every other node's log and of the batch script's stderr."""
    paths = files.paths
    nodes = range(1, len(list(paths.root.glob(paths.node_log("*").name))))
    for path in [*(paths.node_log(n) for n in nodes), paths.slurm_output(job_id, "err")]:
        tail = sweep.log_tail(path, lines).strip()
        if tail:
            print(f"moelab-launch: {path.name} ends with:\n{tail}", file=sys.stderr, flush=True)


def status_of(state: str, code: int, cancelled: bool, run_dir: Path) -> str:
    if cancelled or state == "CANCELLED":
        return "KILLED"
    return ended_status(run_dir, code == 0 and state == "COMPLETED")


class Slurm:
    """One batch job: `srun` starts one deepspeed per node (`launcher.backends.sbatch`)."""

    ranks_beside = False  # the job's ranks run on its nodes; rank 0 sends its own records

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.append = False

    def resolve_hosts(self, cfg: MoelabConfig) -> Resources | None:
        """None: the nodes are Slurm's to pick (cluster.nodes of them)."""
        return None

    def validate(self, cfg: MoelabConfig, planning: bool = False) -> None:
        c = cfg.cluster
        require(
            c.world_size in (0, c.nodes * c.nproc_per_node),
            f"cluster.world_size={c.world_size} is not cluster.nodes x ranks per node "
            f"({c.nodes} x {c.nproc_per_node}), the size the job starts; drop "
            "cluster.world_size.",
        )
        limit = minutes(c.slurm_time) or 0
        require(
            not c.slurm_requeue or 0 < c.slurm_signal_seconds < min(limit * 60, 65536),
            f"cluster.slurm_signal_seconds={c.slurm_signal_seconds} must be at least 1 and below "
            f"the time limit cluster.slurm_time={c.slurm_time} in seconds (and 65536); pick a "
            "smaller value.",
        )
        for line in c.slurm_extra:
            require(
                line.startswith("-") and "\n" not in line,
                f"cluster.slurm_extra entry {line!r} is not an sbatch option such as --qos=high.",
            )
            require(
                option_name(line) not in OWN_OPTIONS,
                f"cluster.slurm_extra entry {line!r} sets what moelab renders itself; use "
                "cluster.nodes, cluster.nproc_per_node, cluster.slurm_time/partition/account/"
                "requeue/signal_seconds.",
            )

    def preflight(self, cfg: MoelabConfig) -> None:
        check_cluster(cfg)  # asks the Slurm controller

    def render(self, cfg: MoelabConfig, run_dir: Path, resources: Resources | None) -> RunFiles:
        """config, ds_config, job.sbatch and command.sh (which submits the job again)."""
        files = render_run_dir(cfg, run_dir, resources)
        files.commands = [["sbatch", "--parsable", str(write_sbatch(files, cfg))]]
        write_scripts(files)
        return files

    def run(
        self, cfg: MoelabConfig, files: RunFiles, run: PendingRun, job: JobOutcome | None = None
    ) -> int:
        """Submit job.sbatch once the MLflow run exists, follow the job, end the run."""
        run_id = run.id()
        if run_id is None:
            fail(run.failure(), 1)
        if job is not None:
            job.run_id = run_id
        status: str | None = "FAILED"
        code = 1
        try:
            status, code = self.submit_and_follow(cfg, files, run.uri, run_id)
        except ConfigError as err:
            print(f"moelab-launch: error: {err}", file=sys.stderr, flush=True)
        finally:  # never leave the run RUNNING while nobody follows the job
            self.end(files, run.uri, run_id, job, status, code)
        return code

    def submit_and_follow(
        self, cfg: MoelabConfig, files: RunFiles, uri: str, run_id: str
    ) -> tuple[str | None, int]:
        """(the run's status, None when the job ends it itself; the exit code)."""
        self.job_id = job_id = submit(files.paths.sbatch)
        tracking.mlflow_client(uri).set_tag(run_id, JOB_TAG, job_id)
        print(f"moelab-launch: run {run_id}, Slurm job {job_id}, in {files.run_dir}", flush=True)
        if not cfg.cluster.wait:
            log = files.paths.node_log(0)
            print(f"moelab-launch: submitted; logs: {log}; cancel: scancel {job_id}", flush=True)
            return None, 0
        state, code, cancelled = follow(job_id, files, self.append)
        status = status_of(state, code, cancelled, files.run_dir)
        code = 128 + signal.SIGINT if cancelled else code
        if status == "FAILED":
            print(f"moelab-launch: job {job_id} {state} (exit code {code})", file=sys.stderr)
            show_errors(files, job_id)
        if status != "FINISHED" and read_meta(files.run_dir):
            print(f"moelab-launch: resume with: moelab-launch resume {files.run_dir}", flush=True)
        return status, code

    def resume(self, cfg: MoelabConfig, files: RunFiles, run: PendingRun) -> int:
        """Submit the run dir's job.sbatch again into the same MLflow run; the job resumes from
        the latest checkpoint (train.resume) and adds to the logs of the earlier jobs."""
        self.append = True
        return self.run(cfg, files, run)

    def end(
        self,
        files: RunFiles,
        uri: str,
        run_id: str,
        job: JobOutcome | None,
        status: str | None,
        code: int,
    ) -> None:
        """End the MLflow run (unless the job does) and record a sweep job's outcome."""
        if status is not None:
            tracking.end_run(uri, run_id, status)
        if job is not None:
            job.status = status or "FINISHED"
            if status == "FAILED":
                job.message = (
                    f"Slurm job {self.job_id or '?'} failed (exit code {code}); see {files.log}"
                )
                tracking.log_text(uri, run_id, sweep.log_tail(files.log), sweep.TAIL_ARTIFACT)

    def cancel(self, reason: str) -> None:
        """Cancel the submitted job (the run id is awaited before submitting: rarely needed)."""
        if self.job_id is not None:
            _run("scancel", self.job_id)
