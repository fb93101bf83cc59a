"""Numerical faults: stop, or skip the update, when the loss or the gradients are not finite.

Where the check must happen. With fp32/bf16, DeepSpeed's `engine.step()` clips and applies
the optimizer unconditionally (only the fp16 loss scaler skips overflowing steps by itself),
and `engine.get_global_grad_norm()` is only known *after* that step: by then a NaN has
already reached the weights and the Adam moments. So the loop checks at the gradient
accumulation boundary, after `engine.backward()` (gradients are all-reduced there under
ZeRO 0) and before `engine.step()`:

    bad = guard.nonfinite_flag(loss, ds_engine.module)   # loss and local gradients
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)           # every rank decides alike
    if nf.check(loss_value, math.inf if bad else None, step):  # raises, or False: skip
        ds_engine.step()
    else:
        with skip_update(ds_engine):
            ds_engine.step()

What "skip" means precisely: the step's gradients are discarded and the optimizer does not
run (weights, Adam moments and Adam's step count stay as they were), but DeepSpeed's own
counters (micro/global steps) and the LR schedule still advance, so the step number, data
order and schedule stay aligned with an unskipped run; the skipped step is counted in
`train/skipped_steps`. Under ZeRO 1/2 the gradients live in the optimizer's partitions
rather than `param.grad`; there the loss check still applies and the gradient check falls
back to `engine.get_global_grad_norm()` of the previous step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm is NaN or infinite."""


class NonFiniteGuard:
    """Raise on a non-finite loss or gradient norm, or (skip=True) count and skip the step."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped = 0

    def check(self, loss: float, grad_norm: float | None, step: int) -> bool:
        """True if the step may update the weights; False to skip it; NonFiniteError else."""
        bad = [
            f"{name}={value}"
            for name, value in (("loss", loss), ("grad norm", grad_norm))
            if value is not None and not math.isfinite(value)
        ]
        if not bad:
            return True
        if not self.skip:
            raise NonFiniteError(
                f"step {step}: {' and '.join(bad)} is not finite; lower train.lr, "
                "raise train.grad_clip or use train.skip_nonfinite=true to skip such steps."
            )
        self.skipped += 1
        return False

    def metrics(self) -> dict[str, float]:
        return {"train/skipped_steps": float(self.skipped)}


def check_finite(loss: float, grad_norm: float | None, step: int, skip: bool) -> bool:
    """One-off form of NonFiniteGuard.check (no skip count)."""
    return NonFiniteGuard(skip).check(loss, grad_norm, step)


def grad_norm(module: torch.nn.Module) -> float | None:
    """Global L2 norm of this rank's `param.grad`s (None if no parameter has one)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2.0)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0))


def nonfinite_flag(loss: torch.Tensor | float, module: torch.nn.Module) -> torch.Tensor:
    """1.0 if the loss or any local gradient is NaN/inf, else 0.0 (all-reduce it with MAX)."""
    bad = not math.isfinite(float(loss))
    norm = grad_norm(module)
    bad = bad or (norm is not None and not math.isfinite(norm))
    return torch.tensor(float(bad))


@contextmanager
def skip_update(ds_engine: Any) -> Iterator[None]:
    """Within it, `ds_engine.step()` discards the gradients instead of applying them."""
    optimizer = ds_engine.optimizer
    original = optimizer.step

    def discard(*args: Any, **kwargs: Any) -> None:
        optimizer.zero_grad(set_to_none=True)

    own = "step" in vars(optimizer)
    optimizer.step = discard
    try:
        yield
    finally:
        if own:
            optimizer.step = original
        else:
            del optimizer.step


class StepGuard:
    """The training loop's non-finite policy at the gradient-accumulation boundary.

    Before the update, every rank learns whether any rank's loss (and, under ZeRO 0, any
    local gradient) is not finite. Then: stop (NonFiniteError, before the weights change) or,
    with `skip`, discard the update. ZeRO 1/2 discard it themselves: their step finds the
    non-finite gradient norm (fp32; bf16 with `check_grad_overflow`) and leaves the weights
    alone, reporting an infinite norm, which also catches gradients that overflow on their own.
    """

    def __init__(self, skip: bool, zero_stage: int, inject_at: int = 0) -> None:
        self.guard = NonFiniteGuard(skip)
        self.zero_stage = zero_stage
        self.inject_at = inject_at

    def inject(self, out: Any, step: int) -> Any:
        """Fault injection (train.inject_nonfinite_step): this step's loss becomes NaN."""
        if step == self.inject_at:
            out.loss = out.loss * float("nan")
        return out

    def step(self, ds_engine: Any, losses: list[float], step: int) -> bool:
        """`ds_engine.step()` at the boundary; False if the update was skipped."""
        import torch.distributed as dist

        loss = sum(losses) / len(losses)
        flags = torch.tensor(
            [float(not math.isfinite(loss)), float(self._local_grad_bad(ds_engine))]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank decides alike
        loss_bad, grad_bad = bool(flags[0]), bool(flags[1])
        norm = math.inf if grad_bad else None
        if not self.guard.check(math.nan if loss_bad else loss, norm, step):
            with skip_update(ds_engine) if self.zero_stage == 0 else _nothing():
                ds_engine.step()
            return False
        ds_engine.step()
        if self.zero_stage == 0:
            return True
        after = ds_engine.get_global_grad_norm()  # inf: ZeRO found an overflow and skipped
        return self.guard.check(loss, None if after is None else float(after), step)

    def _local_grad_bad(self, ds_engine: Any) -> bool:
        if self.zero_stage != 0:
            return False  # gradients live in ZeRO's partitions: checked by its own step
        norm = grad_norm(ds_engine.module)
        return norm is not None and not math.isfinite(norm)

    def metrics(self) -> dict[str, float]:
        return self.guard.metrics()


@contextmanager
def _nothing() -> Iterator[None]:
    yield
