"""Start one run: check its config, render its dir with the backend, create its MLflow run, run
the backend; and one job of a sweep, which never raises."""

from __future__ import annotations

import functools
import shlex
import shutil
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launcher import jobs, supervisor, sweep, tracking
from launcher.backends import Backend, backend_for
from launcher.compose import to_schema
from launcher.errors import ConfigError
from launcher.hostfile import Resources
from launcher.jobs import JobOutcome
from launcher.validate import validate
from moelab.config import MoelabConfig


def check(cfg: MoelabConfig) -> tuple[Backend, Resources | None]:
    """The backend and the hosts it resolved (sets the world size), once the config passed
    validation (and, unless a dry run, the live cluster's checks); ConfigError if not."""
    backend = backend_for(cfg)
    resources = backend.resolve_hosts(cfg)
    validate(cfg)
    if not cfg.launch.dry_run:
        backend.preflight(cfg)
    return backend, resources


def start_run(
    cfg: MoelabConfig,
    backend: Backend,
    run_dir: Path,
    resources: Resources | None = None,
    job: JobOutcome | None = None,
) -> int:
    """Render, create the MLflow run, execute; returns the exit code.

    For a sweep job (`job`) the run is a child of the sweep's parent run, carries the job's
    overrides as tags, gets the tail of train.log as an artifact if it fails, and its id
    and status are stored in `job`.
    """
    files = backend.render(cfg, run_dir, resources)
    if cfg.launch.dry_run:
        print(f"run dir: {run_dir}")
        print("\n".join(shlex.join(c) for c in files.commands))
        if job is not None:
            job.status = "FINISHED"
        return 0
    uri = tracking.resolve_uri(cfg)
    supervisor.aborted.clear()
    create = functools.partial(new_run, cfg, uri, job)
    run = tracking.PendingRun(run_dir, uri, create, backend.cancel, backend.ranks_beside)
    if job is not None:
        job.uri = uri
    return backend.run(cfg, files, run, job)


def new_run(cfg: MoelabConfig, uri: str, job: JobOutcome | None) -> str:
    """Create the launch's MLflow run; a sweep job's is a child of the sweep's parent run and
    carries the job's overrides as tags."""
    if job is None:
        return tracking.create_run(cfg, uri)
    tags = sweep.job_tags(job.num, job.overrides)
    return tracking.create_run(cfg, uri, parent_run_id=sweep.parent_run_id(), tags=tags)


def record_invalid(cfg: MoelabConfig, run_dir: Path, job: JobOutcome, message: str) -> None:
    """A sweep job whose config fails validation: a FAILED run holding the message."""
    uri = tracking.resolve_uri(cfg)
    job.uri, job.message = uri, message
    job.run_id = tracking.create_run(
        cfg,
        uri,
        parent_run_id=sweep.parent_run_id(),
        tags=sweep.job_tags(job.num, job.overrides),
        run_name=run_dir.name,
    )
    tracking.log_text(uri, job.run_id, message + "\n", sweep.TAIL_ARTIFACT)
    tracking.end_run(uri, job.run_id, "FAILED")


def sweep_job(dcfg: DictConfig, run_dir: Path) -> JobOutcome:
    """One job of a sweep: never raises, so Hydra goes on with the next job."""
    hc = HydraConfig.get()
    job = JobOutcome(num=int(hc.job.num), overrides=[str(o) for o in hc.overrides.task])
    try:
        cfg = to_schema(dcfg)
        try:
            backend, resources = check(cfg)
        except ConfigError as err:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no run dir behind
            record_invalid(cfg, run_dir, job, str(err))
        else:
            start_run(cfg, backend, run_dir, resources, job)
    except Exception as err:  # anything unexpected fails this job only
        job.status = "FAILED"
        job.message = job.message or f"{type(err).__name__}: {err}"
        traceback.print_exc()
    if job.failed:
        print(f"moelab-launch: error: job {job.num} failed: {job.message}", file=sys.stderr)
    jobs.record(job)
    return job
