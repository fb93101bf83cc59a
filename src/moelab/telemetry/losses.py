"""The training losses of one logging window, and the optimizer's figures at the log step.

The loss sums stay on the device between two logs: each micro-step adds its (4,) detached
losses to the step's sums, an updated step folds them into the window, a skipped step only
counts as skipped. At the log step the window becomes part of `Telemetry`'s gathered vector:
`vector` is this rank's part, `metrics` reads the gathered rows back.
"""

from __future__ import annotations

from typing import Any

import torch

LOSS_KEYS = ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss")
WIDTH = len(LOSS_KEYS) + 2
"""Columns of `LossWindow.vector`: the loss means, the micro-steps, the skipped steps."""


class LossWindow:
    """Loss sums of the updated steps since the last log (on the device) and the count of
    steps the non-finite guard skipped since the process started."""

    def __init__(self) -> None:
        self.step_sums: torch.Tensor | None = None
        """(4,) loss, lm_loss, aux_loss, z_loss summed over this step's micro-steps."""
        self.step_micro = 0
        self.skipped = 0
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.micro_steps = 0

    def on_micro_step(self, out: Any) -> None:
        """Add one micro-step's losses (detached: nothing is read back to the host)."""
        losses = torch.stack(
            [x.detach().float() for x in (out.loss, out.lm_loss, out.aux_loss, out.z_loss)]
        )
        self.step_sums = losses if self.step_sums is None else self.step_sums + losses
        self.step_micro += 1

    def step_loss(self) -> torch.Tensor:
        """This step's summed loss, on the device (what the non-finite guard checks)."""
        assert self.step_sums is not None, "no micro-step ran in this step"
        return self.step_sums[0]

    def end_step(self, updated: bool) -> None:
        """Fold the step into the window if the update ran, else count it as skipped."""
        if updated and self.step_sums is not None:
            self.sums = self.step_sums if self.sums is None else self.sums + self.step_sums
            self.micro_steps += self.step_micro
        elif not updated:
            self.skipped += 1
        self.step_sums, self.step_micro = None, 0

    def vector(self, device: torch.device) -> torch.Tensor:
        """(WIDTH,) float64 on `device`: the window's loss means over its micro-steps, the
        micro-step count and the skipped steps."""
        counts = torch.tensor(
            [float(self.micro_steps), float(self.skipped)], dtype=torch.float64, device=device
        )
        if self.sums is None:
            means = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        else:
            means = (self.sums / self.micro_steps).to(device, torch.float64)
        return torch.cat([means, counts])


def train_metrics(rows: torch.Tensor, ds_engine: Any | None) -> dict[str, float]:
    """The train/ metrics from the (world, WIDTH) gathered `LossWindow.vector`s: losses
    averaged over ranks, and from `ds_engine` (DeepSpeed's; None for a bare model) the LR,
    gradient norm and fp16 loss scale. No losses when every step of the window was skipped."""
    metrics: dict[str, float] = {}
    if ds_engine is not None:
        metrics["train/lr"] = ds_engine.get_lr()[0]
    if bool(rows[:, len(LOSS_KEYS)].min() > 0):
        means = (rows[:, : len(LOSS_KEYS)].sum(0) / rows.shape[0]).tolist()
        metrics |= dict(zip(LOSS_KEYS, means, strict=True))
        if ds_engine is not None:
            metrics |= optimizer_metrics(ds_engine)
    return metrics | {"train/skipped_steps": float(rows[:, len(LOSS_KEYS) + 1].max())}


def optimizer_metrics(ds_engine: Any) -> dict[str, float]:
    """The engine's gradient norm and, under fp16, DeepSpeed's dynamic loss scale and the
    steps it skipped on overflow."""
    metrics: dict[str, float] = {}
    grad_norm = ds_engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    if ds_engine.fp16_enabled():
        metrics["train/loss_scale"] = float(ds_engine.optimizer.loss_scale)
        metrics["train/overflow_steps"] = float(ds_engine.skipped_steps)
    return metrics
