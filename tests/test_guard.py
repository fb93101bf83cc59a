"""Numerical faults: a clear error naming the step, or a counted, exact skip."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import run_launcher
from moelab.checkpoint import read_meta
from moelab.guard import (
    NonFiniteError,
    NonFiniteGuard,
    check_finite,
    grad_norm,
    nonfinite_flag,
    skip_update,
)


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
    assert float(nonfinite_flag(loss, model)) == 0.0
    assert check_finite(float(loss), norm, 1, skip=False)


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
    assert float(nonfinite_flag(loss, model)) == 1.0
    norm = grad_norm(model)
    assert norm is not None and not math.isfinite(norm)
    # Finite loss, poisoned gradient (e.g. an overflow in one layer's backward).
    model, _ = tiny()
    loss = backward(model, 1.0)
    next(model.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
    assert float(nonfinite_flag(loss, model)) == 1.0


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
    assert guard.metrics() == {"train/skipped_steps": 1.0}
    # The optimizer steps normally again afterwards.
    assert "step" not in vars(opt)
    backward(model, 1.0)
    engine.step()
    assert not torch.equal(before[0], next(model.parameters()))
    assert guard.check(1.0, 1.0, 3) and guard.skipped == 1


# Real runs: a NaN injected into one step's loss on every rank.

FAULT = ("train=smoke", "train.steps=8", "train.log_every=1", "train.eval_every=0")


def finite_checkpoint(run_dir: Path, step: int) -> None:
    """Every tensor of checkpoint `step` (model and optimizer shards) is finite."""
    files = sorted((run_dir / "checkpoints" / f"global_step{step}").glob("*.pt"))
    assert files
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        for t in tensors(state):
            assert torch.isfinite(t).all(), f"{f.name} holds a non-finite tensor"


def tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [t for item in items for t in tensors(item)]


def the_run(workdir: Path) -> tuple[MlflowClient, Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    return client, run


@pytest.mark.slow
def test_nan_stops_the_run_naming_the_step(tmp_path: Path, shared_cache: Path) -> None:
    overrides = ("model=tiny_dense", "cluster.nproc_per_node=1", "train.checkpoint_every=4")
    proc = run_launcher(tmp_path, shared_cache, *FAULT, *overrides, "train.inject_nonfinite_step=6")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # ZeRO 0: the NaN loss made NaN gradients, both named.
    message = "moelab: error: step 6: loss=nan and grad norm=inf is not finite; lower train.lr"
    assert message in out, out[-3000:]
    assert "Traceback" not in out
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    assert read_meta(run_dir)["step"] == 4  # type: ignore[index]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step4"
    finite_checkpoint(run_dir, 4)
    client, run = the_run(tmp_path)
    assert run.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_nan_step_is_skipped_and_counted(tmp_path: Path, shared_cache: Path) -> None:
    # ZeRO-2: DeepSpeed's own step finds the NaN gradient norm and leaves the weights alone.
    overrides = ("model=tiny_moe_top2", "zero=stage2", "parallel=ep2", "train.checkpoint_every=8")
    proc = run_launcher(
        tmp_path,
        shared_cache,
        *FAULT,
        *overrides,
        "train.inject_nonfinite_step=3",
        "train.skip_nonfinite=true",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    client, run = the_run(tmp_path)
    skipped = client.get_metric_history(run.info.run_id, "train/skipped_steps")
    assert {m.step: m.value for m in skipped} == {s: float(s >= 3) for s in range(1, 9)}
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(loss) == [1, 2, 4, 5, 6, 7, 8]  # the skipped step has no loss
    assert all(math.isfinite(v) for v in loss.values())
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    finite_checkpoint(run_dir, 8)
