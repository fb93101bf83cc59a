"""Preemption: SIGTERM to moelab-launch and kill -9 of one rank, each followed by a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import launcher_env, run_launcher
from moelab.checkpoint import read_meta

STEPS = 40
RUN = (
    "model=tiny_moe_top2",
    "zero=stage2",
    "parallel=ep2",
    "train=smoke",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=5",
)


def start(workdir: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *RUN],
        cwd=workdir,
        env=launcher_env(workdir, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def first_checkpoint(workdir: Path, proc: subprocess.Popen[str]) -> Path:
    """The run dir, once its first checkpoint is complete."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for run_dir in (workdir / "runs" / "moelab").glob("*"):
            if read_meta(run_dir):
                return run_dir
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint appeared: {proc.communicate()[0][-3000:]}")


def the_run(workdir: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    return client, run.info.run_id


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def resume_to_end(workdir: Path, cache: Path, run_dir: Path) -> tuple[MlflowClient, str]:
    proc = run_launcher(workdir, cache, "resume", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, run_id = the_run(workdir)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert read_meta(run_dir)["step"] == STEPS  # type: ignore[index]
    return client, run_id


@pytest.mark.slow
def test_sigterm_stops_with_checkpoint_then_resumes(tmp_path: Path, shared_cache: Path) -> None:
    proc = start(tmp_path, shared_cache)
    run_dir = first_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    client, run_id = the_run(tmp_path)
    run = client.get_run(run_id)
    stopped = int(run.data.tags["moelab.stopped_at_step"])
    assert run.info.status == "KILLED" and 5 <= stopped < STEPS
    assert read_meta(run_dir)["step"] == stopped  # type: ignore[index]
    assert "resume with: moelab-launch resume" in out
    client, run_id = resume_to_end(tmp_path, shared_cache, run_dir)
    assert loss_steps(client, run_id) == list(range(1, STEPS + 1)), "no duplicate or gap"


@pytest.mark.slow
def test_kill9_of_a_rank_fails_naming_it_then_resumes(tmp_path: Path, shared_cache: Path) -> None:
    proc = start(tmp_path, shared_cache)
    run_dir = first_checkpoint(tmp_path, proc)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "moelab.train" in p.cmdline() and p.environ().get("RANK") == "1"
    ]
    assert ranks, "rank 1 not found"
    os.kill(ranks[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"rank 1 (pid {ranks[0].pid}) exited first" in out, out[-3000:]
    client, run_id = the_run(tmp_path)
    assert client.get_run(run_id).info.status == "FAILED"
    client, run_id = resume_to_end(tmp_path, shared_cache, run_dir)
    # Steps after the last checkpoint were lost and run again: logged twice, none missing.
    assert sorted(set(loss_steps(client, run_id))) == list(range(1, STEPS + 1))
