"""Preemption: SIGTERM to moelab-launch and kill -9 of one rank, each followed by a resume that
must continue from the checkpoint (not retrain from step 1) and end exactly where the
uninterrupted reference run (`trained_moe`) ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import launcher_env, run_launcher
from moelab.checkpoint import read_meta
from trained_moe import (  # noqa: F401
    RUN,
    STEPS,
    TrainedMoE,
    checkpoint_tensors,
    first_steps,
    loss_history,
    the_run,
    trained_moe,
)

RESUMED_TAG = "moelab.resumed_from_step"


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


def checkpoint_step(run_dir: Path) -> int:
    meta = read_meta(run_dir)
    assert meta is not None, f"no checkpoint in {run_dir}"
    return int(meta["step"])


def resume_to_end(workdir: Path, cache: Path, run_dir: Path) -> None:
    """Resume the run to its end: it must say it resumed from the latest checkpoint (MLflow
    tag, train.log) and compute only the steps after it."""
    ckpt = checkpoint_step(run_dir)
    proc = run_launcher(workdir, cache, "resume", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, run_id = the_run(workdir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert checkpoint_step(run_dir) == STEPS
    assert run.data.tags.get(RESUMED_TAG) == str(ckpt), run.data.tags
    line = f"moelab: resumed from checkpoint global_step{ckpt} at step {ckpt}; next step {ckpt + 1}"
    assert line in (run_dir / "train.log").read_text(errors="replace")
    # The first attempt started at step 1, the resumed one right after the checkpoint.
    assert first_steps(run_dir) == [1, ckpt + 1]


def assert_same_as_reference(workdir: Path, run_dir: Path, reference: TrainedMoE) -> None:
    """train/loss at every logged step and every tensor of the final checkpoint as in the
    uninterrupted run (the reference also evaluated half-way: evaluating changes nothing)."""
    want = dict(loss_history(reference.workdir))
    got = loss_history(workdir)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert sorted({s for s, _ in got}) == list(range(1, STEPS + 1)), "a step is missing"
    # Exactly 0 in practice: same ranks, same reduction order, same data and RNG streams.
    delta = max(abs(v - want[s]) for s, v in got)
    print(f"max |train/loss - reference| over {len(got)} logged values: {delta:.3g}")
    assert delta <= 1e-6, [(s, v, want[s]) for s, v in got if abs(v - want[s]) > 1e-6][:5]
    ref, ours = checkpoint_tensors(reference.run_dir, STEPS), checkpoint_tensors(run_dir, STEPS)
    assert ours.keys() == ref.keys() and any("optim_states" in k for k in ref), sorted(ref)[:5]
    differ = [k for k in ref if not torch.equal(ref[k], ours[k])]
    assert not differ, f"{len(differ)} of {len(ref)} final tensors differ: {differ[:5]}"


@pytest.mark.slow
def test_sigterm_stops_with_checkpoint_then_resumes(
    tmp_path: Path,
    shared_cache: Path,
    trained_moe: TrainedMoE,  # noqa: F811
) -> None:
    proc = start(tmp_path, shared_cache)
    run_dir = first_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    client, run_id = the_run(tmp_path)
    run = client.get_run(run_id)
    stopped = int(run.data.tags["moelab.stopped_at_step"])
    print(f"SIGTERM after the step-5 checkpoint: stopped at step {stopped} of {STEPS}")
    assert run.info.status == "KILLED" and 5 <= stopped < STEPS
    assert RESUMED_TAG not in run.data.tags  # a first attempt is no resume
    assert checkpoint_step(run_dir) == stopped
    assert "resume with: moelab-launch resume" in out
    resume_to_end(tmp_path, shared_cache, run_dir)
    steps = [s for s, _ in loss_history(tmp_path)]
    assert steps == list(range(1, STEPS + 1)), "no duplicate or gap"
    assert_same_as_reference(tmp_path, run_dir, trained_moe)


@pytest.mark.slow
def test_kill9_of_a_rank_fails_naming_it_then_resumes(
    tmp_path: Path,
    shared_cache: Path,
    trained_moe: TrainedMoE,  # noqa: F811
) -> None:
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
    print(f"kill -9 of rank 1: resuming from the step-{checkpoint_step(run_dir)} checkpoint")
    resume_to_end(tmp_path, shared_cache, run_dir)
    # Steps after the last checkpoint were lost and run again: they may be logged twice
    # (with the same values), none is missing.
    assert_same_as_reference(tmp_path, run_dir, trained_moe)
