"""`MoelabForCausalLM`: embedding, blocks chosen by `ffn`, final norm, (tied) LM head."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .blocks import BlockOutput, BlockSpec, build_block
from .configuration import MoelabLMConfig
from .layers import AttnContext, build_norm
from .shapes import LOSS_CHUNK_ELEMENTS

IGNORE_INDEX = -100


@dataclass
class MoelabCausalLMOutput(ModelOutput):
    """`loss = lm_loss + aux weight * aux_loss + z_loss_coeff * z_loss` (the aux weight is
    aux_loss_coeff under balance=aux, else 0); `aux_loss` sums
    l_aux and `z_loss` the router z-loss over MoE layers."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exp_counts: tuple[torch.Tensor, ...] | None = None
    past_key_values: Any = None


class BackboneOutput(NamedTuple):
    """The final-norm hidden states and, per MoE layer in order, l_aux, z-loss, exp_counts."""

    hidden: torch.Tensor
    aux: list[torch.Tensor]
    z_loss: list[torch.Tensor]
    exp_counts: list[torch.Tensor]


class MoelabBackbone(nn.Module):
    """Token embedding, the blocks and the final norm."""

    def __init__(self, cfg: MoelabLMConfig, ep_size: int, ep_rank: int, seed: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            build_block(BlockSpec(cfg, i, ep_size=ep_size, ep_rank=ep_rank, seed=seed))
            for i in range(cfg.n_layers)
        )
        self.norm = build_norm(cfg)

    def forward(self, input_ids: torch.Tensor, ctx: AttnContext | None = None) -> BackboneOutput:
        h = self.embed_tokens(input_ids)  # (B, T, D)
        out = BackboneOutput(h, [], [], [])
        for block in self.layers:
            b: BlockOutput = block(h) if ctx is None else block(h, ctx)
            h = b.hidden
            if b.exp_counts is not None:
                out.aux.append(b.l_aux)
                out.z_loss.append(b.z_loss)
                out.exp_counts.append(b.exp_counts)
        return out._replace(hidden=self.norm(h))


class MoelabForCausalLM(PreTrainedModel, GenerationMixin):
    """Decoder-only LM in OLMo's conventions with a dense, MoE, Arctic or PR-MoE FFN."""

    config_class = MoelabLMConfig
    config: MoelabLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    _supports_sdpa = True

    def __init__(self, config: MoelabLMConfig, ep_rank: int = 0, seed: int = 0) -> None:
        super().__init__(config)
        self.model = MoelabBackbone(config, config.ep_size, ep_rank, seed)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> MoelabCausalLMOutput:
        """Causal LM over `input_ids` (B, T) after the `past_key_values` cache holds (extended
        in place when `use_cache`); `attention_mask` (B, past + T) marks the real tokens (1)
        and padding (0), left or right. With none of these it is the training forward."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + input_ids.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + input_ids.shape[-1]} > max_seq_len")
        ctx = None
        if attention_mask is not None or position_ids is not None or past_key_values is not None:
            ctx = attn_context(input_ids, attention_mask, position_ids, past_key_values, past)
        h, aux, z, counts = self.model(input_ids, ctx)
        logits = self.lm_head(h)  # (B, T, V)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = torch.stack(aux).sum() if aux else zero
        z_loss = torch.stack(z).sum() if z else zero
        lm_loss = loss = None
        if labels is not None:
            lm_loss = shifted_cross_entropy(logits, labels)
            loss = lm_loss + self.config.moe_aux_weight * aux_loss
            if self.config.moe_z_loss_coeff:
                loss = loss + self.config.moe_z_loss_coeff * z_loss
        return MoelabCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            exp_counts=tuple(counts),
            past_key_values=past_key_values,
        )


def attn_context(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Any,
    past: int,
) -> AttnContext:
    """Positions, SDPA mask and MoE token mask of T new tokens after `past` cached ones.

    Positions count the real tokens before each one (a left-padded row gets the positions of
    the same row unpadded). The mask lets query i see key j when j is a real token at or
    before it, and always itself: a padded query would otherwise see no key (SDPA: NaN)."""
    b, t = input_ids.shape
    dev = input_ids.device
    if attention_mask is not None and attention_mask.shape[-1] != past + t:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns for {past} cached and {t} "
            "new tokens; pass one column per cached and new token."
        )
    if position_ids is None:
        if attention_mask is None:
            position_ids = torch.arange(past, past + t, device=dev).expand(b, t)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
    if attention_mask is None and (past == 0 or t == 1):
        return AttnContext(position_ids, None, cache, None)
    q_pos = torch.arange(past, past + t, device=dev).unsqueeze(-1)  # (T, 1)
    k_pos = torch.arange(past + t, device=dev)  # (K,)
    allowed = (k_pos <= q_pos).expand(b, 1, t, past + t)
    token_mask = None
    if attention_mask is not None:
        real = attention_mask.bool()
        allowed = allowed & real[:, None, None, :]
        token_mask = real[:, past:]
    return AttnContext(position_ids, allowed | (k_pos == q_pos), cache, token_mask)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss: position t predicts labels[t + 1]; -100 is ignored.

    Always computed in fp32. Lower-precision (bf16/fp16) logits are upcast one chunk of rows
    at a time, each chunk recomputed in backward (activation checkpointing): no fp32 copy or
    fp32 log-softmax of all B x T x V logits is ever alive, only one chunk's. fp32 logits need
    no copy and take PyTorch's loss as it is (a recompute would cost time for no memory)."""
    vocab = logits.shape[-1]
    # Shift the labels, not the logits: logits[:, :-1] would copy all of them.
    target = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = logits.reshape(-1, vocab)  # (B*T, V), a view
    if logits.dtype == torch.float32:
        return F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX)
    rows = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    loss_of = partial(checkpoint, _chunk_loss, use_reentrant=False) if recompute else _chunk_loss
    chunks = [loss_of(flat[i : i + rows], target[i : i + rows]) for i in range(0, len(flat), rows)]
    return torch.stack(chunks).sum() / (target != IGNORE_INDEX).sum().clamp_min(1)


def _chunk_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
