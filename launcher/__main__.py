"""moelab-launch: compose, validate, render, create the MLflow run, run deepspeed.

moelab-launch model=tiny_moe_top2 zero=stage2 parallel=ep2
moelab-launch -m model=tiny_dense,tiny_moe_top1,tiny_moe_top2,tiny_arctic
moelab-launch ... launch.dry_run=true     # render and print, run nothing
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher import sweep
from launcher.compose import CONFIG_DIR, register_schema, to_schema
from launcher.hostfile import Resources
from launcher.launch import resolve_cluster
from launcher.render import render, write_scripts
from launcher.sweep import JobOutcome
from launcher.validate import ConfigError, validate
from moelab.config import MoelabConfig

register_schema()


def fail(message: str, code: int = 2) -> None:
    print(f"moelab-launch: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check(cfg: MoelabConfig) -> Resources | None:
    """Resolve the cluster's hosts (sets the world size), then validate; ConfigError if bad."""
    resources = resolve_cluster(cfg)
    validate(cfg)
    return resources


def launch(
    cfg: MoelabConfig,
    run_dir: Path,
    resources: Resources | None = None,
    job: JobOutcome | None = None,
) -> int:
    """Render, create the MLflow run, execute; returns the deepspeed exit code.

    For a sweep job (`job`) the run is a child of the sweep's parent run, carries the job's
    overrides as tags, gets the tail of train.log as an artifact if it fails, and its id
    and status are stored in `job`.
    """
    from launcher import tracking
    from launcher.launch import execute

    files = render(cfg, run_dir, resources)
    if cfg.launch.dry_run or cfg.cluster.backend == "slurm":  # slurm: submit job.sbatch
        print(f"run dir: {run_dir}")
        print("\n".join(shlex.join(c) for c in files.commands))
        if job is not None:
            job.status = "FINISHED"
        return 0
    uri = tracking.resolve_uri(cfg)
    if job is None:
        run_id = tracking.create_run(cfg, uri)
    else:
        run_id = tracking.create_run(
            cfg,
            uri,
            parent_run_id=sweep.parent_run_id(),
            tags=sweep.job_tags(job.num, job.overrides),
        )
        job.run_id, job.uri = run_id, uri
    files.env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id})
    code = 1
    try:
        write_scripts(files)
        print(f"moelab-launch: run {run_id} in {run_dir}", flush=True)
        code = execute(files)
    finally:  # never leave the run RUNNING
        status = "FINISHED" if code == 0 else "FAILED"
        try:
            if job is not None and code != 0:
                job.message = f"deepspeed exited with code {code}; see {files.log}"
                tail = sweep.log_tail(files.log)
                tracking.log_text(uri, run_id, tail, sweep.TAIL_ARTIFACT)
        finally:
            tracking.end_run(uri, run_id, status)
            if job is not None:
                job.status = status
    return code


def record_invalid(cfg: MoelabConfig, run_dir: Path, job: JobOutcome, message: str) -> None:
    """A sweep job whose config fails validation: a FAILED run holding the message."""
    from launcher import tracking

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
            resources = check(cfg)
        except ConfigError as err:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no run dir behind
            record_invalid(cfg, run_dir, job, str(err))
        else:
            launch(cfg, run_dir, resources, job)
    except Exception as err:  # anything unexpected fails this job only
        job.status = "FAILED"
        job.message = job.message or f"{type(err).__name__}: {err}"
        traceback.print_exc()
    if job.failed:
        print(f"moelab-launch: error: job {job.num} failed: {job.message}", file=sys.stderr)
    sweep.record(job)
    return job


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def app(dcfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        sweep_job(dcfg, run_dir)
        return
    try:
        cfg = to_schema(dcfg)
        resources = check(cfg)
    except ConfigError as err:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no run dir behind
        fail(str(err))
    code = launch(cfg, run_dir, resources)
    if code != 0:
        fail(f"deepspeed exited with code {code}; see {run_dir / 'train.log'}", code)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sweep.reset()
    try:
        app()
    finally:
        sweep.end_open_parent("FAILED")  # only if Hydra aborted the sweep mid-way
    # A sweep's jobs never raise (the sweep goes on); its failures set the exit status here.
    failures = sweep.failed()
    if failures:
        jobs = ", ".join(str(j.num) for j in failures)
        fail(f"{len(failures)} of {len(sweep.outcomes())} sweep jobs failed (job {jobs})", 1)


if __name__ == "__main__":
    main()
