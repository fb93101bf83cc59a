"""Preemption and resume, as ONE run dir interrupted three ways: `train.stop_after=3`, SIGTERM
to moelab-launch, kill -9 of one rank. Each resume must continue from the latest checkpoint
(not retrain from step 1), and the run must end exactly where the uninterrupted reference run
(`trained_moe`) ends. The four attempts are launched once per module (`interrupted_run`); each
test reads what one stage showed, so a failure names its stage."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import torch

from helpers import launcher_env
from moelab.checkpoint import read_meta
from trained_moe import (  # noqa: F401
    RUN,
    STEPS,
    TrainedMoE,
    _remove_shm_buffers,
    checkpoint_tensors,
    first_steps,
    loss_history,
    the_run,
    trained_moe,
)

RESUMED_TAG = "moelab.resumed_from_step"
STOPPED_TAG = "moelab.stopped_at_step"
WAIT_S = 300  # for a checkpoint to appear, then for an attempt to end


@dataclass(frozen=True)
class Attempt:
    """What one launch showed, snapshotted right after it (the next one rewrites the tags)."""

    returncode: int
    out: str  # the launcher's stdout and stderr
    status: str  # of the MLflow run
    tags: dict[str, str]
    first_steps: list[int]  # of all attempts so far (train.log)
    checkpoint: int | None  # step of the newest complete checkpoint
    train_log: str
    signalled: int | None  # the pid this test signalled (the launcher, a rank), None if none

    def tail(self) -> str:
        return self.out[-3000:]


@dataclass(frozen=True)
class InterruptedRun:
    workdir: Path
    run_dir: Path
    stop_after: Attempt  # `moelab-launch RUN train.stop_after=3`
    sigterm: Attempt  # `resume RUN_DIR train.stop_after=0`, SIGTERM after a new checkpoint
    kill9: Attempt  # `resume RUN_DIR`, kill -9 of rank 1 after a new checkpoint
    to_end: Attempt  # `resume RUN_DIR`


def start(workdir: Path, cache: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m launcher ARGS`, its output to a file (a pipe nobody reads could block it)."""
    with out.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=workdir,
            env=launcher_env(workdir, cache),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 the launcher and everything under it (a hung attempt, or one not acted on)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.kill()
    proc.wait()


def checkpoint_after(run_dir: Path, proc: subprocess.Popen[bytes], step: int) -> bool:
    """Wait until a checkpoint of a step after `step` is complete; False if the attempt ended
    (or WAIT_S passed) before."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        meta = read_meta(run_dir)
        if meta and meta["step"] > step:
            return True
        time.sleep(0.2)
    return False


def rank_process(launcher_pid: int, rank: int) -> psutil.Process | None:
    for p in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "moelab.train" in p.cmdline() and p.environ().get("RANK") == str(rank):
                return p
    return None


def sigterm_launcher(run_dir: Path, step: int, proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM to moelab-launch once a checkpoint after `step` is complete: its pid."""
    if not checkpoint_after(run_dir, proc, step):
        return None
    proc.send_signal(signal.SIGTERM)
    return proc.pid


def kill9_rank1(run_dir: Path, step: int, proc: subprocess.Popen[bytes]) -> int | None:
    """kill -9 of rank 1 once a checkpoint after `step` is complete: its pid."""
    rank1 = rank_process(proc.pid, 1) if checkpoint_after(run_dir, proc, step) else None
    if rank1 is None:
        return None
    os.kill(rank1.pid, signal.SIGKILL)
    return rank1.pid


class Launch(NamedTuple):
    returncode: int
    out: str
    signalled: int | None


def launch(
    workdir: Path,
    cache: Path,
    name: str,
    *args: str,
    act: Callable[[subprocess.Popen[bytes]], int | None] | None = None,
) -> Launch:
    """One attempt to its end; `act` acts on it while it runs and returns the pid it signalled,
    None if there was nothing to act on (the attempt is then killed)."""
    out = workdir / f"{name}.out"
    proc, signalled = start(workdir, cache, out, *args), None
    if act is not None and (signalled := act(proc)) is None:
        stop(proc)
    try:
        proc.wait(timeout=2 * WAIT_S)
    except subprocess.TimeoutExpired:
        stop(proc)
    text = out.read_text(errors="replace")
    if act is not None and signalled is None:
        text += "\n[test: nothing to act on; the attempt was killed]"
    return Launch(proc.returncode, text, signalled)


def snapshot(workdir: Path, run_dir: Path, launch: Launch) -> Attempt:
    """The launch and what it left in MLflow, train.log and the checkpoints."""
    client, run_id = the_run(workdir)
    run = client.get_run(run_id)
    meta = read_meta(run_dir)
    return Attempt(
        returncode=launch.returncode,
        out=launch.out,
        status=run.info.status,
        tags=dict(run.data.tags),
        first_steps=first_steps(run_dir),
        checkpoint=int(meta["step"]) if meta else None,
        train_log=(run_dir / "train.log").read_text(errors="replace"),
        signalled=launch.signalled,
    )


@pytest.fixture(scope="module")
def interrupted_run(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[InterruptedRun]:
    """ONE run dir through four attempts: stop_after=3, SIGTERM, kill -9 of rank 1, the end."""
    work, cache = tmp_path_factory.mktemp("interrupted"), shared_cache
    first = launch(work, cache, "stop_after", *RUN, "train.stop_after=3")
    runs = list((work / "runs" / "moelab").glob("*"))
    assert len(runs) == 1, f"{runs}: {first.out[-3000:]}"
    run_dir = runs[0]
    stop_after = snapshot(work, run_dir, first)
    resume = ("resume", str(run_dir))
    act = partial(sigterm_launcher, run_dir, 3)
    sigterm = snapshot(
        work, run_dir, launch(work, cache, "sigterm", *resume, "train.stop_after=0", act=act)
    )
    act = partial(kill9_rank1, run_dir, sigterm.checkpoint or 0)
    kill9 = snapshot(work, run_dir, launch(work, cache, "kill9", *resume, act=act))
    to_end = snapshot(work, run_dir, launch(work, cache, "to_end", *resume))
    yield InterruptedRun(work, run_dir, stop_after, sigterm, kill9, to_end)
    _remove_shm_buffers(run_dir)


def resumed_line(step: int) -> str:
    return f"moelab: resumed from checkpoint global_step{step} at step {step}; next step {step + 1}"


def assert_resumed_from(attempt: Attempt, step: int | None) -> None:
    """The attempt said it resumed from checkpoint `step`: the MLflow tag, train.log's line."""
    assert step is not None, "the attempt before left no checkpoint"
    assert attempt.tags.get(RESUMED_TAG) == str(step), (attempt.tags, attempt.tail())
    assert resumed_line(step) in attempt.train_log, attempt.tail()
    assert "moelab.resume_optimizer" not in attempt.tags, "the optimizer state was loaded"
    assert "optimizer restarted" not in attempt.train_log


@pytest.mark.slow
def test_stop_after_stops_with_a_checkpoint_then_resumes(interrupted_run: InterruptedRun) -> None:
    """`train.stop_after=3`: exit 0, KILLED at step 3 with its checkpoint; the resume starts
    at step 4."""
    a = interrupted_run.stop_after
    assert a.returncode == 0, a.tail()
    assert a.status == "KILLED" and a.tags.get(STOPPED_TAG) == "3", (a.status, a.tags)
    assert RESUMED_TAG not in a.tags  # a first attempt is no resume
    assert a.checkpoint == 3
    assert a.first_steps == [1]
    assert_resumed_from(interrupted_run.sigterm, 3)
    assert interrupted_run.sigterm.first_steps == [1, 4]


@pytest.mark.slow
def test_sigterm_stops_with_checkpoint_then_resumes(interrupted_run: InterruptedRun) -> None:
    """SIGTERM to moelab-launch after a new checkpoint: exit 128 + 15, KILLED at a step with its
    own checkpoint, a resume hint; the next attempt resumes from that step."""
    a = interrupted_run.sigterm
    assert a.signalled is not None, f"no checkpoint after step 3 appeared: {a.tail()}"
    assert a.returncode == 128 + signal.SIGTERM, a.tail()
    stopped = int(a.tags[STOPPED_TAG])
    print(f"SIGTERM after a checkpoint after step 3: stopped at step {stopped} of {STEPS}")
    assert a.status == "KILLED" and 5 <= stopped < STEPS, (a.status, stopped)
    assert a.checkpoint == stopped
    assert "resume with: moelab-launch resume" in a.out, a.tail()
    assert_resumed_from(interrupted_run.kill9, stopped)
    assert interrupted_run.kill9.first_steps == [1, 4, stopped + 1]


@pytest.mark.slow
def test_kill9_of_a_rank_fails_naming_it_then_resumes(interrupted_run: InterruptedRun) -> None:
    """kill -9 of rank 1 after a new checkpoint: a non-zero exit naming the dead rank, FAILED;
    the next attempt resumes from the newest checkpoint and finishes the run."""
    a, s = interrupted_run.kill9, interrupted_run.sigterm.checkpoint
    assert a.signalled is not None, f"no checkpoint after step {s} or no rank 1: {a.tail()}"
    assert a.returncode != 0, a.tail()
    assert f"rank 1 (pid {a.signalled}) exited first" in a.out, a.tail()
    assert a.status == "FAILED"
    assert a.checkpoint is not None and s is not None and s < a.checkpoint < STEPS
    print(f"kill -9 of rank 1: resuming from the step-{a.checkpoint} checkpoint")
    end = interrupted_run.to_end
    assert end.returncode == 0, end.tail()
    assert end.status == "FINISHED"
    assert end.checkpoint == STEPS
    assert_resumed_from(end, a.checkpoint)
    assert end.first_steps == [1, 4, s + 1, a.checkpoint + 1]


@pytest.mark.slow
def test_interrupted_run_ends_bit_exact_with_the_reference(
    interrupted_run: InterruptedRun,
    trained_moe: TrainedMoE,  # noqa: F811
) -> None:
    """Every step computed once from its checkpoint on and logged once (the steps kill -9
    lost are computed again, and the sink drops what it already spooled), losses and final
    tensors as in the uninterrupted run, and only the last keep_checkpoints=2 checkpoints kept."""
    run, s, c = (
        interrupted_run,
        interrupted_run.sigterm.checkpoint,
        interrupted_run.kill9.checkpoint,
    )
    assert s is not None and c is not None
    assert first_steps(run.run_dir) == [1, 4, s + 1, c + 1]
    assert first_steps(trained_moe.run_dir) == [1]
    history = loss_history(run.workdir)
    twice = sorted(step for step, n in Counter(step for step, _ in history).items() if n > 1)
    assert twice == [], f"steps logged twice (recomputed after the step-{c} checkpoint): {twice}"
    assert_same_as_reference(run.workdir, run.run_dir, trained_moe)
    kept = sorted(p.name for p in (run.run_dir / "checkpoints").glob("global_step*"))
    last = f"global_step{STEPS}"
    assert kept == [f"global_step{STEPS - 5}", last]
    assert (run.run_dir / "checkpoints" / "latest").read_text() == last


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
