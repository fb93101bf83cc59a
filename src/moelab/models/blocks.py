"""Transformer blocks and the registry that maps `ModelConfig.ffn` to a block builder.

Every block's forward returns a `BlockOutput`: hidden states, the MoE layer's load-balancing
loss and router z-loss (zeros in a dense block) and its tokens per expert (None if dense).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .configuration import MoelabLMConfig
from .layers import CausalSelfAttention, SwiGLU, build_norm
from .moe_torch import MoEOutput, TorchMoE, TorchMoEFFN


class BlockOutput(NamedTuple):
    """A block's forward: hidden states, l_aux, router z-loss, exp_counts (None: dense)."""

    hidden: torch.Tensor
    l_aux: torch.Tensor
    z_loss: torch.Tensor
    exp_counts: torch.Tensor | None


@dataclass(frozen=True)
class BlockSpec:
    """Everything a block builder needs: the model config and where this block lives."""

    cfg: MoelabLMConfig
    layer_idx: int
    ep_size: int = 1
    ep_rank: int = 0
    seed: int = 0


def build_moe_ffn(spec: BlockSpec, use_residual: bool = False) -> nn.Module:
    """DeepSpeed's MoE layer (`moe_impl: deepspeed`) or its pure-torch eval twin (`torch`)."""
    cfg = spec.cfg
    if cfg.moe_impl == "torch":
        layer = TorchMoE(
            cfg.d_model,
            lambda: SwiGLU(cfg.d_model, cfg.expert_hidden),
            cfg.moe_num_experts * cfg.moe_granularity,
            cfg.moe_top_k * cfg.moe_granularity,
            cfg.moe_eval_capacity_factor,
            cfg.moe_min_capacity,
            cfg.moe_drop_tokens,
            use_residual,
        )
        return TorchMoEFFN(spec.layer_idx, layer)
    try:  # an exported copy of this file has no moelab: it only builds moe_impl="torch"
        from moelab.ds_moe import MoEFFN
    except ImportError as err:
        raise ImportError(
            "moe_impl='deepspeed' needs moelab and DeepSpeed installed; load with moe_impl='torch'."
        ) from err
    return MoEFFN(
        cfg.d_model,
        SwiGLU(cfg.d_model, cfg.expert_hidden),
        cfg.to_model_config().moe,
        layer_idx=spec.layer_idx,
        ep_size=spec.ep_size,
        ep_rank=spec.ep_rank,
        seed=spec.seed,
        init_std=cfg.init_std,
        use_residual=use_residual,
    )


class DenseBlock(nn.Module):
    """`h = x + Attn(LN1(x)); out = h + MLP(LN2(h))`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        h = x + self.attn(self.attn_norm(x))
        zero = x.new_zeros(())
        return BlockOutput(h + self.mlp(self.mlp_norm(h)), zero, zero, None)


class MoEBlock(nn.Module):
    """The dense block with its MLP replaced by DeepSpeed's MoE layer (or PR-MoE)."""

    def __init__(self, spec: BlockSpec, use_residual: bool = False) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.moe = build_moe_ffn(spec, use_residual=use_residual)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        h = x + self.attn(self.attn_norm(x))
        moe: MoEOutput = self.moe(self.mlp_norm(h))
        return BlockOutput(h + moe.out, moe.l_aux, moe.z_loss, moe.exp_counts)


class ArcticBlock(nn.Module):
    """`h = x + Attn(LN_in(x)); out = h + DenseMLP(LN_res(h)) + MoE(LN_moe(x))`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)
        self.moe_norm = build_norm(cfg)
        self.moe = build_moe_ffn(spec)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        # The MoE reads the block input, in parallel with attention and the dense MLP.
        moe: MoEOutput = self.moe(self.moe_norm(x))
        h = x + self.attn(self.attn_norm(x))
        out = h + self.mlp(self.mlp_norm(h)) + moe.out
        return BlockOutput(out, moe.l_aux, moe.z_loss, moe.exp_counts)


def _pr_moe_block(spec: BlockSpec) -> MoEBlock:
    return MoEBlock(spec, use_residual=True)


BLOCK_BUILDERS: dict[str, Callable[[BlockSpec], nn.Module]] = {
    "dense": DenseBlock,
    "moe": MoEBlock,
    "arctic": ArcticBlock,
    "pr_moe": _pr_moe_block,
}


def build_block(spec: BlockSpec) -> nn.Module:
    """The block of layer `spec.layer_idx`: dense unless `cfg.is_moe_layer(layer_idx)`."""
    cfg = spec.cfg
    if cfg.ffn not in BLOCK_BUILDERS:
        raise ValueError(f"unknown ffn {cfg.ffn!r}; known: {sorted(BLOCK_BUILDERS)}")
    kind = cfg.ffn if cfg.is_moe_layer(spec.layer_idx) else "dense"
    return BLOCK_BUILDERS[kind](spec)
