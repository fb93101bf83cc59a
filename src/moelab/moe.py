"""DeepSpeed's MoE layer as moelab uses it: the only module that imports `deepspeed.moe`.

`MoEFFN` wraps `deepspeed.moe.layer.MoE` (so DeepSpeed still finds its MoE modules for
process groups, expert parameter groups and expert checkpoint shards) and fixes two things:
experts start independent (seeded by their global id, whatever ep_size), and top-2's Gumbel
sampling of the second expert (and top-1's random token selection) only happen in training.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from moelab.config import MoEConfig

_SEED_MIX = 1_000_003


def ep_rank_of(global_rank: int, ep_size: int) -> int:
    """Rank inside its expert-parallel group (EP groups are consecutive blocks of ranks)."""
    return global_rank % ep_size


def expert_seed(seed: int, layer_idx: int, global_expert: int) -> int:
    """Seed of one expert's initial weights: independent of ep_size and of the rank."""
    return ((seed * _SEED_MIX + layer_idx) * _SEED_MIX + global_expert) % (2**63)


def build_deepspeed_moe(
    d_model: int, expert: nn.Module, moe_cfg: MoEConfig, ep_size: int, use_residual: bool
) -> MoE:
    """DeepSpeed's MoE layer with every knob of `MoEConfig` (no process group is created)."""
    return MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=moe_cfg.num_experts,
        ep_size=ep_size,
        k=moe_cfg.top_k,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        min_capacity=moe_cfg.min_capacity,
        use_residual=use_residual,
        noisy_gate_policy=moe_cfg.noisy_gate_policy,
        drop_tokens=moe_cfg.drop_tokens,
        use_rts=moe_cfg.use_rts,
        top2_2nd_expert_sampling=moe_cfg.top2_2nd_expert_sampling,
    )


class MoEFFN(nn.Module):
    """`deepspeed.moe.layer.MoE` built from `MoEConfig`; forward gives (out, l_aux, exp_counts)."""

    def __init__(
        self,
        d_model: int,
        expert: nn.Module,
        moe_cfg: MoEConfig,
        *,
        layer_idx: int,
        ep_size: int = 1,
        ep_rank: int = 0,
        seed: int = 0,
        init_std: float = 0.02,
        use_residual: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ep_rank = ep_rank
        self.top2_sampling = moe_cfg.top2_2nd_expert_sampling
        self.use_rts = moe_cfg.use_rts
        self.layer = build_deepspeed_moe(d_model, expert, moe_cfg, ep_size, use_residual)
        self.reset_experts(seed, init_std)
        self.train(self.training)

    @property
    def gate(self) -> TopKGate:
        return self.layer.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.layer.deepspeed_moe.experts.deepspeed_experts

    def global_expert_id(self, local_idx: int) -> int:
        return self.ep_rank * self.layer.num_local_experts + local_idx

    @torch.no_grad()
    def reset_experts(self, seed: int, std: float) -> None:
        """Draw every local expert's weights from its own generator (global id, layer, seed)."""
        # DeepSpeed's Experts deep-copies one module, so all experts would start identical.
        for local_idx, expert in enumerate(self.local_experts):
            params = list(expert.parameters())
            if any(p.device.type == "meta" for p in params):
                continue
            gen = torch.Generator().manual_seed(
                expert_seed(seed, self.layer_idx, self.global_expert_id(local_idx))
            )
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            # transformers' post_init must not redraw these from the global RNG.
            for m in expert.modules():
                m._is_hf_initialized = True  # type: ignore[assignment]

    def train(self, mode: bool = True) -> MoEFFN:
        super().train(mode)
        # DeepSpeed samples top-2's 2nd expert (and top-1's drop priority) in eval too.
        self.gate.top2_2nd_expert_sampling = mode and self.top2_sampling
        self.gate.use_rts = mode and self.use_rts
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, l_aux, exp_counts = self.layer(x)
        return out, l_aux, exp_counts


def iter_moe_layers(model: nn.Module) -> Iterator[tuple[int, MoE]]:
    """(block index, DeepSpeed MoE module) for every MoE layer of `model`, in order."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            yield module.layer_idx, module.layer


def moe_gates(model: nn.Module) -> dict[int, TopKGate]:
    """Block index -> that layer's `TopKGate` (`.deepspeed_moe.gate`)."""
    return {idx: moe.deepspeed_moe.gate for idx, moe in iter_moe_layers(model)}
