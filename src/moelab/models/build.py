"""`build_model`: a fresh `MoelabForCausalLM` for one rank of an expert-parallel layout."""

from __future__ import annotations

import torch

from moelab.config import ModelConfig
from moelab.models.configuration import MoelabLMConfig
from moelab.models.modeling import MoelabForCausalLM


def build_model(
    cfg: ModelConfig,
    ep_size: int = 1,
    ep_rank: int = 0,
    seed: int = 0,
    moe_runtime: str = "deepspeed",
) -> MoelabForCausalLM:
    """A freshly initialised model; non-expert weights depend on `seed` only, experts on their
    global id and `seed`, so every EP layout starts from the same weights."""
    torch.manual_seed(seed)
    config = MoelabLMConfig.from_model_config(cfg, ep_size=ep_size, moe_runtime=moe_runtime)
    return MoelabForCausalLM(config, ep_rank=ep_rank, seed=seed)
