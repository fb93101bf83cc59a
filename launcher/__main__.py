"""moelab-launch: compose, validate, render, create the MLflow run, run deepspeed.

moelab-launch model=tiny_moe_top2 zero=stage2 parallel=ep2
moelab-launch -m model=tiny_dense,tiny_moe_top1,tiny_moe_top2,tiny_arctic
moelab-launch ... launch.dry_run=true     # render and print, run nothing
moelab-launch resume <run dir> [train.stop_after=N]   # continue from its latest checkpoint
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher import sweep
from launcher.compose import CONFIG_DIR, compose_config, register_schema, to_schema
from launcher.hostfile import Resources
from launcher.launch import resolve_cluster
from launcher.render import RunFiles, render, write_scripts
from launcher.sweep import JobOutcome
from launcher.tracking import PendingRun
from launcher.validate import (
    ConfigError,
    validate,
    validate_counts,
    validate_reliability,
    validate_runs_root,
)
from moelab import hang, runref
from moelab.checkpoint import check_layout, read_meta
from moelab.config import MoelabConfig, load_config

register_schema()


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"moelab-launch: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check(cfg: MoelabConfig) -> Resources | None:
    """Resolve the cluster's hosts (sets the world size), then validate; ConfigError if bad."""
    resources = resolve_cluster(cfg)
    validate(cfg)
    if cfg.cluster.backend == "slurm" and not cfg.launch.dry_run:
        from launcher.slurm import check_cluster

        check_cluster(cfg)  # asks the Slurm controller
    return resources


def precheck(argv: list[str]) -> None:
    """Refuse a bad config before Hydra creates a directory: a run is checked in full, a sweep
    for launch.runs_root only (each job is checked on its own). What does not compose is left
    to Hydra, which reports it; so are Hydra's informational flags."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = get_args_parser().parse_args(argv)
    own_config = args.config_path or args.config_name or args.config_dir
    informational = args.help or args.hydra_help or args.cfg or args.info
    if own_config or informational or args.shell_completion or args.experimental_rerun:
        return
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        cfg = to_schema(compose_config([o for o in fixed if o is not None]))
    except (HydraException, OmegaConfBaseException):
        return
    try:
        if multirun:
            validate_runs_root(cfg)
        else:
            resolve_cluster(cfg)
            validate(cfg)
    except ConfigError as err:
        fail(str(err))


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

    files = render(cfg, run_dir, resources)
    if cfg.launch.dry_run:
        print(f"run dir: {run_dir}")
        print("\n".join(shlex.join(c) for c in files.commands))
        if job is not None:
            job.status = "FINISHED"
        return 0
    from launcher import launch as launch_mod

    uri = tracking.resolve_uri(cfg)
    launch_mod.aborted.clear()
    run = tracking.PendingRun(run_dir, uri, lambda: new_run(cfg, uri, job), launch_mod.abort)
    if job is not None:
        job.uri = uri
    if cfg.cluster.backend == "slurm":
        from launcher import slurm

        run_id = run.id()
        if run_id is None:
            fail(run.failure(), 1)
        if job is not None:
            job.run_id = run_id
        return slurm.run(cfg, files, uri, run_id, job)
    return execute_tracked(cfg, files, run, job)


def new_run(cfg: MoelabConfig, uri: str, job: JobOutcome | None) -> str:
    """Create the launch's MLflow run; a sweep job's is a child of the sweep's parent run and
    carries the job's overrides as tags."""
    from launcher import tracking

    if job is None:
        return tracking.create_run(cfg, uri)
    tags = sweep.job_tags(job.num, job.overrides)
    return tracking.create_run(cfg, uri, parent_run_id=sweep.parent_run_id(), tags=tags)


def run_status(cfg: MoelabConfig, run_dir: Path, code: int) -> str:
    """KILLED when stopped by a signal or train.stop_after, else FINISHED/FAILED by exit code."""
    from launcher import launch as launch_mod

    if launch_mod.received:
        return "KILLED"
    if code != 0:
        return "FAILED"
    meta = read_meta(run_dir)
    return "KILLED" if meta and meta["step"] < cfg.train.steps else "FINISHED"


def execute_tracked(
    cfg: MoelabConfig,
    files: RunFiles,
    run: PendingRun,
    job: JobOutcome | None = None,
    resume: bool = False,
) -> int:
    """Execute the run dir and end its MLflow run (KILLED, FAILED or FINISHED)."""
    from launcher import launch as launch_mod

    code, status, step = 1, "FAILED", "data preparation"
    try:
        if not resume:
            write_scripts(files)
        code, step = prepare_and_execute(files, resume)
        status = run_status(cfg, files.run_dir, code)
    finally:  # never leave the run RUNNING
        end_tracked(run, files, job, code, status, step)
    if run.id() is None:  # the ranks were stopped as soon as that was known
        if job is None:
            fail(run.failure(), 1)
        job.message = run.failure()
        return 1
    if status == "KILLED" or (code != 0 and read_meta(files.run_dir)):
        print(f"moelab-launch: resume with: moelab-launch resume {files.run_dir}", flush=True)
    return 128 + launch_mod.received[0] if launch_mod.received else code


def end_tracked(
    run: PendingRun, files: RunFiles, job: JobOutcome | None, code: int, status: str, step: str
) -> None:
    """End the MLflow run with `status` (a failed sweep job's also gets its log's tail)."""
    from launcher import tracking

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
    from launcher import launch as launch_mod

    code = prepare_data(files, append=resume)
    if code != 0:
        print("moelab-launch: data preparation failed; no rank was started", flush=True)
        return code, "data preparation"
    return launch_mod.execute(files, append=True), "deepspeed"


def prepare_data(files: RunFiles, append: bool) -> int:
    """Tokenize and cache the corpus on this host before any rank starts (`python -m
    moelab.datacache`, which returns at once when the cache's receipt holds; the ranks only load
    the cache), its output the start of train.log; the exit code, 128 + SIGINT on Ctrl-C."""
    from launcher import launch as launch_mod

    launch_mod.received.clear()
    config = str(files.run_dir / "config.yaml")
    command = [sys.executable, "-m", "moelab.datacache", "--config", config]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | files.env
    )
    try:
        launch_mod.stream(proc, files, append)
        return proc.wait()
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the preparation too
        proc.wait()
        launch_mod.received.append(signal.SIGINT)
        return 128 + signal.SIGINT


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
    started = time.time()
    code = launch(cfg, run_dir, resources)
    if 128 < code < 160:
        fail(f"stopped by signal {code - 128}; see {run_dir / 'train.log'}", code)
    if code != 0:
        log = run_dir / "train.log"
        fail(hang.describe(run_dir, started) or f"the run exited with code {code}; see {log}", code)


RESUMABLE = ("train.stop_after", "train.checkpoint_every", "train.keep_checkpoints")
"""Keys a resume may change: none of them changes what the checkpoint holds."""


def resume_config(run_dir: Path, overrides: list[str]) -> MoelabConfig:
    """The run dir's config.yaml with `overrides` (keys in RESUMABLE) applied, checked and
    saved (a refused override leaves the file as it was)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / "config.yaml"
    if not path.exists():
        fail(f"{run_dir} is not a moelab run dir (no config.yaml).")
    node = OmegaConf.load(path)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in RESUMABLE:
            fail(f"{key} cannot change on resume (only {', '.join(RESUMABLE)}); start a new run.")
        try:
            OmegaConf.update(node, key, yaml.safe_load(value))  # "4" -> 4
            OmegaConf.merge(OmegaConf.structured(MoelabConfig), node)  # type-checks
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            fail(f"{item} is not a valid value ({str(err).splitlines()[0]}).")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoelabConfig), node))
    assert isinstance(cfg, MoelabConfig)
    try:
        validate_counts(cfg)
        validate_reliability(cfg.train)
    except ConfigError as err:
        fail(str(err))
    OmegaConf.save(node, path)
    return load_config(path)


def resume(run_dir: Path, overrides: list[str]) -> int:
    """Re-execute the run dir's command.sh from its latest checkpoint, into the same run."""
    from launcher import tracking

    cfg = resume_config(run_dir, overrides)
    meta = read_meta(run_dir)
    if meta is None:
        fail(f"{run_dir / 'checkpoints'} holds no complete checkpoint; nothing to resume.")
    try:
        resolve_cluster(cfg)  # multi-host: the world size from today's hostfile
        check_layout(meta, cfg.world_size, cfg.ep_size)
    except (ConfigError, ValueError) as err:
        fail(str(err))
    uri, run_id = runref.read(run_dir)
    tracking.reopen_run(uri, run_id)
    run = tracking.PendingRun.existing(uri, run_id, run_dir)
    nodes = sorted(run_dir.glob("node_*.sh"))
    files = RunFiles(run_dir, commands=[["bash", str(p)] for p in [run_dir / "command.sh", *nodes]])
    print(f"moelab-launch: resuming from step {meta['step']}", flush=True)
    return execute_tracked(cfg, files, run, resume=True)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    if sys.argv[1:2] == ["resume"]:
        if len(sys.argv) < 3:
            fail("usage: moelab-launch resume <run dir> [train.stop_after=N ...]")
        started = time.time()
        code = resume(Path(sys.argv[2]).resolve(), sys.argv[3:])
        if code != 0:
            message = f"resumed run stopped with code {code}; see {sys.argv[2]}/train.log"
            fail(hang.describe(Path(sys.argv[2]).resolve(), started) or message, code)
        return
    precheck(sys.argv[1:])
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
