"""Parameter counts of a config, read off the real modules built on the meta device."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from accelerate import init_empty_weights
from torch import nn
from transformers.initialization import no_init_weights

from moelab.config import ModelConfig
from moelab.models.build import build_model
from moelab.moe_impls import all_moe_ffns

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


def _moe_roles(model: nn.Module, cfg: ModelConfig, ep_size: int) -> dict[int, tuple[str, int]]:
    """id(parameter) -> ('experts', how many copies of it the model's experts make) or
    ('router', 1), for every MoE FFN of `model`, whichever implementation (`expert_params()`
    and `gate`)."""
    per_expert = 3 * cfg.d_model * cfg.expert_hidden  # one SwiGLU expert
    total = cfg.moe.total_experts
    roles: dict[int, tuple[str, int]] = {}
    for ffn in all_moe_ffns(model):
        params = ffn.expert_params()
        local = sum(p.numel() for p in params) // per_expert  # experts this build holds
        if local not in (total, total // ep_size):
            raise ValueError(
                f"MoE layer {ffn.layer_idx} holds {local} experts, neither all {total} nor "
                f"1/{ep_size} of them; pass the ep_size the model was built for."
            )
        roles |= {id(p): ("experts", total // local) for p in params}
        roles |= {id(p): ("router", 1) for p in ffn.gate.parameters()}
    return roles


def _part_of(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    checks = {".attn.": "attention", ".mlp.": "dense_ffn", "norm.": "norms"}
    return next((part for key, part in checks.items() if key in name), "other")


def count_model_params(model: nn.Module, cfg: ModelConfig, ep_size: int = 1) -> ParamCount:
    """Global counts of a model built for `ep_size`: a layer holding 1/ep_size of the experts
    (a classic or AutoEP-replaced rank) counts them ep_size times, one holding all of them
    (AutoEP's block before `deepspeed.initialize`) once."""
    parts = dict.fromkeys((*_PARTS, "other"), 0)
    roles = _moe_roles(model, cfg, ep_size)
    for name, p in model.named_parameters():  # tied weights are listed once
        part, copies = roles.get(id(p), (_part_of(name), 1))
        parts[part] += p.numel() * copies
    total = sum(parts.values())
    moe = cfg.moe
    unused = (moe.total_experts - moe.active_experts) * parts["experts"] // moe.total_experts
    return ParamCount(total=total, active=total - unused, **parts)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Build `cfg` on the meta device and count its parameters.

    It is built as one EP rank of ep_size = num_experts (the classic layer then holds one
    expert per MoE layer, counted num_experts times: building arctic_480b's 4,480 experts one
    module each would take most of the planner's time budget; AutoEP's source block holds all
    of them in two 3-D parameters).
    """
    ep = cfg.moe.num_experts if cfg.is_moe else 1
    # Random init on meta tensors runs through slow Python decompositions: skip it.
    with init_empty_weights(), no_init_weights():
        model = build_model(cfg, ep_size=ep)
    model.tie_weights()  # init_empty_weights re-creates every registered parameter: tie after it
    return count_model_params(model, cfg, ep_size=ep)
