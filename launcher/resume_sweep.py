"""moelab-launch resume <sweep dir>: resume every unfinished job of a sweep.

A sweep dir (Hydra's `hydra.sweep.dir`, holding multirun.yaml) holds one run dir per job. Each
job is read back from its run dir (config.yaml, the newest checkpoint, mlflow_run.json) and its
MLflow child run. A job is finished when its run ended FINISHED with no checkpoint short of
train.steps; finished jobs are left alone. The others run again one after another, each into its
own child run: from the newest checkpoint (`launcher.resume.resume`), or from step 1 when it has
none. The sweep's parent run is RUNNING meanwhile and ends FINISHED only if every job then
finished. Ctrl-C stops the current job with a checkpoint and starts no other. A job the sweep
never reached (expanded again from multirun.yaml) starts as Hydra's basic launcher would have
started it: composed from multirun.yaml with its overrides, its run dir in the sweep dir under its
job number, a child run of the parent.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher import jobs, supervisor, sweep, tracking
from launcher.backends import backend_for
from launcher.backends.common import run_supervised
from launcher.backends.slurm import Slurm
from launcher.compose import CONFIG_DIR, register_schema
from launcher.errors import fail
from launcher.jobs import JobOutcome
from launcher.render import RunFiles
from launcher.resume import EP_KEY, RESUMABLE, node_scripts, resume, resume_config
from launcher.start import new_run, sweep_job
from launcher.summary import format_table
from moelab.checkpoint import read_meta
from moelab.config import load_config
from moelab.rundir import RunDir

SWEEP_FILE = "multirun.yaml"
"""What Hydra writes at the top of every sweep dir."""
COLUMNS = ("job", "status", "checkpoint", "action", "run id", "overrides")


@dataclass
class Child:
    """One job of the sweep as its run dir and its MLflow run left it."""

    num: int
    overrides: list[str]
    run_dir: Path | None  # None: its config was refused and its run dir removed, or never started
    steps: int = 0
    step: int | None = None  # of the newest complete checkpoint
    run_id: str | None = None
    status: str = "-"  # of its MLflow run
    uri: str | None = None
    started: bool = True  # False: the sweep stopped before Hydra reached this job

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and (self.step is None or self.step >= self.steps)

    @property
    def todo(self) -> bool:
        """Whether the resume runs it: unfinished, and resumable or never started."""
        return not self.finished and (self.run_dir is not None or not self.started)

    @property
    def action(self) -> str:
        if not self.started:
            return "start (never reached)"
        if self.run_dir is None:
            return "cannot resume: config refused"
        if self.finished:
            return "left alone"
        if self.step is None:
            return "restart from step 1"
        return f"resume from step {self.step}"


def is_sweep_dir(path: Path) -> bool:
    """True for a sweep dir, False for a run dir; exits with one sentence for anything else."""
    if (path / SWEEP_FILE).is_file():
        return True
    if RunDir(path).config.is_file():
        return False
    fail(
        f"{path} is neither a run dir (holding config.yaml) nor a sweep dir (holding "
        f"{SWEEP_FILE}); pass the directory moelab-launch printed for the run or the sweep."
    )


def read_child(run_dir: Path) -> Child:
    """A job from its run dir: Hydra's record of it, its config, checkpoint and MLflow run."""
    hydra_dir = run_dir / ".hydra"
    num, overrides = -1, []
    if (hydra_dir / "hydra.yaml").is_file():
        num = int(yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["job"]["num"])
        overrides = [str(o) for o in yaml.safe_load((hydra_dir / "overrides.yaml").read_text())]
    meta = read_meta(run_dir)
    child = Child(num, overrides, run_dir, load_config(RunDir(run_dir).config).train.steps)
    child.step = None if meta is None else int(meta["step"])
    ref = RunDir(run_dir).run_ref
    run_ref = json.loads(ref.read_text()) if ref.is_file() else {}
    if "run_id" in run_ref:  # else the launch stopped before its MLflow run was created
        child.uri, child.run_id = str(run_ref["tracking_uri"]), str(run_ref["run_id"])
        child.status = str(tracking.mlflow_client(child.uri).get_run(child.run_id).info.status)
    return child


def parent_of(sweep_dir: Path, children: list[Child]) -> tuple[str, str]:
    """(tracking URI, id) of the sweep's parent run: a job's run names it, else its tag."""
    for child in children:
        if child.uri is not None and child.run_id is not None:
            tags = tracking.mlflow_client(child.uri).get_run(child.run_id).data.tags
            if tracking.PARENT_TAG in tags:
                return child.uri, str(tags[tracking.PARENT_TAG])
    assert children[0].run_dir is not None
    cfg = load_config(RunDir(children[0].run_dir).config)
    uri = tracking.absolute_uri(cfg.tracking.uri)
    client = tracking.mlflow_client(uri)
    runs = client.search_runs(
        [tracking.experiment_id(client, cfg.tracking.experiment)],
        f"tags.`moelab.sweep.dir` = '{sweep_dir}'",
    )
    if not runs:
        fail(f"no MLflow run at {uri} is the parent of {sweep_dir}; set tracking.uri to its store.")
    return uri, str(runs[0].info.run_id)


def refused_children(uri: str, parent_id: str, known: list[Child]) -> list[Child]:
    """Jobs whose config was refused: a FAILED child run, no run dir."""
    client = tracking.mlflow_client(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'")
    ids = {c.run_id for c in known}
    return [
        Child(
            int(r.data.tags.get("moelab.sweep.job", "-1")),
            r.data.tags.get("moelab.sweep.overrides", "").split(),
            None,
            run_id=r.info.run_id,
            status=r.info.status,
        )
        for r in runs
        if r.info.run_id not in ids and not Path(r.data.tags.get("run_dir", "")).is_dir()
    ]


def swept_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides by job number, expanded from multirun.yaml as Hydra's basic
    sweeper expands them; None for another sweeper or a sweep not parsed without its config
    (a glob choice), whose jobs are known only from what they left."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra = yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())["hydra"]
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith(BasicSweeper.__name__):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + hydra["overrides"]["task"])
        batches = BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size"))
    except HydraException:
        return None
    return [job for batch in batches for job in batch]


def with_unstarted(children: list[Child], jobs: list[list[str]] | None) -> list[Child]:
    """`children` plus a `started=False` child for each swept job that left nothing."""
    known = {c.num for c in children}
    missing = [
        Child(num, overrides, None, started=False)
        for num, overrides in enumerate(jobs or [])
        if num not in known
    ]
    return sorted(children + missing, key=lambda c: c.num)


def table(children: list[Child]) -> str:
    shown = sweep.varying_overrides([JobOutcome(c.num, c.overrides) for c in children])
    rows = [
        [
            str(c.num),
            c.status,
            f"{'-' if c.step is None else c.step}/{c.steps or '-'}",
            c.action,
            c.run_id or "-",
            shown[c.num],
        ]
        for c in children
    ]
    return format_table(rows, COLUMNS)


def restart(child: Child, overrides: list[str], uri: str) -> int:
    """A job with no checkpoint: its run dir's scripts again from step 1, into its MLflow run
    (a new child run of the sweep if it never got one)."""
    assert child.run_dir is not None
    cfg = resume_config(child.run_dir, overrides)
    backend = backend_for(cfg)
    backend.resolve_hosts(cfg)
    paths = RunDir(child.run_dir)
    if child.run_id is not None:
        tracking.reopen_run(uri, child.run_id)
        run = tracking.PendingRun.existing(uri, child.run_id, child.run_dir)
    else:
        job = JobOutcome(child.num, child.overrides)
        create = functools.partial(new_run, cfg, uri, job)
        run = tracking.PendingRun(child.run_dir, uri, create, backend.cancel, backend.ranks_beside)
    print(f"moelab-launch: job {child.num} has no checkpoint: it starts at step 1", flush=True)
    if isinstance(backend, Slurm):
        return backend.resume(cfg, RunFiles(paths, commands=[]), run)
    scripts = [paths.script, *node_scripts(paths)]
    files = RunFiles(paths, commands=[["bash", str(p)] for p in scripts])
    return run_supervised(cfg, files, run, resume=True)


def start_unstarted(child: Child, sweep_dir: Path, overrides: list[str]) -> int:
    """A job the sweep never reached, run as Hydra's basic launcher runs a job: composed from
    the sweep's own config (multirun.yaml) with the job's overrides, then the resume's; its run
    dir under the sweep dir with its job number; `sweep_job` as the task. 0 if it finished."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log, run_job, setup_globals
    from hydra.types import HydraContext
    from omegaconf import DictConfig, OmegaConf, open_dict

    master = OmegaConf.load(sweep_dir / SWEEP_FILE)
    assert isinstance(master, DictConfig)
    register_schema()
    setup_globals()
    jobs.reset()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_sweep_config(master, [*child.overrides, *overrides])
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = child.num
            cfg.hydra.sweep.dir = str(sweep_dir)
        context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))

        def task(config: DictConfig) -> JobOutcome:
            return sweep_job(config, Path(HydraConfig.get().runtime.output_dir))

        run_job(task, cfg, "hydra.sweep.dir", "hydra.sweep.subdir", context)
        configure_log(master.hydra.hydra_logging, master.hydra.verbose)
    (outcome,) = jobs.outcomes()  # sweep_job records one, whatever happened
    return 0 if not outcome.failed else 1


def run_child(child: Child, overrides: list[str], uri: str, sweep_dir: Path) -> int:
    """Start, resume or restart one job; its exit code (a refused resume is this job's
    failure)."""
    print(f"\nmoelab-launch: job {child.num}: {child.action} ({child.run_dir or sweep_dir})")
    sys.stdout.flush()
    supervisor.aborted.clear()
    try:
        if not child.started:
            return start_unstarted(child, sweep_dir, overrides)
        assert child.run_dir is not None
        if child.step is None:
            return restart(child, overrides, uri)
        return resume(child.run_dir, overrides)
    except SystemExit as err:  # `fail` printed why; the other jobs still run
        return err.code if isinstance(err.code, int) and err.code else 1


def check_overrides(overrides: list[str]) -> None:
    """Refuse a key no resume may change once, before any job runs."""
    for item in overrides:
        key = item.partition("=")[0]
        if key not in (*RESUMABLE, EP_KEY):
            fail(f"{key} cannot change on resume (only {', '.join(RESUMABLE)}); start a new run.")


def children_of(sweep_dir: Path) -> tuple[str, str, list[Child]]:
    """(tracking URI, parent run id, every job of the sweep by job number)."""
    found = [read_child(d) for d in sorted(sweep_dir.iterdir()) if RunDir(d).config.is_file()]
    if not found:
        fail(f"{sweep_dir} holds no job's run dir (config.yaml); no job of this sweep can resume.")
    uri, parent_id = parent_of(sweep_dir, found)
    found += refused_children(uri, parent_id, found)
    return uri, parent_id, with_unstarted(found, swept_jobs(sweep_dir))


def resume_sweep(sweep_dir: Path, overrides: list[str]) -> int:
    """Resume every unfinished job of the sweep in `sweep_dir` under its re-opened parent run;
    0 when every job has finished, else non-zero (a stopping signal's 128 + signum)."""
    check_overrides(overrides)
    uri, parent_id, children = children_of(sweep_dir)
    print(f"moelab-launch: sweep {sweep_dir} (parent run {parent_id})")
    print(table(children), flush=True)
    todo = [c for c in children if c.todo]
    if not todo:
        if all(c.finished for c in children):
            print("moelab-launch: every job of the sweep has finished; nothing to resume.")
        return report(children)
    tracking.reopen_run(uri, parent_id)
    os.environ[sweep.PARENT_ENV] = parent_id  # a job that never got a run gets a child run
    code, status = 0, "KILLED"
    try:
        code = run_all(todo, overrides, uri, sweep_dir)
        children = children_of(sweep_dir)[2]
        status = "FINISHED" if all(c.finished for c in children) else "FAILED"
        status = "KILLED" if 128 < code < 160 else status
    finally:
        os.environ.pop(sweep.PARENT_ENV, None)
        tracking.end_run(uri, parent_id, status)
    print(f"\nmoelab-launch: sweep {status} (parent run {parent_id})")
    outcomes = [JobOutcome(c.num, c.overrides, c.status, c.run_id, uri=uri) for c in children]
    print(format_table(sweep.summary_rows(outcomes), sweep.SUMMARY_COLUMNS), flush=True)
    return code if 128 < code < 160 else report(children)


def run_all(todo: list[Child], overrides: list[str], uri: str, sweep_dir: Path) -> int:
    """Each unfinished job in turn; stops at the first a signal stopped (its exit code)."""
    for child in todo:
        code = run_child(child, overrides, uri, sweep_dir)
        if 128 < code < 160 or supervisor.received:
            print("moelab-launch: stopped; the jobs after this one were not started", flush=True)
            return code if 128 < code < 160 else 128 + supervisor.received[0]
    return 0


def report(children: list[Child]) -> int:
    """0 when every job finished, else 1 with one line naming the jobs that did not."""
    left = [c for c in children if not c.finished]
    if not left:
        return 0
    nums = ", ".join(str(c.num) for c in left)
    print(
        f"moelab-launch: error: {len(left)} of {len(children)} sweep jobs did not finish "
        f"(job {nums}); see the table above.",
        file=sys.stderr,
    )
    return 1
