"""Numerical faults: stop, or skip the update, when the loss or the gradients are not finite.

Where the check must happen. With fp32/bf16, DeepSpeed's `engine.step()` clips and applies
the optimizer unconditionally (only the fp16 loss scaler skips overflowing steps by itself),
and `engine.get_global_grad_norm()` is only known *after* that step: by then a NaN has
already reached the weights and the Adam moments. So the loop checks at the gradient
accumulation boundary, after `engine.backward()` (gradients are all-reduced there under
ZeRO 0) and before `engine.step()`:

    flags = guard.local_flags(ds_engine, loss_sum)   # (2,) on the device: loss, local grads
    loss_bad, grad_bad, ... = engine.any_rank(...)  # the loop's one all-reduce per step
    guard.apply(ds_engine, loss_bad, grad_bad, step)  # step, skip, or NonFiniteError

What "skip" means precisely: the step's gradients are discarded and the optimizer does not
run (weights, Adam moments and Adam's step count stay as they were), but DeepSpeed's own
counters (micro/global steps) and the LR schedule still advance, so the step number, data
order and schedule stay aligned with an unskipped run; telemetry counts the skipped step in
`train/skipped_steps`. Under ZeRO 1/2 the gradients live in the optimizer's partitions
rather than `param.grad`; there the loss check still applies and the gradient check is
ZeRO's own (`engine.get_global_grad_norm()` is `inf` after a step it skipped).
"""

from __future__ import annotations

import math
import time
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


def grad_norm(module: torch.nn.Module) -> float | None:
    """Global L2 norm of this rank's `param.grad`s (None if no parameter has one)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2.0)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0))


@contextmanager
def skip_update(ds_engine: Any) -> Iterator[None]:
    """Within it, `ds_engine.step()` discards the gradients instead of applying them."""
    from moelab.dscompat import discarding_step

    with discarding_step(ds_engine.optimizer):
        yield


class StepGuard:
    """The training loop's non-finite policy at the gradient-accumulation boundary.

    Before the update, every rank learns whether any rank's loss (and, under ZeRO 0, any
    local gradient) is not finite: `local_flags` builds this rank's flags on the engine's
    device and the loop ORs them over all ranks in its one per-step all-reduce. Then `apply`
    stops (NonFiniteError, before the weights change), or with `skip` discards the update.
    ZeRO 1/2 discard it themselves: their step finds the non-finite gradient norm (fp32; bf16
    with `check_grad_overflow`), leaves the weights alone and reports the norm as a Python
    `inf`, which also catches gradients that overflow on their own.

    fp16 is different: gradients that overflow the dynamic loss scale are DeepSpeed's normal
    business (it skips the step and halves the scale), so only a non-finite loss is a fault.
    """

    def __init__(
        self, skip: bool, zero_stage: int, precision: str, inject_at: int = 0, slow_s: float = 0.0
    ) -> None:
        self.guard = NonFiniteGuard(skip)
        self.zero_stage = zero_stage
        self.grads_are_faults = precision != "fp16"
        self.inject_at = inject_at
        self.slow_s = slow_s

    def straggle(self) -> None:
        """Fault injection (train.inject_slow_rank): this rank sleeps before each micro-batch's
        forward, as a rank with a slow input pipeline or host would."""
        if self.slow_s:
            time.sleep(self.slow_s)

    def inject(self, out: Any, step: int) -> Any:
        """Fault injection (train.inject_nonfinite_step): this step's loss becomes NaN."""
        if step == self.inject_at:
            out.loss = out.loss * float("nan")
        return out

    def local_flags(self, ds_engine: Any, loss_sum: torch.Tensor) -> torch.Tensor:
        """(2,) on the engine's device: [this rank's loss is not finite, a local gradient is
        not finite]. No host sync: the loop all-reduces them with its other flags."""
        loss_bad = ~torch.isfinite(loss_sum.detach().float())
        if self.zero_stage == 0 and self.grads_are_faults:
            grad_bad = nonfinite_grads(ds_engine.module, ds_engine.device)
        else:  # ZeRO 1/2 partitions: checked by ZeRO's own step; fp16: the loss scaler's job
            grad_bad = torch.zeros((), dtype=torch.bool, device=ds_engine.device)
        return torch.stack([loss_bad, grad_bad]).to(ds_engine.device, torch.float32)

    def apply(self, ds_engine: Any, loss_bad: bool, grad_bad: bool, step: int) -> bool:
        """`ds_engine.step()` given the all-reduced flags; False if the update was skipped."""
        norm = math.inf if grad_bad else None
        if not self.guard.check(math.nan if loss_bad else 0.0, norm, step):
            with skip_update(ds_engine) if self.zero_stage == 0 else _nothing():
                ds_engine.step()
            return False
        ds_engine.step()
        if self.zero_stage == 0 or not self.grads_are_faults:
            return True
        # ZeRO 1/2 report an overflow as the Python float inf (no device read needed); a
        # finite norm stays a device tensor that ZeRO itself checked.
        after = ds_engine.get_global_grad_norm()
        overflow = isinstance(after, float) and not math.isfinite(after)
        return self.guard.check(0.0, math.inf if overflow else None, step)

    @property
    def skipped(self) -> int:
        """Steps skipped so far (`apply` returned False)."""
        return self.guard.skipped


def nonfinite_grads(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Bool scalar on `device`: any local `param.grad` holds a NaN/inf (no host sync)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)])
    return ~torch.isfinite(norms).all().to(device)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def injected_slow_s(inject_slow_rank: int, inject_slow_ms: float, rank: int) -> float:
    """Seconds `rank` sleeps before each micro-batch (train.inject_slow_rank/_ms); 0 = off."""
    return inject_slow_ms / 1e3 if rank == inject_slow_rank else 0.0
