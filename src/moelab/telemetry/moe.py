"""MoE telemetry: all-to-all / gate / expert time per layer, expert load, drops, router entropy.

Everything is accumulated on the rank without host syncs (tensors stay on the device, timers
are host floats) and turned into one flat vector per logging window, which the caller gathers
across ranks in a single collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moelab import moe as moe_layers
from moelab.config import MoEConfig

TIMER_KEYS = ("a2a1", "a2a2", "gate", "moe")


def capacity(tokens: int, num_experts: int, top_k: int, cfg: MoEConfig) -> int:
    """Expert capacity per forward as DeepSpeed computes it (`_capacity`, factor x k)."""
    return max(math.ceil(tokens / num_experts * cfg.capacity_factor * top_k), cfg.min_capacity)


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


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax router distribution of each token: (tokens,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class MoeTelemetry:
    """Per-rank accumulators of one logging window for every MoE layer of `model`."""

    def __init__(
        self, model: torch.nn.Module, cfg: MoEConfig, tokens_per_forward: int, ep_size: int
    ) -> None:
        self.model = model
        self.layers = [idx for idx, _ in moe_layers.iter_moe_layers(model)]
        self.num_experts = cfg.total_experts
        self.ep_size = ep_size
        self.cap = capacity(tokens_per_forward, cfg.total_experts, cfg.active_experts, cfg)
        self.drop_tokens = cfg.drop_tokens
        self.pos = {idx: i for i, idx in enumerate(self.layers)}
        moe_layers.enable_moe_timers(model)
        self.handles = moe_layers.register_router_hooks(model, self._on_logits, self._on_dispatch)
        self.reset()

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def reset(self) -> None:
        n_layers = len(self.layers)
        self.counts = torch.zeros(n_layers, self.num_experts, dtype=torch.float64)
        self.dropped = torch.zeros(n_layers, dtype=torch.float64)
        self.ent_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.ent_n = [0] * n_layers
        self.ms = [[0.0] * len(TIMER_KEYS) for _ in self.layers]
        self.bwd_ms = 0.0
        self.a2a_bytes = 0
        self.a2a_calls = 0

    def _on_logits(self, idx: int, logits: torch.Tensor) -> None:
        i = self.pos[idx]
        ent = router_entropy(logits).sum().double()
        self.ent_sum = self.ent_sum.to(ent.device)
        self.ent_sum[i] += ent
        self.ent_n[i] += logits.shape[0]

    def _on_dispatch(self, idx: int, dispatched: torch.Tensor) -> None:
        if self.ep_size > 1:  # with ep_size 1 no all-to-all runs
            self.a2a_bytes += 2 * dispatched.numel() * dispatched.element_size()
            self.a2a_calls += 2

    def on_micro_step(self, exp_counts: tuple[torch.Tensor, ...] | None) -> None:
        """Add one training forward's routing choices (before capacity dropping)."""
        if not exp_counts:
            return
        counts = torch.stack([c.detach().double() for c in exp_counts])
        self.counts = self.counts.to(counts.device) + counts
        if self.drop_tokens:
            self.dropped = self.dropped.to(counts.device) + dropped_tokens(counts, self.cap)

    def on_step(self) -> None:
        """Read and reset the forward timers (and the backward all-to-all time)."""
        for idx, ms in moe_layers.read_and_reset_moe_timers(self.model).items():
            row = self.ms[self.pos[idx]]
            for k, key in enumerate(TIMER_KEYS):
                row[k] += ms[key]
        self.bwd_ms += moe_layers.read_and_reset_backward_a2a_ms()

    def vector(self) -> torch.Tensor:
        """This rank's window as one float64 vector (layout read back by `metrics`)."""
        head = [x for row in self.ms for x in row] + [self.bwd_ms, self.a2a_bytes, self.a2a_calls]
        parts = [
            torch.tensor(head, dtype=torch.float64),
            self.counts.cpu().flatten(),
            self.dropped.cpu(),
            self.ent_sum.cpu(),
            torch.tensor(self.ent_n, dtype=torch.float64),
        ]
        return torch.cat(parts)

    def metrics(self, ranks: torch.Tensor, steps: int, step_ms: float) -> dict[str, Any]:
        """Metrics from the (world, n) gathered vectors of a window of `steps` steps."""
        n_layers, n_exp, n_t = len(self.layers), self.num_experts, len(TIMER_KEYS)
        steps = max(steps, 1)
        timers = ranks[:, : n_layers * n_t].reshape(-1, n_layers, n_t) / steps  # ms per step
        o = n_layers * n_t
        bwd, a2a_bytes, calls = ranks[:, o] / steps, ranks[:, o + 1], ranks[:, o + 2]
        o += 3
        counts = ranks[:, o : o + n_layers * n_exp].reshape(-1, n_layers, n_exp).sum(0)
        o += n_layers * n_exp
        dropped = ranks[:, o : o + n_layers].sum(0)
        ent_sum = ranks[:, o + n_layers : o + 2 * n_layers].sum(0)
        ent_n = ranks[:, o + 2 * n_layers : o + 3 * n_layers].sum(0)
        a2a = timers[..., 0] + timers[..., 1]  # (world, layers)
        fwd_a2a = a2a.sum(-1)
        gbps = a2a_bytes * 8 / (fwd_a2a * steps / 1e3).clamp_min(1e-9) / 1e9
        m: dict[str, Any] = {
            "moe/a2a_ms": float(fwd_a2a.max()),
            "moe/a2a_ms_mean": float(fwd_a2a.mean()),
            "moe/a2a_bwd_ms": float(bwd.max()),
            "moe/a2a_fraction": float((fwd_a2a + bwd).max()) / step_ms if step_ms > 0 else 0.0,
            "moe/a2a_bytes": float((a2a_bytes / calls.clamp_min(1)).mean()),
            "moe/a2a_gbps": float(gbps.mean()),
            "moe/dead_experts": float((counts == 0).sum()),
        }
        total = counts.sum(-1)
        shares = counts / total.clamp_min(1).unsqueeze(-1)
        cv, mom = load_cv(counts), max_over_mean(counts)
        for i, idx in enumerate(self.layers):
            p = f"moe/layer_{idx}"
            m[f"{p}/a2a_ms"] = float(a2a[:, i].max())
            m[f"{p}/gate_ms"] = float(timers[:, i, 2].mean())
            expert = timers[:, i, 3] - timers[:, i, 0] - timers[:, i, 1] - timers[:, i, 2]
            m[f"{p}/expert_ms"] = float(expert.mean())
            m[f"{p}/load_cv"] = float(cv[i])
            m[f"{p}/load_max_over_mean"] = float(mom[i])
            m[f"{p}/drop_fraction"] = float(dropped[i] / total[i].clamp_min(1))
            m[f"{p}/router_entropy"] = float(ent_sum[i] / ent_n[i].clamp_min(1))
            m[f"{p}/tokens"] = float(total[i])
            for e in range(n_exp):
                m[f"{p}/expert_{e}_share"] = float(shares[i, e])
        m["_shares"] = shares
        return m

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        moe_layers.disable_moe_timers(self.model)
