"""Building blocks in OLMo's conventions: norm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MoelabLMConfig

NORM_EPS = 1e-5


def build_norm(cfg: MoelabLMConfig) -> nn.Module:
    """LayerNorm or RMSNorm; `norm_affine=False` gives a norm without any parameter."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(
            cfg.d_model, eps=NORM_EPS, elementwise_affine=cfg.norm_affine, bias=False
        )
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=NORM_EPS, elementwise_affine=cfg.norm_affine)
    raise ValueError(f"unknown norm {cfg.norm!r}")


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention); cos/sin are computed per call, so no buffers to load."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return emb.cos(), emb.sin()

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at explicit positions (B, T) -> (B, 1, T, head_dim) each."""
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            cos, sin = self.cos_sin(q.shape[-2], q.device)
        else:
            cos, sin = self.cos_sin_at(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class AttnContext(NamedTuple):
    """What inference adds to a forward: RoPE positions (B, T), the boolean SDPA mask
    (B, 1, T, K) (None: causal over the keys), the KV cache, and the MoE token mask (B, T)."""

    positions: torch.Tensor
    attn_mask: torch.Tensor | None
    cache: Any
    token_mask: torch.Tensor | None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention: `n_kv_heads` key/value heads shared by the query heads."""

    def __init__(self, cfg: MoelabLMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.rope = RotaryEmbedding(hd, cfg.rope_theta)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, head_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> torch.Tensor:
        """Causal attention over x (B, T, D); with `ctx`, at its positions, under its mask,
        after the keys and values its cache holds (which this call extends)."""
        b, t, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        gqa = self.n_kv_heads != self.n_heads
        if ctx is None:  # training: the whole sequence, causal
            q, k = self.rope(q, k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            q, k = self.rope(q, k, ctx.positions)
            if ctx.cache is not None:
                k, v = ctx.cache.update(k, v, self.layer_idx)
            causal = ctx.attn_mask is None and k.shape[-2] == t
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.attn_mask, is_causal=causal, enable_gqa=gqa
            )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP: fused gate+up `Linear(d, 2*hidden)`, output `Linear(hidden, d)`, no biases."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
