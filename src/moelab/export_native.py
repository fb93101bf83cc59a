"""Native Hugging Face classes for moelab models that are exactly one of transformers' own.

`native_arch(config)` decides, by rule, whether a model is mathematically Llama (dense,
RMSNorm), Mixtral (MoE in every block, RMSNorm, top-k >= 2 with the weights renormalised over
the k, dropless) or OLMo (dense, parameter-free LayerNorm), and says why (or why not) in one
sentence. `ARCHITECTURES` maps each architecture name to its config fields and its state-dict
renaming; `native_model` builds that class with the renamed weights (strict load), so its
`save_pretrained` writes the class's own config and checkpoint layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from moelab.models import MoelabForCausalLM, MoelabLMConfig
from moelab.models.layers import NORM_EPS

State = dict[str, torch.Tensor]


def _common(cfg: MoelabLMConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "attention_bias": False,
        "use_cache": True,
    }


def llama_config(cfg: MoelabLMConfig) -> dict[str, Any]:
    return _common(cfg) | {"intermediate_size": cfg.mlp_hidden, "rms_norm_eps": NORM_EPS}


def olmo_config(cfg: MoelabLMConfig) -> dict[str, Any]:
    out = _common(cfg) | {"intermediate_size": cfg.mlp_hidden, "clip_qkv": None}
    del out["head_dim"]
    return out


def mixtral_config(cfg: MoelabLMConfig) -> dict[str, Any]:
    out = _common(cfg) | {"intermediate_size": cfg.expert_hidden, "rms_norm_eps": NORM_EPS}
    del out["attention_bias"]
    g = cfg.moe_granularity
    return out | {
        "num_local_experts": cfg.moe_num_experts * g,
        "num_experts_per_tok": cfg.moe_top_k * g,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
    }


def _split_swiglu(prefix: str, fused: torch.Tensor) -> State:
    # moelab's dense SwiGLU rows are [up; gate]
    up, gate = fused.chunk(2, dim=0)
    return {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up}


_COMMON_KEYS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _rename_block(key: str, tensor: torch.Tensor) -> State | None:
    """Keys shared by all three classes: attention projections, embeddings, head, norms."""
    key = key.replace(".attn.", ".self_attn.")
    for ours, theirs in _COMMON_KEYS.items():
        key = key.replace(f".{ours}.", f".{theirs}.")
    return {key: tensor}


def dense_state(state: State, cfg: MoelabLMConfig) -> State:
    """A dense model's weights under Llama's / OLMo's names (gate/up split out)."""
    out: State = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"(.+)\.mlp\.gate_up_proj\.weight", key):
            out |= _split_swiglu(f"{m[1]}.mlp", tensor)
        else:
            out |= _rename_block(key, tensor) or {}
    return out


def _classic_experts(state: State, block: str, n: int) -> State:
    ex = f"{block}.moe.layer.deepspeed_moe.experts.deepspeed_experts"
    gate_up, down = [], []
    for e in range(n):
        up, gate = state[f"{ex}.{e}.gate_up_proj.weight"].chunk(2, dim=0)
        gate_up.append(torch.cat((gate, up)))
        down.append(state[f"{ex}.{e}.down_proj.weight"])
    return {
        f"{block}.mlp.gate.weight": state[f"{block}.moe.layer.deepspeed_moe.gate.wg.weight"],
        f"{block}.mlp.experts.gate_up_proj": torch.stack(gate_up),  # (E, 2H, D) [gate; up]
        f"{block}.mlp.experts.down_proj": torch.stack(down),  # (E, D, H)
    }


def mixtral_state(state: State, cfg: MoelabLMConfig) -> State:
    """An MoE model's weights under Mixtral's names (router, fused 3-D experts)."""
    n = cfg.moe_num_experts * cfg.moe_granularity
    out: State = {}
    for i in range(cfg.n_layers):
        block = f"model.layers.{i}"
        if cfg.moe_impl == "classic":
            out |= _classic_experts(state, block, n)
        else:
            out[f"{block}.mlp.gate.weight"] = state[f"{block}.moe.block.gate.weight"]
            for w in ("gate_up_proj", "down_proj"):
                out[f"{block}.mlp.experts.{w}"] = state[f"{block}.moe.block.experts.{w}"]
    for key, tensor in state.items():
        if ".moe." not in key:
            out |= _rename_block(key, tensor) or {}
    return out


@dataclass(frozen=True)
class Architecture:
    """One native class: its model_type, config fields and state-dict renaming."""

    model_type: str
    config: Callable[[MoelabLMConfig], dict[str, Any]]
    state: Callable[[State, MoelabLMConfig], State]
    norm_weights: bool


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", llama_config, dense_state, True),
    "MixtralForCausalLM": Architecture("mixtral", mixtral_config, mixtral_state, True),
    "OlmoForCausalLM": Architecture("olmo", olmo_config, dense_state, False),
}
"""Architecture name -> how a moelab model becomes that transformers class."""


def _moe_refusal(cfg: MoelabLMConfig) -> str | None:
    k = cfg.moe_top_k * cfg.moe_granularity
    if cfg.ffn != "moe":
        return f"ffn={cfg.ffn} has no transformers class (its extra dense path or residual mix)"
    if cfg.norm != "rmsnorm":
        return f"an MoE model with norm={cfg.norm} is no transformers class (Mixtral uses RMSNorm)"
    if cfg.moe_layer_frequency != 1:
        return "moe_layer_frequency > 1 mixes dense and MoE blocks, which Mixtral does not"
    if k < 2:
        return (
            "top-1 routing weights a token by its router probability, while Mixtral "
            "renormalises the top-k weights to sum to 1"
        )
    return None


def native_arch(cfg: MoelabLMConfig) -> tuple[str | None, str]:
    """(architecture name or None, one sentence saying why) for the exported model `cfg`."""
    if cfg.is_moe:
        refusal = _moe_refusal(cfg)
        if refusal:
            return None, f"{refusal}."
        k = cfg.moe_top_k * cfg.moe_granularity
        return "MixtralForCausalLM", (
            f"a top-{k} MoE in every block with RMSNorm, renormalised top-k weights and "
            "dropless routing is exactly Mixtral."
        )
    if cfg.norm == "rmsnorm":
        return "LlamaForCausalLM", "a dense model with RMSNorm and SwiGLU is exactly Llama."
    if not cfg.norm_affine:
        return "OlmoForCausalLM", (
            "a dense model with parameter-free LayerNorm and SwiGLU is exactly OLMo."
        )
    return None, "LayerNorm with a learned weight has no transformers class (OLMo's has none)."


def native_model(model: MoelabForCausalLM, arch_name: str) -> PreTrainedModel:
    """The transformers `arch_name` model holding `model`'s weights (strict load)."""
    cfg = model.config
    arch = ARCHITECTURES[arch_name]
    config = AutoConfig.for_model(arch.model_type, **arch.config(cfg))
    config.architectures = [arch_name]
    state = arch.state(dict(model.state_dict()), cfg)
    if arch.norm_weights:  # affine-free RMSNorm == RMSNorm with ones as weight
        for key in [k for k in _norm_keys(cfg) if k not in state]:
            state[key] = torch.ones(cfg.d_model, dtype=model.dtype, device=model.device)
    with no_init_weights():
        native = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    native.load_state_dict(state, strict=True)
    native.tie_weights()
    return native.eval()


def _norm_keys(cfg: MoelabLMConfig) -> list[str]:
    names = ("input_layernorm", "post_attention_layernorm")
    keys = [f"model.layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in names]
    return [*keys, "model.norm.weight"]
