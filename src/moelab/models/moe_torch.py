"""A pure-torch twin of DeepSpeed's MoE layer in eval mode, for inference without DeepSpeed.

It needs no process group (all experts are local) and computes what `deepspeed.moe`'s
top-1/top-2/top-k gating computes outside training: softmax over the router logits in fp32,
the top expert(s) by argmax, top-2 weights renormalised over the two, no noise, no random
token selection, and the same capacity (`eval_capacity_factor`, `min_capacity`) with the same
positional drops; for k > 2 `topkgating` (drops by probability, weights renormalised over
the kept routes). An optional token mask (S,) excludes padding: a masked token takes no
slot, is not counted and gets a zero output. Module and parameter names mirror DeepSpeed's
(`layer.deepspeed_moe.gate.wg`, `...experts.deepspeed_experts.<e>`, `layer.mlp`,
`layer.coefficient`), so one state dict loads into either implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import expert_capacity


class MoEOutput(NamedTuple):
    """An MoE FFN's forward: output, load-balancing loss, router z-loss, tokens per expert."""

    out: torch.Tensor
    l_aux: torch.Tensor
    z_loss: torch.Tensor
    exp_counts: torch.Tensor


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; logits (tokens, E)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


Routes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(l_aux, expert index (k, S) with -1 for a dropped route, gate weight (k, S), exp_counts)."""
GateOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""`Routes` and the router z-loss of the same logits."""


def _keep(mask: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """A (S, E) route mask with the rows of masked-out tokens zeroed."""
    return mask if token_mask is None else mask * token_mask.unsqueeze(-1).to(mask.dtype)


def top1_routes(
    logits: torch.Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool,
    token_mask: torch.Tensor | None = None,
) -> Routes:  # fmt: skip
    """DeepSpeed's `top1gating` (eval mode, no RTS) on logits (S, E)."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    index = torch.argmax(gates, dim=1)
    mask = _keep(F.one_hot(index, num_classes=num_experts), token_mask)
    exp_counts = mask.sum(dim=0)
    if drop_tokens:
        capacity = expert_capacity(num_tokens, num_experts, 1, capacity_factor, min_capacity)
    else:
        capacity = int(exp_counts.max())
    l_aux = torch.sum(gates.mean(dim=0) * mask.float().mean(dim=0)) * num_experts
    # Same op as DeepSpeed on the same 0/1 tensor, so ties resolve to the same kept tokens.
    kept = torch.topk(mask, k=min(capacity, num_tokens), dim=0)[1]
    mask = mask * torch.zeros_like(mask).scatter_(0, kept, 1)
    index = torch.where(mask.any(dim=1), index, torch.full_like(index, -1))
    weight = (gates * mask).sum(dim=1)
    return l_aux, index.unsqueeze(0), weight.unsqueeze(0), exp_counts


def top2_routes(
    logits: torch.Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool,
    token_mask: torch.Tensor | None = None,
) -> Routes:  # fmt: skip
    """DeepSpeed's `top2gating` (eval mode, no 2nd-expert sampling) on logits (S, E)."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    index1 = torch.argmax(gates, dim=1)
    one_hot1 = F.one_hot(index1, num_classes=num_experts)
    index2 = torch.argmax(logits.masked_fill(one_hot1.bool(), float("-inf")), dim=1)
    mask1 = _keep(one_hot1, token_mask)
    mask2 = _keep(F.one_hot(index2, num_classes=num_experts), token_mask)
    # Slots fill in token order, first choices before second choices.
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * num_experts**2
    exp_counts = (mask1 + mask2).sum(dim=0)
    if drop_tokens:
        capacity = expert_capacity(num_tokens, num_experts, 2, capacity_factor, min_capacity)
        mask1 = mask1 * (loc1 < capacity)
        mask2 = mask2 * (loc2 < capacity)
    w1 = (gates * mask1.float()).sum(dim=1)
    w2 = (gates * mask2.float()).sum(dim=1)
    denom = torch.clamp(w1 + w2, min=torch.finfo(w1.dtype).eps)
    index1 = torch.where(mask1.any(dim=1), index1, torch.full_like(index1, -1))
    index2 = torch.where(mask2.any(dim=1), index2, torch.full_like(index2, -1))
    return l_aux, torch.stack([index1, index2]), torch.stack([w1 / denom, w2 / denom]), exp_counts


def topk_routes(
    logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
    token_mask: torch.Tensor | None = None,
) -> Routes:  # fmt: skip
    """DeepSpeed's `topkgating` (k > 2, drop_policy "probs") on logits (S, E): over capacity,
    an expert keeps its tokens of highest probability; weights renormalised over kept routes."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)  # (S, k)
    mask = _keep(torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, True), token_mask)
    exp_counts = mask.sum(dim=0)
    l_aux = torch.mean(gates.mean(dim=0) * mask.float().mean(dim=0)) * num_experts**2 / k
    if drop_tokens:
        capacity = expert_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)
        masked_gates = torch.zeros_like(gates).scatter(1, top_idx, top_gate) * mask
        # Same op as DeepSpeed on the same values, so ties resolve to the same kept tokens.
        kept = torch.topk(masked_gates, k=min(capacity, num_tokens), dim=0, sorted=False)[1]
        mask = mask & torch.zeros_like(mask).scatter_(0, kept, True)
    weights = gates * mask
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    route_kept = mask.gather(1, top_idx)
    index = torch.where(route_kept, top_idx, torch.full_like(top_idx, -1))
    return l_aux, index.t(), weights.gather(1, top_idx).t(), exp_counts


class TopKRouter(nn.Module):
    """The gate: `wg` (no bias) applied in fp32, then top-1, top-2 or top-k routes and the
    z-loss."""

    def __init__(
        self, d_model: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int,
        drop_tokens: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        if k < 1 or k > num_experts:
            raise ValueError(f"moe_top_k={k} must be between 1 and the {num_experts} experts.")
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        self.k, self.capacity_factor = k, capacity_factor
        self.min_capacity, self.drop_tokens = min_capacity, drop_tokens

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> GateOutput:
        logits = F.linear(x.float(), self.wg.weight.float())  # (S, E)
        args = (self.capacity_factor, self.min_capacity, self.drop_tokens, token_mask)
        if self.k == 1:
            out = top1_routes(logits, *args)
        elif self.k == 2:
            out = top2_routes(logits, *args)
        else:
            out = topk_routes(logits, self.k, *args)
        return (*out, router_z_loss(logits))


class ExpertList(nn.Module):
    """The experts (DeepSpeed's `Experts`, all of them local)."""

    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)


class RoutedExperts(nn.Module):
    """DeepSpeed's `MOELayer` without all-to-all: route, run each expert on its tokens, combine."""

    def __init__(self, gate: TopKRouter, experts: ExpertList) -> None:
        super().__init__()
        self.gate, self.experts = gate, experts

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        tokens = x.reshape(-1, x.shape[-1])  # (S, D)
        flat_mask = None if token_mask is None else token_mask.reshape(-1)
        l_aux, index, weight, exp_counts, z_loss = self.gate(tokens, flat_mask)
        routed = tokens.new_zeros((index.shape[0], *tokens.shape))  # (k, S, D)
        for e, expert in enumerate(self.experts.deepspeed_experts):
            route, token = torch.nonzero(index == e, as_tuple=True)
            if token.numel():
                routed[route, token] = expert(tokens[token])
        # Gate weights are fp32: weight and sum the routes in fp32, as DeepSpeed does.
        combined = (routed * weight.unsqueeze(-1)).sum(dim=0).to(x.dtype)
        return MoEOutput(combined.reshape(x.shape), l_aux, z_loss, exp_counts)


class TorchMoE(nn.Module):
    """`deepspeed.moe.layer.MoE` for inference: experts, plus PR-MoE's residual MLP and mix."""

    def __init__(
        self, d_model: int, make_expert: Callable[[], nn.Module], num_experts: int, k: int,
        eval_capacity_factor: float, min_capacity: int, drop_tokens: bool, use_residual: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        gate = TopKRouter(d_model, num_experts, k, eval_capacity_factor, min_capacity, drop_tokens)
        experts = ExpertList([make_expert() for _ in range(num_experts)])
        self.deepspeed_moe = RoutedExperts(gate, experts)
        self.use_residual = use_residual
        if use_residual:
            self.mlp = make_expert()
            self.coefficient = nn.Linear(d_model, 2)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        out, l_aux, z_loss, exp_counts = self.deepspeed_moe(x, token_mask)
        if self.use_residual:
            coef = F.softmax(self.coefficient(x), dim=-1)
            out = out * coef[..., 0:1] + self.mlp(x) * coef[..., 1:]
            if token_mask is not None:
                out = out * token_mask.unsqueeze(-1).to(out.dtype)
        return MoEOutput(out, l_aux, z_loss, exp_counts)


class TorchMoEFFN(nn.Module):
    """Same interface and state-dict keys as `moelab.ds_moe.MoEFFN`: forward gives a
    `MoEOutput`, always with eval-mode routing."""

    def __init__(self, layer_idx: int, layer: TorchMoE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer = layer

    @property
    def gate(self) -> TopKRouter:
        return self.layer.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        out: MoEOutput = self.layer(x, token_mask)
        return out
