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
from .layers import AttnContext, CausalSelfAttention, SwiGLU, build_norm
from .moe_dropless import DroplessMoE, DroplessMoEFFN
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


def _torch_classic(spec: BlockSpec, use_residual: bool) -> nn.Module:
    cfg = spec.cfg
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


def _torch_dropless(spec: BlockSpec, use_residual: bool) -> nn.Module:
    cfg = spec.cfg
    g = cfg.moe_granularity
    block = DroplessMoE(cfg.d_model, cfg.expert_hidden, cfg.moe_num_experts * g, cfg.moe_top_k * g)
    return DroplessMoEFFN(spec.layer_idx, block)


def _deepspeed(spec: BlockSpec, use_residual: bool) -> nn.Module:
    cfg = spec.cfg
    try:  # an exported copy of this file has no moelab: it only builds moe_runtime="torch"
        from moelab.moe_impls import moe_impl
    except ImportError as err:
        raise ImportError(
            "moe_runtime='deepspeed' needs moelab and DeepSpeed installed; load with "
            "moe_runtime='torch'."
        ) from err
    return moe_impl(cfg.moe_impl).build_ffn(spec, use_residual)


MOE_FFN_BUILDERS: dict[tuple[str, str], Callable[[BlockSpec, bool], nn.Module]] = {
    ("torch", "classic"): _torch_classic,
    ("torch", "autoep"): _torch_dropless,
    ("deepspeed", "classic"): _deepspeed,
    ("deepspeed", "autoep"): _deepspeed,
}
"""(moe_runtime, moe_impl) -> the MoE FFN builder: training FFNs come from moelab's MoE
implementations (`moelab.moe_impls`), inference ones are pure torch."""


def build_moe_ffn(spec: BlockSpec, use_residual: bool = False) -> nn.Module:
    """The MoE FFN of `spec`'s block for its config's runtime and MoE implementation."""
    key = (spec.cfg.moe_runtime, spec.cfg.moe_impl)
    if key not in MOE_FFN_BUILDERS:
        raise ValueError(f"(moe_runtime, moe_impl)={key} is not one of {sorted(MOE_FFN_BUILDERS)}.")
    return MOE_FFN_BUILDERS[key](spec, use_residual)


def run_moe(moe: nn.Module, x: torch.Tensor, ctx: AttnContext | None) -> MoEOutput:
    """The MoE FFN on x; the token mask (padding excluded from routing) only when there is
    one, so the training FFNs are called exactly as before."""
    if ctx is None or ctx.token_mask is None:
        out: MoEOutput = moe(x)
    else:
        out = moe(x, ctx.token_mask)
    return out


class DenseBlock(nn.Module):
    """`h = x + Attn(LN1(x)); out = h + MLP(LN2(h))`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg, spec.layer_idx)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> BlockOutput:
        h = x + self.attn(self.attn_norm(x), ctx)
        zero = x.new_zeros(())
        return BlockOutput(h + self.mlp(self.mlp_norm(h)), zero, zero, None)


class MoEBlock(nn.Module):
    """The dense block with its MLP replaced by DeepSpeed's MoE layer (or PR-MoE)."""

    def __init__(self, spec: BlockSpec, use_residual: bool = False) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg, spec.layer_idx)
        self.mlp_norm = build_norm(cfg)
        self.moe = build_moe_ffn(spec, use_residual=use_residual)

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> BlockOutput:
        h = x + self.attn(self.attn_norm(x), ctx)
        moe = run_moe(self.moe, self.mlp_norm(h), ctx)
        return BlockOutput(h + moe.out, moe.l_aux, moe.z_loss, moe.exp_counts)


class ArcticBlock(nn.Module):
    """`h = x + Attn(LN_in(x)); out = h + DenseMLP(LN_res(h)) + MoE(LN_moe(x))`."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        cfg = spec.cfg
        self.attn_norm = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg, spec.layer_idx)
        self.mlp_norm = build_norm(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)
        self.moe_norm = build_norm(cfg)
        self.moe = build_moe_ffn(spec)

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> BlockOutput:
        # The MoE reads the block input, in parallel with attention and the dense MLP.
        moe = run_moe(self.moe, self.moe_norm(x), ctx)
        h = x + self.attn(self.attn_norm(x), ctx)
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
