"""Numerical faults: a clear error naming the step, or a counted, exact skip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

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
