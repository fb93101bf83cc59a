"""`moelab-launch resume <sweep dir>`: every unfinished job of a sweep resumes into its own child
run under the re-opened parent; finished jobs are left alone. ONE real 2-job sweep (job 0 runs
to the end, job 1 stops at step 2 with `train.stop_after`), then two resumes of its sweep dir,
launched once per module (`resumed_sweep`); each test reads what one stage left. A copy of the
finished sweep dir with a third job the sweep never reached: its resume starts that job."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import run_launcher
from launcher.resume_sweep import (
    Child,
    is_sweep_dir,
    report,
    resume_sweep,
    swept_jobs,
    with_unstarted,
)
from moelab.checkpoint import read_meta

STEPS = 4
SWEEP = (
    "-m",
    "model=tiny_dense",
    "zero=stage0",  # ZeRO-0's resume; the preemption, Slurm and AutoEP tests resume ZeRO-2 and 3
    "train=smoke",
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.stop_after=0,2",
)


@dataclass(frozen=True)
class Job:
    """One job as a stage left it: its MLflow run, metrics, checkpoint files and log."""

    run_id: str
    status: str
    end_time: int
    tags: dict[str, str]
    metrics: dict[str, list[tuple[int, float, int]]]  # key -> (step, value, timestamp)
    checkpoint: int | None
    files: dict[str, int]  # checkpoint file -> mtime_ns
    log: str


@dataclass(frozen=True)
class Stage:
    proc: subprocess.CompletedProcess[str]
    parent: Any  # the parent run
    jobs: dict[int, Job]
    children: int  # child runs under the parent


@dataclass(frozen=True)
class ResumedSweep:
    sweep_dir: Path
    swept: Stage  # `moelab-launch -m ...`
    resumed: Stage  # `resume <sweep dir>`
    again: Stage  # `resume <sweep dir>` once more

    def out(self, stage: Stage) -> str:
        return (stage.proc.stdout + stage.proc.stderr)[-4000:]


def job(client: MlflowClient, run: Any, run_dir: Path) -> Job:
    ckpts, run_id = run_dir / "checkpoints", run.info.run_id
    meta = read_meta(run_dir)
    history = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    return Job(
        run_id,
        run.info.status,
        run.info.end_time,
        dict(run.data.tags),
        {k: [(m.step, m.value, m.timestamp) for m in h] for k, h in history.items()},
        None if meta is None else int(meta["step"]),
        {str(p.relative_to(ckpts)): p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()},
        (run_dir / "train.log").read_text(),
    )


def stage(work: Path, proc: subprocess.CompletedProcess[str]) -> Stage:
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("moelab.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    jobs = {
        int(r.data.tags["moelab.sweep.job"]): job(client, r, Path(r.data.tags["run_dir"]))
        for r in children
    }
    return Stage(proc, parent, jobs, len(children))


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> ResumedSweep:
    work = tmp_path_factory.mktemp("resume-sweep")
    swept = stage(work, run_launcher(work, shared_cache, *SWEEP))
    (sweep_dir,) = (work / "runs" / "moelab").iterdir()
    resume = ("resume", str(sweep_dir))
    resumed = stage(work, run_launcher(work, shared_cache, *resume))
    again = stage(work, run_launcher(work, shared_cache, *resume))
    return ResumedSweep(sweep_dir, swept, resumed, again)


def train_steps(j: Job) -> list[int]:
    return [step for step, _, _ in j.metrics["train/loss"]]


# --- slow: one real sweep of two 2-rank jobs, then two resumes ---------------------------------


@pytest.mark.slow
def test_the_sweep_left_one_job_finished_and_one_stopped(resumed_sweep: ResumedSweep) -> None:
    swept = resumed_sweep.swept
    assert swept.proc.returncode == 1, resumed_sweep.out(swept)
    assert swept.parent.info.status == "FAILED"
    assert (swept.jobs[0].status, swept.jobs[0].checkpoint) == ("FINISHED", STEPS)
    assert (swept.jobs[1].status, swept.jobs[1].checkpoint) == ("KILLED", 2)
    assert train_steps(swept.jobs[1]) == [1, 2]


@pytest.mark.slow
def test_the_swept_jobs_are_numbered_as_hydra_ran_them(resumed_sweep: ResumedSweep) -> None:
    """multirun.yaml expanded again gives each job's overrides as Hydra recorded them in the
    job's run dir, under the job's number: what a resume lists a job it never reached by."""
    recorded = {}
    for hydra_dir in resumed_sweep.sweep_dir.glob("*/.hydra"):
        num = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["job"]["num"]
        recorded[int(num)] = yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
    assert swept_jobs(resumed_sweep.sweep_dir) == [recorded[0], recorded[1]]
    assert [o for o in recorded[1] if o.startswith("train.stop_after")] == ["train.stop_after=2"]


@pytest.mark.slow
def test_a_job_the_sweep_never_reached_starts_as_hydra_would_have_started_it(
    resumed_sweep: ResumedSweep, shared_cache: Path, tmp_path: Path
) -> None:
    """The finished sweep's dir, copied, with a third `train.stop_after` value (0: no stop) in
    its multirun.yaml: job 2 left nothing, as when a sweep is stopped before its last job. The
    resume leaves jobs 0 and 1 alone and starts job 2 as Hydra's launcher would have: its run
    dir in the sweep dir under its number with Hydra's record of it, a child run of the same
    parent run, every step run; then every job has finished and so has the parent."""
    copy = tmp_path / resumed_sweep.sweep_dir.name
    shutil.copytree(resumed_sweep.sweep_dir, copy)
    multirun = copy / "multirun.yaml"
    multirun.write_text(
        multirun.read_text().replace("train.stop_after=0,2", "train.stop_after=0,2,0")
    )
    work = resumed_sweep.sweep_dir.parents[2]  # the sweep's MLflow store
    proc = run_launcher(work, shared_cache, "resume", str(copy))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("2 "))
    assert row.split()[:6] == ["2", "-", "-/-", "start", "(never", "reached)"], row
    assert f"moelab-launch: job 2: start (never reached) ({copy})" in out
    assert "moelab-launch: job 0:" not in out and "moelab-launch: job 1:" not in out
    (run_dir,) = [d for d in copy.iterdir() if d.name.endswith("-2")]
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert (hydra["job"]["num"], hydra["mode"]) == (2, "MULTIRUN")
    assert hydra["runtime"]["output_dir"] == str(run_dir)
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert overrides == swept_jobs(copy)[2] == [*SWEEP[1:-1], "train.stop_after=0"]
    after = stage(work, proc)
    started = after.jobs[2]
    assert started.tags["mlflow.parentRunId"] == after.parent.info.run_id
    assert after.parent.info.run_id == resumed_sweep.swept.parent.info.run_id
    assert Path(started.tags["run_dir"]) == run_dir
    assert started.tags["moelab.sweep.overrides"] == " ".join(overrides)
    assert (started.status, started.checkpoint, train_steps(started)) == (
        "FINISHED",
        STEPS,
        list(range(1, STEPS + 1)),
    )
    assert (after.children, after.parent.info.status) == (3, "FINISHED")


@pytest.mark.slow
def test_the_table_comes_first_and_names_each_action(resumed_sweep: ResumedSweep) -> None:
    lines = resumed_sweep.resumed.proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("job  status"))
    first_run = next(i for i, line in enumerate(lines) if line.startswith("moelab-launch: job 1"))
    rows = lines[header + 2 : header + 4]
    assert header < first_run, resumed_sweep.out(resumed_sweep.resumed)
    job0, job1 = resumed_sweep.swept.jobs[0], resumed_sweep.swept.jobs[1]
    assert rows[0].split()[:5] == ["0", "FINISHED", f"{STEPS}/{STEPS}", "left", "alone"]
    assert job0.run_id in rows[0]
    assert rows[1].split()[:7] == ["1", "KILLED", f"2/{STEPS}", "resume", "from", "step", "2"]
    assert job1.run_id in rows[1]


@pytest.mark.slow
def test_the_finished_job_is_left_alone(resumed_sweep: ResumedSweep) -> None:
    """Same MLflow run, status, end time, metric history, checkpoint files and log."""
    before = resumed_sweep.swept.jobs[0]
    assert resumed_sweep.resumed.jobs[0] == before
    assert resumed_sweep.again.jobs[0] == before


@pytest.mark.slow
def test_the_stopped_job_ends_in_its_own_run(resumed_sweep: ResumedSweep) -> None:
    """From its checkpoint at step 2 to the end, into the same child run: steps 1-4 once each."""
    resumed = resumed_sweep.resumed
    assert resumed.proc.returncode == 0, resumed_sweep.out(resumed)
    before, after = resumed_sweep.swept.jobs[1], resumed.jobs[1]
    assert after.run_id == before.run_id and resumed.children == 2, "no new child run"
    assert (after.status, after.checkpoint) == ("FINISHED", STEPS)
    assert train_steps(after) == [1, 2, 3, 4]
    assert after.metrics["train/loss"][:2] == before.metrics["train/loss"]
    # Job 0 is the same run without the stop: the resume is exact.
    uninterrupted = {step: v for step, v, _ in resumed_sweep.swept.jobs[0].metrics["train/loss"]}
    worst = max(abs(v - uninterrupted[step]) for step, v, _ in after.metrics["train/loss"])
    assert worst <= 1e-6, (after.metrics["train/loss"], uninterrupted)
    assert after.tags["moelab.resumed_from_step"] == "2"
    assert "moelab: step 3 is the first this attempt computed" in after.log


@pytest.mark.slow
def test_the_parent_run_ends_finished(resumed_sweep: ResumedSweep) -> None:
    parent, before = resumed_sweep.resumed.parent, resumed_sweep.swept.parent
    assert parent.info.run_id == before.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time > before.info.end_time
    assert "sweep FINISHED" in resumed_sweep.resumed.proc.stdout


@pytest.mark.slow
def test_a_second_resume_has_nothing_to_do(resumed_sweep: ResumedSweep) -> None:
    again, resumed = resumed_sweep.again, resumed_sweep.resumed
    assert again.proc.returncode == 0, resumed_sweep.out(again)
    assert "every job of the sweep has finished; nothing to resume." in again.proc.stdout
    assert "deepspeed" not in again.proc.stdout + again.proc.stderr
    assert again.jobs == resumed.jobs
    assert (again.parent.info.status, again.parent.info.end_time) == (
        "FINISHED",
        resumed.parent.info.end_time,
    )


# --- fast: no process is started ----------------------------------------------------------------


def test_sweep_and_run_dirs_are_told_apart(tmp_path: Path, capsys: Any) -> None:
    sweep_dir, run_dir, other = tmp_path / "sweep", tmp_path / "run", tmp_path / "other"
    for d in (sweep_dir, run_dir, other):
        d.mkdir()
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (run_dir / "config.yaml").write_text("model: {}\n")
    assert is_sweep_dir(sweep_dir) is True
    assert is_sweep_dir(run_dir) is False
    with pytest.raises(SystemExit) as exc:
        is_sweep_dir(other)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"moelab-launch: error: {other} is neither a run dir (holding config.yaml) nor a sweep "
        "dir (holding multirun.yaml); pass the directory moelab-launch printed for the run or "
        "the sweep.\n"
    )


def test_a_key_no_resume_may_change_is_refused_first(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(SystemExit):
        resume_sweep(tmp_path, ["train.stop_after=3", "model=tiny_moe_top1"])
    assert "model cannot change on resume" in capsys.readouterr().err


def test_a_sweep_dir_without_run_dirs_is_refused(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # where a default MLflow store would appear
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(SystemExit):
        resume_sweep(tmp_path, [])
    assert f"{tmp_path} holds no job's run dir (config.yaml)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "multirun.yaml"], "no MLflow store created"


@pytest.mark.parametrize(
    ("status", "step", "run_dir", "action"),
    [
        ("FINISHED", 4, "run", "left alone"),
        ("FINISHED", None, "run", "left alone"),  # train.checkpoint_every=0
        ("FINISHED", 2, "run", "resume from step 2"),  # ended FINISHED short of train.steps
        ("KILLED", 2, "run", "resume from step 2"),
        ("FAILED", 4, "run", "resume from step 4"),  # failed after its last checkpoint
        ("RUNNING", 2, "run", "resume from step 2"),  # its launcher died
        ("FAILED", None, "run", "restart from step 1"),
        ("-", None, "run", "restart from step 1"),  # never got an MLflow run
        ("FAILED", None, None, "cannot resume: config refused"),
    ],
)
def test_the_action_of_each_job(
    status: str, step: int | None, run_dir: str | None, action: str, tmp_path: Path
) -> None:
    child = Child(0, [], tmp_path if run_dir else None, steps=4, step=step, status=status)
    assert child.action == action
    assert child.finished == (action == "left alone")


def sweep_file(tmp_path: Path, sweeper: dict[str, Any], task: list[str]) -> Path:
    """A sweep dir whose multirun.yaml holds what Hydra saves of the sweeper and overrides."""
    text = yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})
    (tmp_path / "multirun.yaml").write_text(text)
    return tmp_path


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def test_swept_jobs_expand_params_then_overrides_in_batches(tmp_path: Path) -> None:
    """The sweeper's params come before the command line's overrides; jobs are numbered
    across batches."""
    sweeper = {"_target_": BASIC, "max_batch_size": 1, "params": {"train.seed": "1,2"}}
    sweep_dir = sweep_file(tmp_path, sweeper, ["model=tiny_dense,tiny_moe_top1", "train.steps=4"])
    assert swept_jobs(sweep_dir) == [
        ["train.seed=1", "model=tiny_dense", "train.steps=4"],
        ["train.seed=1", "model=tiny_moe_top1", "train.steps=4"],
        ["train.seed=2", "model=tiny_dense", "train.steps=4"],
        ["train.seed=2", "model=tiny_moe_top1", "train.steps=4"],
    ]


@pytest.mark.parametrize(
    ("target", "task"),
    [
        ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", ["model=tiny_dense"]),
        (BASIC, ["model=glob(tiny_*)"]),  # needs the config's choices to expand
    ],
)
def test_swept_jobs_are_unknown_for_other_sweepers_and_globs(
    tmp_path: Path, target: str, task: list[str]
) -> None:
    assert swept_jobs(sweep_file(tmp_path, {"_target_": target}, task)) is None


def test_a_job_the_sweep_never_reached_is_listed_and_fails_the_resume(
    tmp_path: Path, capsys: Any
) -> None:
    """Job 1 left nothing (the sweep was stopped in job 0): it is listed to start; a job
    whose config was refused is not run again; before the resume, not every job finished."""
    jobs = [["model=tiny_dense"], ["model=tiny_moe_top1"], ["model=tiny_arctic"]]
    done = Child(0, jobs[0], tmp_path, steps=4, step=4, status="FINISHED")
    refused = Child(2, jobs[2], None, status="FAILED")
    children = with_unstarted([refused, done], jobs)
    assert [(c.num, c.started) for c in children] == [(0, True), (1, False), (2, True)]
    never = children[1]
    assert (never.overrides, never.run_dir, never.finished) == (jobs[1], None, False)
    assert never.action == "start (never reached)"
    assert [c.todo for c in children] == [False, True, False]
    assert with_unstarted([done], None) == [done]  # another sweeper: only what jobs left
    assert report(children) == 1
    assert "2 of 3 sweep jobs did not finish (job 1, 2)" in capsys.readouterr().err
