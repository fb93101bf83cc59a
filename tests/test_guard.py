"""Numerical faults: a clear error naming the step, or a counted, exact skip."""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import run_launcher, run_launchers
from moelab.checkpoint import read_meta
from moelab.guard import (
    NonFiniteError,
    NonFiniteGuard,
    StepGuard,
    grad_norm,
    nonfinite_grads,
    skip_update,
)
from trained_moe import checkpoint_tensors


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def backward(model: torch.nn.Module, scale: float) -> torch.Tensor:
    x = torch.ones(3, 4) * scale
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def test_finite_step_passes() -> None:
    model, _ = tiny()
    loss = backward(model, 1.0)
    norm = grad_norm(model)
    assert norm is not None and norm > 0
    assert not nonfinite_grads(model, loss.device)
    assert NonFiniteGuard(skip=False).check(float(loss), norm, 1)


@pytest.mark.parametrize(
    ("loss", "norm", "words"),
    [
        (math.nan, 1.0, "step 7: loss=nan is not finite"),
        (1.0, math.inf, "step 7: grad norm=inf is not finite"),
        (math.inf, math.nan, "step 7: loss=inf and grad norm=nan is not finite"),
    ],
)
def test_raises_naming_step_and_value(loss: float, norm: float, words: str) -> None:
    with pytest.raises(NonFiniteError) as err:
        NonFiniteGuard(skip=False).check(loss, norm, 7)
    assert str(err.value).startswith(words) and "train.skip_nonfinite" in str(err.value)


def test_nan_gradients_are_flagged() -> None:
    model, _ = tiny()
    loss = backward(model, math.nan)
    assert math.isnan(float(loss))
    assert nonfinite_grads(model, loss.device)
    norm = grad_norm(model)
    assert norm is not None and not math.isfinite(norm)
    # Finite loss, poisoned gradient (e.g. an overflow in one layer's backward).
    model, _ = tiny()
    loss = backward(model, 1.0)
    next(model.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
    assert nonfinite_grads(model, loss.device)


def test_skip_leaves_weights_and_optimizer_state_untouched() -> None:
    model, opt = tiny()
    backward(model, 1.0)
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    guard = NonFiniteGuard(skip=True)
    loss = backward(model, math.nan)
    norm = grad_norm(model)
    engine = SimpleNamespace(optimizer=opt, step=lambda: opt.step())
    assert guard.check(float(loss), norm, 2) is False
    with skip_update(engine):
        engine.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert guard.skipped == 1
    # The optimizer steps normally again afterwards.
    assert "step" not in vars(opt)
    backward(model, 1.0)
    engine.step()
    assert not torch.equal(before[0], next(model.parameters()))
    assert guard.check(1.0, 1.0, 3) and guard.skipped == 1


# Real runs: a NaN injected into one step's loss on every rank.

FAULT = ("train=smoke", "train.log_every=1", "train.eval_every=0")
NAN_EXIT = 3
"""The launcher's exit code when a non-finite loss or gradient stopped the run."""


def saved_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every floating tensor of checkpoint `step` (all ranks' model, expert and optimizer
    files; not the saved RNG states), keyed by file name and path inside the file."""
    saved = checkpoint_tensors(run_dir, step)
    assert saved, f"no checkpoint files for step {step}"
    return {key: t for key, t in saved.items() if t.is_floating_point()}


def buffers(run_dir: Path, step: int) -> set[str]:
    """Keys (as in `saved_tensors`) of the module's buffers: not trained, never updated."""
    files = (run_dir / "checkpoints" / f"global_step{step}").glob("mp_rank_*_model_states.pt")
    return {
        f"{f.name}/module/{name}"
        for f in files
        for name in torch.load(f, map_location="cpu", weights_only=False).get("buffer_names", [])
    }


def finite_checkpoint(run_dir: Path, step: int) -> None:
    """Every tensor of checkpoint `step` (model and optimizer shards) is finite."""
    for key, t in saved_tensors(run_dir, step).items():
        assert torch.isfinite(t).all(), f"{key} holds a non-finite tensor"


def the_run(workdir: Path) -> tuple[MlflowClient, Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    return client, run


# The 1-rank runs of this module, launched together (`one_rank_runs`).
ONE_RANK = ("cluster.nproc_per_node=1", "train.threads_per_rank=1", "model=tiny_dense")
SKIP = ("train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=5")
ONE_RANK_RUNS = {
    # ZeRO 0, no skipping: the run stops at the NaN step.
    "stop": ("train.checkpoint_every=4", "train.steps=8", "train.inject_nonfinite_step=6"),
    # ZeRO 0 with skipping: moelab discards the update (the optimizer step becomes a zero_grad).
    "skip_zero0": (
        "zero=stage0",
        *SKIP,
        "train.inject_nonfinite_step=3",
        "train.skip_nonfinite=true",
    ),
    # fp16 (ZeRO-2) with the dynamic loss scale starting at 2**20.
    "fp16": (
        "zero=stage2",
        *("train.precision=fp16", "train.steps=16", "train.fp16_initial_scale_power=20"),
    ),
}


@dataclass(frozen=True)
class GuardRun:
    workdir: Path
    proc: subprocess.CompletedProcess[str]

    @property
    def out(self) -> str:
        return self.proc.stdout + self.proc.stderr

    @property
    def run_dir(self) -> Path:
        (run_dir,) = (self.workdir / "runs" / "moelab").iterdir()
        return run_dir


@pytest.fixture(scope="module")
def one_rank_runs(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> dict[str, GuardRun]:
    """ONE_RANK_RUNS, launched at once: each its own workdir, MLflow store and run dir."""
    runs = {
        name: (tmp_path_factory.mktemp(name), (*FAULT, *ONE_RANK, *args))
        for name, args in ONE_RANK_RUNS.items()
    }
    done = run_launchers(shared_cache, runs)
    return {name: GuardRun(runs[name][0], proc) for name, proc in done.items()}


@pytest.mark.slow
def test_nan_stops_the_run_naming_the_step(one_rank_runs: dict[str, GuardRun]) -> None:
    run = one_rank_runs["stop"]
    out = run.out
    assert run.proc.returncode == NAN_EXIT, out[-3000:]
    # ZeRO 0: the NaN loss made NaN gradients, both named.
    message = "moelab: error: step 6: loss=nan and grad norm=inf is not finite; lower train.lr"
    assert message in out, out[-3000:]
    assert f"moelab-launch: error: the run exited with code {NAN_EXIT}" in run.proc.stderr
    assert "Traceback" not in out
    assert read_meta(run.run_dir)["step"] == 4  # type: ignore[index]
    assert (run.run_dir / "checkpoints" / "latest").read_text() == "global_step4"
    finite_checkpoint(run.run_dir, 4)
    client, mlrun = the_run(run.workdir)
    assert mlrun.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]


# ZeRO 2: DeepSpeed's own step finds the NaN gradient norm and leaves the weights alone; two
# EP ranks, each writing its experts and its optimizer partition.
ZERO2_SKIP = (
    *("model=tiny_moe_top2", "zero=stage2", "parallel=ep2", *SKIP),
    *("train.inject_nonfinite_step=3", "train.skip_nonfinite=true"),
)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero0", "zero2"])
def test_nan_step_is_skipped_and_counted(
    tmp_path: Path, shared_cache: Path, request: pytest.FixtureRequest, zero: str
) -> None:
    """A checkpoint after every step: the one after the skipped step 3 equals the one before
    it, tensor for tensor (weights and Adam state); step 4, a normal step, changes them all."""
    if zero == "zero0":  # one of the module's 1-rank runs
        run = request.getfixturevalue("one_rank_runs")["skip_zero0"]
    else:
        run = GuardRun(tmp_path, run_launcher(tmp_path, shared_cache, *FAULT, *ZERO2_SKIP))
    assert run.proc.returncode == 0, run.out[-3000:]
    run_dir = run.run_dir
    before, skipped, after = (saved_tensors(run_dir, step) for step in (2, 3, 4))
    assert before.keys() == skipped.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], skipped[k])]
    assert not changed, f"the skipped step 3 changed {len(changed)} tensors: {changed[:4]}"
    unchanged = [
        k for k in skipped.keys() - buffers(run_dir, 4) if torch.equal(skipped[k], after[k])
    ]
    assert not unchanged, f"the normal step 4 left {len(unchanged)} unchanged: {unchanged[:4]}"
    finite_checkpoint(run_dir, 5)
    client, mlrun = the_run(run.workdir)
    skips = client.get_metric_history(mlrun.info.run_id, "train/skipped_steps")
    assert {m.step: m.value for m in skips} == {s: float(s >= 3) for s in range(1, 6)}
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    loss = {m.step: m.value for m in history}
    assert sorted(loss) == [1, 2, 4, 5]  # the skipped step has no loss
    assert all(math.isfinite(v) for v in loss.values())


class _Engine:
    """What StepGuard uses of a DeepSpeed engine after backward: its module's gradients, its
    device, its optimizer, and (ZeRO 1/2) the norm its step reports, a Python inf after an
    overflow."""

    def __init__(self, norm_after_step: Any) -> None:
        self.module, self.optimizer = tiny()
        self.device, self.norm, self.steps = torch.device("cpu"), None, 0
        self.norm_after_step = norm_after_step

    def step(self) -> None:
        self.steps += 1
        self.optimizer.step()
        self.norm = self.norm_after_step

    def get_global_grad_norm(self) -> Any:
        return self.norm


@pytest.mark.parametrize(("precision", "fault"), [("fp32", True), ("bf16", True), ("fp16", False)])
def test_gradient_overflow_is_a_fault_except_under_fp16_loss_scaling(
    precision: str, fault: bool
) -> None:
    """An inf gradient with a finite loss: a fault in fp32/bf16 (ZeRO 0: flagged before the
    step; ZeRO 2: ZeRO's own skip reported as inf), DeepSpeed's loss-scale business in fp16
    (the step runs, so its scaler sees the overflow and backs off; nothing is skipped here)."""
    eng0, eng2 = _Engine(None), _Engine(math.inf)
    for eng in (eng0, eng2):
        loss = backward(eng.module, 1.0)
        next(eng.module.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
    zero0 = StepGuard(skip=True, zero_stage=0, precision=precision)
    loss_bad, grad_bad = (bool(x) for x in zero0.local_flags(eng0, loss.detach()))
    assert not loss_bad and grad_bad == fault
    assert zero0.apply(eng0, loss_bad, grad_bad, 5) is not fault
    assert zero0.skipped == int(fault)
    zero2 = StepGuard(skip=False, zero_stage=2, precision=precision)
    flags = [bool(x) for x in zero2.local_flags(eng2, loss.detach())]
    assert flags == [False, False]  # ZeRO 1/2 gradients are checked by ZeRO's step
    if fault:
        with pytest.raises(NonFiniteError, match="step 5: grad norm=inf"):
            zero2.apply(eng2, *flags, 5)
    else:
        assert zero2.apply(eng2, *flags, 5)
    assert eng2.steps == 1  # the step ran: fp16's scaler needs it to see the overflow


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nonfinite_loss_is_a_fault_in_every_precision(precision: str) -> None:
    eng = _Engine(None)
    loss = backward(eng.module, 1.0)
    guard = StepGuard(skip=False, zero_stage=0, precision=precision)
    loss_bad, grad_bad = (bool(x) for x in guard.local_flags(eng, loss.detach() * math.nan))
    assert loss_bad
    with pytest.raises(NonFiniteError, match="step 2: loss=nan"):
        guard.apply(eng, loss_bad, grad_bad, 2)
    assert eng.steps == 0  # stopped before the weights changed


@pytest.mark.slow
def test_fp16_run_survives_loss_scale_overflows(one_rank_runs: dict[str, GuardRun]) -> None:
    """fp16 (ZeRO-2) with the dynamic loss scale starting at 2**20: fp16 gradients overflow
    until DeepSpeed, skipping each such step, has halved the scale enough; the run then trains
    normally and ends with a finite loss."""
    run = one_rank_runs["fp16"]
    assert run.proc.returncode == 0, run.out[-3000:]
    client, mlrun = the_run(run.workdir)
    metric = {
        key: [m.value for m in client.get_metric_history(mlrun.info.run_id, key)]
        for key in ("train/overflow_steps", "train/loss_scale", "train/loss", "train/skipped_steps")
    }
    assert 3 <= metric["train/overflow_steps"][-1] < 12, metric
    assert metric["train/loss_scale"][-1] < 2.0**20, metric
    assert len(metric["train/loss"]) == 16 and all(map(math.isfinite, metric["train/loss"]))
    assert metric["train/skipped_steps"][-1] == 0.0  # overflows are not moelab's skips
