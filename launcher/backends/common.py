"""What the backends share: hosts from the hostfile, rendering once, the supervised run.

Every backend but slurm runs deepspeed under this launcher's supervisor
(`launcher.supervisor`): the data preparation, then command.sh, then the end of the MLflow
run. A resume re-runs a run dir's scripts the same way (`run_supervised`).
"""

from __future__ import annotations

from pathlib import Path

from launcher import beside, supervisor, sweep, tracking
from launcher.errors import ConfigError, fail
from launcher.hostfile import Resources, active_resources
from launcher.jobs import JobOutcome
from launcher.render import RunFiles, render_run_dir, write_scripts
from launcher.tracking import PendingRun
from moelab.checkpoint import read_meta
from moelab.config import MoelabConfig


class Supervised:
    """A backend whose deepspeed command runs on this host under the supervisor."""

    ranks_beside = False
    """Every rank runs on this host: the launcher sends rank 0's MLflow records (`beside`)."""

    def resolve_hosts(self, cfg: MoelabConfig) -> Resources | None:
        """The hosts and slots of the run (sets the world size); None on one machine."""
        return None

    def validate(self, cfg: MoelabConfig, planning: bool = False) -> None:
        """The backend's own config rules (ConfigError); `planning` describes a cluster."""

    def preflight(self, cfg: MoelabConfig) -> None:
        """Checks against the live cluster before anything is rendered (not on a dry run)."""

    def add_commands(self, cfg: MoelabConfig, files: RunFiles) -> None:
        """Fill in `files.commands` (and what else the backend's scripts need)."""
        raise NotImplementedError

    def render(self, cfg: MoelabConfig, run_dir: Path, resources: Resources | None) -> RunFiles:
        """Write the run dir, each file once."""
        files = render_run_dir(cfg, run_dir, resources)
        self.add_commands(cfg, files)
        write_scripts(files)
        return files

    def run(
        self, cfg: MoelabConfig, files: RunFiles, run: PendingRun, job: JobOutcome | None = None
    ) -> int:
        """Execute the rendered run dir into `run`; the exit code."""
        return run_supervised(cfg, files, run, job)

    def cancel(self, reason: str) -> None:
        """Stop the ranks now (or keep them from starting): the launch cannot succeed."""
        supervisor.abort(reason)


class MultiHost(Supervised):
    """A backend whose hosts come from cluster.hostfile."""

    def resolve_hosts(self, cfg: MoelabConfig) -> Resources | None:
        c = cfg.cluster
        if not c.hostfile:
            raise ConfigError(f"cluster={c.backend} needs cluster.hostfile=<path>.")
        resources = active_resources(c)
        c.nodes = len(resources.hosts)
        c.world_size = resources.world_size
        return resources


def run_status(cfg: MoelabConfig, run_dir: Path, code: int) -> str:
    """KILLED when stopped by a signal or train.stop_after, else FINISHED/FAILED by exit code."""
    if supervisor.received:
        return "KILLED"
    if code != 0:
        return "FAILED"
    meta = read_meta(run_dir)
    return "KILLED" if meta and meta["step"] < cfg.train.steps else "FINISHED"


def run_supervised(
    cfg: MoelabConfig,
    files: RunFiles,
    run: PendingRun,
    job: JobOutcome | None = None,
    resume: bool = False,
) -> int:
    """Execute the run dir and end its MLflow run (KILLED, FAILED or FINISHED)."""
    code, status, step = 1, "FAILED", "data preparation"
    replay = beside.start(cfg, run, files.run_dir)
    try:
        code, step = prepare_and_execute(files, resume)
        status = run_status(cfg, files.run_dir, code)
    finally:  # never leave the run RUNNING
        if replay is not None:
            replay.stop()
        end_tracked(run, files, job, code, status, step)
    if run.id() is None:  # the ranks were stopped as soon as that was known
        if job is None:
            fail(run.failure(), 1)
        job.message = run.failure()
        return 1
    if status == "KILLED" or (code != 0 and read_meta(files.run_dir)):
        print(f"moelab-launch: resume with: moelab-launch resume {files.run_dir}", flush=True)
    return 128 + supervisor.received[0] if supervisor.received else code


def end_tracked(
    run: PendingRun, files: RunFiles, job: JobOutcome | None, code: int, status: str, step: str
) -> None:
    """End the MLflow run with `status` (a failed sweep job's also gets its log's tail)."""
    run_id = run.id()
    if job is not None:
        job.run_id, job.status = run_id, status
        if code != 0:
            job.message = f"{step} exited with code {code}; see {files.log}"
    if run_id is None:
        return
    try:
        if job is not None and code != 0:
            tracking.log_text(run.uri, run_id, sweep.log_tail(files.log), sweep.TAIL_ARTIFACT)
    finally:
        tracking.end_run(run.uri, run_id, status)


def prepare_and_execute(files: RunFiles, resume: bool) -> tuple[int, str]:
    """The data preparation, then deepspeed: the exit code and the step that gave it."""
    code = supervisor.prepare_data(files, append=resume)
    if code != 0:
        print("moelab-launch: data preparation failed; no rank was started", flush=True)
        return code, "data preparation"
    return supervisor.supervise(files, append=True), "deepspeed"
