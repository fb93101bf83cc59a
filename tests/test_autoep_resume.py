"""Checkpoints and resume of `model.moe.impl=autoep` runs (2 ranks, ep_size 2): an
uninterrupted ZeRO-2 reference; a ZeRO-3 run stopped at step 4 and resumed, which must end as
the reference does; a ZeRO-2 run stopped at step 4 and resumed at ep_size 1, whose weights
carry over (its step-5 loss is the reference's) and whose optimizer restarts, said so. The
launches run once per session (`trained_autoep.autoep_runs`)."""

from __future__ import annotations

import math

import pytest
from trained_autoep import STEPS, STOP, AutoEPRuns, autoep_runs  # noqa: F401

from moelab.checkpoint import read_meta
from moelab.train import OPTIMIZER_TAG, RESUMED_TAG
from trained_moe import first_steps


def resumed_line(step: int) -> str:
    return f"moelab: resumed from checkpoint global_step{step} at step {step}; next step {step + 1}"


def max_delta(got: dict[int, float], want: dict[int, float], steps: range) -> float:
    return max(abs(got[s] - want[s]) for s in steps)


@pytest.mark.slow
def test_zero3_resume_ends_as_the_uninterrupted_run(autoep_runs: AutoEPRuns) -> None:  # noqa: F811
    """ZeRO-3 with AutoEP: stopped at step 4 with its checkpoint, resumed at step 5; every
    step's loss as in the uninterrupted run (ZeRO-3 and ZeRO-2 compute the same steps here)."""
    run, ref = autoep_runs.zero3, autoep_runs.reference
    assert first_steps(run.run_dir) == [1, STOP + 1], run.tail()
    assert resumed_line(STOP) in (run.run_dir / "train.log").read_text(), run.tail()
    assert run.tags()[RESUMED_TAG] == str(STOP) and OPTIMIZER_TAG not in run.tags()
    meta = read_meta(run.run_dir)
    assert meta is not None and meta["step"] == STEPS and meta["moe_impl"] == "autoep"
    got, want = run.losses(), ref.losses()
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (got, want)
    delta = max_delta(got, want, range(1, STEPS + 1))
    print(f"ZeRO-3 stopped at {STOP} and resumed vs ZeRO-2 uninterrupted: max |dloss| {delta:.3g}")
    assert delta <= 1e-6, (got, want)


@pytest.mark.slow
def test_resume_at_another_ep_size_keeps_weights_and_restarts_the_optimizer(
    autoep_runs: AutoEPRuns,  # noqa: F811
) -> None:
    """Saved at ep_size 2, resumed at ep_size 1 on the same 2 ranks: the weights (experts one
    file each), the schedule, the step and the data position carry over, so step 5's loss
    (computed before its update) is the uninterrupted run's; the optimizer restarts, said in
    train.log and in an MLflow tag, and the run ends at ep_size 1."""
    run, ref = autoep_runs.new_ep, autoep_runs.reference
    tags, log = run.tags(), (run.run_dir / "train.log").read_text()
    assert first_steps(run.run_dir) == [1, STOP + 1], run.tail()
    assert tags[RESUMED_TAG] == str(STOP)
    assert tags[OPTIMIZER_TAG] == "restarted (ep_size 2 -> 1)", tags
    assert "moelab: optimizer restarted (ep_size 2 -> 1): the weights, schedule and step" in log
    meta = read_meta(run.run_dir)
    assert meta is not None and (meta["step"], meta["ep_size"]) == (STEPS, 1)
    got, want = run.losses(), ref.losses()
    assert max_delta(got, want, range(1, STOP + 1)) <= 1e-6  # the same run up to the stop
    first = abs(got[STOP + 1] - want[STOP + 1])
    later = max_delta(got, want, range(STOP + 2, STEPS + 1))
    print(f"ep_size 2 -> 1 at step {STOP}: |dloss| step {STOP + 1} {first:.3g}, after {later:.3g}")
    assert first <= 1e-5, (got, want)
    assert all(math.isfinite(got[s]) for s in range(STOP + 1, STEPS + 1)), got
