"""The dropless MoE block (`moe_impl: autoep`): a router and fused experts, no capacity.

Its layout is the one DeepSpeed's AutoEP reads and replaces (custom patterns, `fused_3d`
storage): `gate` is a `Linear(d_model, experts)` without bias and `experts` holds
`gate_up_proj` (E, 2H, D), gate rows first then up rows, and `down_proj` (E, D, H), as in
transformers' Mixtral. Under DeepSpeed this module is only the source of AutoEP's layer; its
own forward is the same computation in pure torch with every expert local (an exported
model, or inference): fp32 softmax over the router logits, the top k experts of every token,
their weights renormalised over the k when k > 1 (GShard/Mixtral) and not when k = 1
(Switch), nothing dropped.

The load-balancing loss is DeepSpeed's classic one for the same k, so both implementations
train on the same objective: `E * sum(mean prob x fraction of first choices)` for k <= 2 and
`E^2 / k * mean(mean prob x fraction of routes)` above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe_torch import MoEOutput, router_z_loss


def routes_per_expert(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the routes `expert` (any shape, expert ids) go to each expert: (E,) int32,
    computed on the device without a host sync (unlike `torch.bincount`)."""
    flat = expert.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def load_balancing_loss(logits: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """deepspeed.moe's l_aux for top-k routing, from the router logits (S, E) and the routes
    per expert (E,) of the same tokens."""
    probs = F.softmax(logits.float(), dim=-1)
    num_tokens, num_experts = probs.shape
    me = probs.mean(dim=0)  # (E,) mean router probability
    if k <= 2:  # top1gating / top2gating: the fraction of tokens whose first choice is e
        first = routes_per_expert(probs.argmax(dim=-1), num_experts)
        return torch.sum(me * first.float() / num_tokens) * num_experts
    ce = counts.float() / num_tokens
    return torch.mean(me * ce) * num_experts * num_experts / k


def routing_losses(
    logits: torch.Tensor, counts: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_aux, router z-loss) of one MoE forward: logits (S, E), routes per expert (E,)."""
    return load_balancing_loss(logits, counts, k), router_z_loss(logits)


def top_k_routes(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, expert) of each token's k routes, both (S, k): AutoEP's token-choice router
    with softmax scores applied after the experts, renormalised over the k when k > 1."""
    probs = F.softmax(logits.float(), dim=-1)
    weight, expert = torch.topk(probs, k=k, dim=-1)
    if k > 1:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    return weight, expert


class FusedExperts(nn.Module):
    """E SwiGLU experts as two 3-D parameters (the layout AutoEP's `fused_3d` storage reads)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on its tokens x (n, D) -> (n, D)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).split(self.hidden, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])


class DroplessMoE(nn.Module):
    """Router and experts; forward: top-k routing with nothing dropped, all experts local."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, d_model, hidden)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        """Route x (..., D); tokens where `token_mask` (x's leading shape) is False (padding)
        go to no expert, are not counted and get a zero output."""
        tokens = x.reshape(-1, x.shape[-1])  # (S, D)
        logits = self.gate(tokens).float()  # (S, E), in x's dtype then fp32, as AutoEP
        weight, expert = top_k_routes(logits, self.k)  # (S, k) each
        num_experts = logits.shape[-1]
        if token_mask is not None:  # expert id E: no expert (the loop below never reaches it)
            real = token_mask.reshape(-1, 1)
            expert = torch.where(real, expert, torch.full_like(expert, num_experts))
        counts = routes_per_expert(expert, num_experts + 1)[:num_experts]
        out = torch.zeros_like(tokens, dtype=torch.float32)
        for e in range(logits.shape[-1]):
            token, slot = torch.nonzero(expert == e, as_tuple=True)
            if token.numel():
                y = self.experts.expert(e, tokens[token]).float()
                out.index_add_(0, token, y * weight[token, slot].unsqueeze(-1))
        l_aux, z_loss = routing_losses(logits, counts, self.k)
        return MoEOutput(out.to(x.dtype).reshape(x.shape), l_aux, z_loss, counts)


class DroplessMoEFFN(nn.Module):
    """`DroplessMoE` under the name the training FFN gives it (`block`), so a trained model's
    state dict loads as it is (`moe_runtime: torch`)."""

    def __init__(self, layer_idx: int, block: DroplessMoE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block = block

    @property
    def gate(self) -> nn.Linear:
        return self.block.gate

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        out: MoEOutput = self.block(x, token_mask)
        return out
