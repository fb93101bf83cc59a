"""MoE telemetry: all-to-all / gate / expert time per layer, expert load, drops, router entropy.

Counts are accumulated on the rank without host syncs (tensors stay on the device) and turned
into one flat vector per logging window, which the caller gathers across ranks in a single
collective. Times come from sampled steps only (`set_timing`): DeepSpeed's layer timers
synchronise the device on every timed forward, so unsampled steps run with them off and the
per-step figures are averages over the sampled steps.

All-to-all bytes are the bytes a rank SENDS TO OTHER RANKS: of each all-to-all's
(experts, capacity, d_model) buffer, (ep_size - 1) / ep_size leaves the rank (the rest is its
own slice); ep_size 1 runs no all-to-all and sends 0. They count the training passes'
all-to-alls, forward (dispatch, combine) and backward (their two reverses), of every MoE layer
and micro-step, from the tensors' shapes (no device sync); eval forwards are not counted.
Per optimizer step and MoE layer that is 4 x grad_accum x experts x capacity x d_model x dtype
size x (ep_size - 1) / ep_size.

- `moe/a2a_bytes`: bytes sent per (sampled) optimizer step, mean over ranks (all ranks of an
  expert-parallel group send the same).
- `moe/a2a_bytes_total`: bytes sent since the training process started up to the logging step
  (every step, sampled or not; a resumed run counts from its restart), mean over ranks:
  compare it with a link's byte counters.
- `moe/a2a_ms`, `moe/a2a_bwd_ms`: forward / backward all-to-all ms per sampled step, summed
  over the layers, of the slowest rank; `moe/layer_{i}/a2a_ms`, `moe/layer_{i}/a2a_bwd_ms`:
  that rank's per-layer figures, which add up to the totals.
- `moe/a2a_gbps`: `moe/a2a_bytes` x 8 / 1e9 / ((`moe/a2a_ms` + `moe/a2a_bwd_ms`) / 1e3), Gbit/s.
"""

from __future__ import annotations

from typing import Any

import torch

from moelab.config import MoEConfig
from moelab.moe_clock import a2a_bytes_sent
from moelab.moe_impls import moe_impl

# Per MoE layer and sampled step: forward all-to-alls (dispatch, combine), gate, whole layer,
# backward all-to-alls (`moelab.moe_clock`).
TIMER_KEYS = ("a2a1", "a2a2", "gate", "moe", "a2a_bwd")


def load_cv(counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation (population std / mean) of tokens per expert, last dim."""
    counts = counts.double()
    mean = counts.mean(-1)
    return counts.std(-1, correction=0) / mean.clamp_min(1e-12)


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    counts = counts.double()
    return counts.max(-1).values / counts.mean(-1).clamp_min(1e-12)


def dropped_tokens(counts: torch.Tensor, cap: int) -> torch.Tensor:
    """Routes over capacity per layer: sum over experts of max(0, count - capacity)."""
    return (counts.double() - cap).clamp_min(0).sum(-1)


def a2a_gbps(sent_bytes: float, ms: float) -> float:
    """Gbit/s of `sent_bytes` sent in `ms` milliseconds (0 when nothing was timed)."""
    return sent_bytes * 8 / 1e9 / (ms / 1e3) if ms > 0 else 0.0


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax router distribution of each token: (tokens,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class MoeTelemetry:
    """Per-rank accumulators of one logging window for every MoE layer of `model`."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: MoEConfig,
        tokens_per_forward: int,
        ep_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.device, self.timing = model, device, False
        self.impl = moe_impl(cfg.impl)
        self.layers = [ffn.layer_idx for ffn in self.impl.moe_ffns(model)]
        self.num_experts = cfg.total_experts
        self.ep_size = ep_size
        self.cap = cfg.capacity(tokens_per_forward)
        self.drop_tokens = not cfg.dropless
        self.pos = {idx: i for i, idx in enumerate(self.layers)}
        self.impl.install_moe_timers()
        self.handles = self.impl.register_router_hooks(model, self._on_logits)
        self.run_bytes = 0.0  # bytes sent in all-to-alls by the logged windows so far
        self.sample_sent = 0  # `a2a_bytes_sent()` when the current sampled step began
        self.reset()

    def reset(self) -> None:
        n_layers, dev = len(self.layers), self.device
        self.counts = torch.zeros(n_layers, self.num_experts, dtype=torch.float64, device=dev)
        self.dropped = torch.zeros(n_layers, dtype=torch.float64, device=dev)
        self.ent_sum = torch.zeros(n_layers, dtype=torch.float64, device=dev)
        self.ent_n = [0] * n_layers
        self.timed_steps, self.timed_ms = 0, 0.0
        self.ms = [[0.0] * len(TIMER_KEYS) for _ in self.layers]
        self.timed_bytes = 0  # bytes sent to other ranks on the window's sampled steps
        self.window_sent = a2a_bytes_sent()  # the counter when the window began

    def _on_logits(self, idx: int, logits: torch.Tensor) -> None:
        i = self.pos[idx]
        self.ent_sum[i] += router_entropy(logits).sum().double()
        self.ent_n[i] += logits.shape[0]

    def on_micro_step(self, exp_counts: tuple[torch.Tensor, ...] | None) -> None:
        """Add one training forward's routing choices (before capacity dropping)."""
        if not exp_counts:
            return
        counts = torch.stack([c.detach().double() for c in exp_counts])
        self.counts += counts
        if self.drop_tokens:
            self.dropped += dropped_tokens(counts, self.cap)

    def set_timing(self, on: bool) -> None:
        """Time the coming step's MoE layers (a sampled step) or run them untimed."""
        self.timing = on
        self.impl.set_moe_timing(self.model, on)
        if on:
            self.sample_sent = a2a_bytes_sent()

    def on_step(self, step_ms: float) -> None:
        """After a sampled step of `step_ms` (device-synchronised wall time): read and reset
        the forward timers and the backward all-to-all time (these reads sync the device)."""
        if not self.timing:
            return
        self.timed_steps += 1
        self.timed_ms += step_ms
        for idx, ms in self.impl.read_and_reset_moe_timers(self.model).items():
            row = self.ms[self.pos[idx]]
            for k, key in enumerate(TIMER_KEYS):
                row[k] += ms.get(key, 0.0)
        self.timed_bytes += a2a_bytes_sent() - self.sample_sent

    def vector(self) -> torch.Tensor:
        """This rank's window as one float64 vector (layout read back by `metrics`)."""
        head = [x for row in self.ms for x in row]
        window_bytes = a2a_bytes_sent() - self.window_sent
        head += [self.timed_bytes, window_bytes, self.timed_steps, self.timed_ms]
        head += self.ent_n
        parts = [
            torch.tensor(head, dtype=torch.float64, device=self.device),
            self.counts.flatten(),
            self.dropped,
            self.ent_sum,
        ]
        return torch.cat(parts)

    def metrics(self, ranks: torch.Tensor) -> dict[str, Any]:
        """Metrics from the (world, n) gathered `vector`s of one window. Times are per sampled
        step; none if no step was sampled."""
        n_layers, n_exp, n_t = len(self.layers), self.num_experts, len(TIMER_KEYS)
        o = n_layers * n_t
        extra = ranks[:, o : o + 4]  # sampled-step bytes, window bytes, sampled steps, their ms
        timed = extra[:, 2].clamp_min(1)  # (world,) sampled steps of each rank
        timers = ranks[:, :o].reshape(-1, n_layers, n_t) / timed[:, None, None]  # ms per step
        ent_n = ranks[:, o + 4 : o + 4 + n_layers].sum(0)
        o += 4 + n_layers
        counts = ranks[:, o : o + n_layers * n_exp].reshape(-1, n_layers, n_exp).sum(0)
        o += n_layers * n_exp
        dropped, ent_sum = ranks[:, o : o + n_layers].sum(0), ranks[:, o + n_layers :].sum(0)
        self.run_bytes += float(extra[:, 1].mean())
        m: dict[str, Any] = {
            "moe/dead_experts": float((counts == 0).sum()),
            "moe/a2a_bytes_total": self.run_bytes,
        }
        if bool((extra[:, 2] > 0).all()):
            m |= self._timing(timers, extra, timed)
        total = counts.sum(-1)
        shares = counts / total.clamp_min(1).unsqueeze(-1)
        cv, mom = load_cv(counts), max_over_mean(counts)
        for i, idx in enumerate(self.layers):
            p = f"moe/layer_{idx}"
            m[f"{p}/load_cv"] = float(cv[i])
            m[f"{p}/load_max_over_mean"] = float(mom[i])
            m[f"{p}/drop_fraction"] = float(dropped[i] / total[i].clamp_min(1))
            m[f"{p}/router_entropy"] = float(ent_sum[i] / ent_n[i].clamp_min(1))
            m[f"{p}/tokens"] = float(total[i])
            for e in range(n_exp):
                m[f"{p}/expert_{e}_share"] = float(shares[i, e])
        m["_shares"] = shares
        return m

    def _timing(
        self, timers: torch.Tensor, extra: torch.Tensor, timed: torch.Tensor
    ) -> dict[str, Any]:
        """Timing metrics from (world, layers, 5) ms per sampled step (`TIMER_KEYS`), the
        (world, 4) window sums (sampled-step bytes, window bytes, sampled steps, their wall ms)
        and the (world,) sampled step counts. All-to-all times are the slowest rank's (the
        largest total), per layer too, so the layers add up to the total; the all-to-all
        fraction is of the sampled steps' own time."""
        fwd = timers[..., 0] + timers[..., 1]  # (world, layers)
        bwd = timers[..., 4]
        f_rank, b_rank = int(fwd.sum(-1).argmax()), int(bwd.sum(-1).argmax())
        fwd_ms, bwd_ms = float(fwd[f_rank].sum()), float(bwd[b_rank].sum())
        sent = float((extra[:, 0] / timed).mean())  # bytes to other ranks per sampled step
        step_ms = extra[:, 3] / timed  # (world,) wall ms of a sampled step
        m: dict[str, Any] = {
            "moe/a2a_ms": fwd_ms,
            "moe/a2a_ms_mean": float(fwd.sum(-1).mean()),
            "moe/a2a_bwd_ms": bwd_ms,
            "moe/a2a_fraction": float(((fwd + bwd).sum(-1) / step_ms.clamp_min(1e-9)).max()),
            "moe/a2a_bytes": sent,
            "moe/a2a_gbps": a2a_gbps(sent, fwd_ms + bwd_ms),
            "moe/timed_steps": float(timed.max()),
        }
        for i, idx in enumerate(self.layers):
            p = f"moe/layer_{idx}"
            m[f"{p}/a2a_ms"] = float(fwd[f_rank, i])
            m[f"{p}/a2a_bwd_ms"] = float(bwd[b_rank, i])
            m[f"{p}/gate_ms"] = float(timers[:, i, 2].mean())
            expert = timers[:, i, 3] - timers[:, i, 0] - timers[:, i, 1] - timers[:, i, 2]
            m[f"{p}/expert_ms"] = float(expert.mean())
        return m

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.impl.set_moe_timing(self.model, False)
        self.impl.uninstall_moe_timers()
