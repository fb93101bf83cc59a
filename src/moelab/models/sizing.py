"""Parameter counts of a config, read off the real modules built on the meta device."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from accelerate import init_empty_weights
from torch import nn
from transformers.initialization import no_init_weights

from moelab.config import ModelConfig
from moelab.ds_moe import iter_moe_layers
from moelab.models.build import build_model

_PARTS = ("embedding", "lm_head", "attention", "dense_ffn", "experts", "router", "norms")


@dataclass(frozen=True)
class ParamCount:
    """Total and per-token active parameters, with a breakdown that sums to `total`.

    `active` is `total` minus the (total_experts - active_experts) experts a token does not use in
    each MoE layer; embedding and router count as active. `other` holds what no other
    part claims (PR-MoE's mixing coefficient).
    """

    total: int
    active: int
    embedding: int = 0
    lm_head: int = 0
    attention: int = 0
    dense_ffn: int = 0
    experts: int = 0
    router: int = 0
    norms: int = 0
    other: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _part_of(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    checks = {
        ".deepspeed_experts.": "experts",
        ".gate.wg.": "router",
        ".attn.": "attention",
        ".mlp.": "dense_ffn",
        "norm.": "norms",
    }
    return next((part for key, part in checks.items() if key in name), "other")


def _inactive_expert_params(model: nn.Module, cfg: ModelConfig) -> int:
    unused = 0
    for _, moe in iter_moe_layers(model):
        layer = sum(p.numel() for p in moe.deepspeed_moe.experts.parameters())
        unused += (cfg.moe.total_experts - cfg.moe.active_experts) * layer // moe.num_local_experts
    return unused


def count_model_params(model: nn.Module, cfg: ModelConfig, ep_size: int = 1) -> ParamCount:
    """Global counts of a built model; with ep_size > 1 it holds 1/ep_size of the experts."""
    parts = dict.fromkeys((*_PARTS, "other"), 0)
    for name, p in model.named_parameters():  # tied weights are listed once
        part = _part_of(name)
        parts[part] += p.numel() * (ep_size if part == "experts" else 1)
    total = sum(parts.values())
    return ParamCount(total=total, active=total - _inactive_expert_params(model, cfg), **parts)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Build `cfg` on the meta device and count its parameters.

    It is built as one EP rank of ep_size = num_experts (one expert per MoE layer) and its
    experts are counted num_experts times: DeepSpeed's experts are copies of one module, and
    building arctic_480b's 4,480 experts would take most of the planner's time budget.
    """
    ep = cfg.moe.num_experts if cfg.is_moe else 1
    # Random init on meta tensors runs through slow Python decompositions: skip it.
    with init_empty_weights(), no_init_weights():
        model = build_model(cfg, ep_size=ep)
    model.tie_weights()  # init_empty_weights re-creates every registered parameter: tie after it
    return count_model_params(model, cfg, ep_size=ep)
