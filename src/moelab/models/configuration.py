"""Hugging Face config of a moelab model: `ModelConfig` flattened (MoE knobs prefixed `moe_`).

This file, `modeling.py`, `blocks.py`, `layers.py`, `moe_torch.py` and `shapes.py` (a link to
`moelab/shapes.py`: the derived sizes, shared with `ModelConfig`) are copied into an exported
model folder, where they run without moelab: they import each other relatively and reach
`moelab.*` only inside `try` blocks (which transformers' import check skips).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PretrainedConfig

# absent beside an exported copy, which needs only the flat fields below; a `try` (not
# contextlib.suppress) because transformers' import check of remote code skips `try` blocks
try:  # noqa: SIM105
    from moelab.modelconfig import ModelConfig, MoEConfig
except ImportError:
    pass

from . import shapes
from .shapes import is_moe_ffn  # this form is what makes transformers copy shapes.py on export

_MOE_PREFIX = "moe_"
MOE_RUNTIMES = ("deepspeed", "torch")


def _flat(moe_field: str) -> str:
    """Flat name of a `MoEConfig` field: prefixed `moe_` once (moe_layer_frequency stays)."""
    return moe_field if moe_field.startswith(_MOE_PREFIX) else _MOE_PREFIX + moe_field


class MoelabLMConfig(PretrainedConfig):
    """Flat, JSON-serialisable twin of `ModelConfig` plus the expert-parallel size."""

    model_type = "moelab"
    attribute_map: ClassVar[dict[str, str]] = {
        "tie_word_embeddings": "tie_embeddings",
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
        "initializer_range": "init_std",
    }

    name: str = "tiny_dense"
    ffn: str = "dense"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_ratio: float = 8.0
    mlp_hidden_size: int | None = None
    vocab_size: int = 50304
    vocab_multiple: int = 128
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_affine: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    planning_only: bool = False
    moe_num_experts: int = 8
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25
    moe_eval_capacity_factor: float = 2.0
    moe_min_capacity: int = 4
    moe_drop_tokens: bool = True
    moe_use_rts: bool = True
    moe_noisy_gate_policy: str | None = None
    moe_top2_2nd_expert_sampling: bool = True
    moe_layer_frequency: int = 1
    moe_aux_loss_coeff: float = 0.01
    moe_expert_mlp_ratio: float = 8.0
    moe_expert_hidden_size: int | None = None
    moe_granularity: int = 1
    moe_granularity_round: int = 0
    moe_z_loss_coeff: float = 0.0
    moe_impl: str = "classic"
    """classic: deepspeed.moe's capacity layer; autoep: DeepSpeed AutoEP's dropless layer."""
    moe_balance: str = "aux"
    ep_size: int = 1
    moe_runtime: str = "deepspeed"
    """deepspeed: the MoE layer trains under DeepSpeed; torch: pure-torch dispatch (inference)."""

    def __post_init__(self, **kwargs: Any) -> None:
        # config.json written before the field lost its doubled prefix
        if "moe_moe_layer_frequency" in kwargs:
            self.moe_layer_frequency = kwargs.pop("moe_moe_layer_frequency")
        # config.json written when moe_impl named the runtime (every such model was classic)
        if self.moe_impl in MOE_RUNTIMES:
            self.moe_runtime, self.moe_impl = self.moe_impl, "classic"
        super().__post_init__(**kwargs)

    @property
    def moe_aux_weight(self) -> float:
        """`MoEConfig.aux_weight`: the load-balancing loss's weight (0 unless balance=aux)."""
        return self.moe_aux_loss_coeff if self.moe_balance == "aux" else 0.0

    # The derived sizes of `ModelConfig`, for model code that runs without moelab installed.
    @property
    def is_moe(self) -> bool:
        return is_moe_ffn(self.ffn)

    @property
    def kv_heads(self) -> int:
        return shapes.kv_heads(self.n_heads, self.n_kv_heads)

    @property
    def head_dim(self) -> int:
        return shapes.head_dim(self.d_model, self.n_heads)

    @property
    def padded_vocab_size(self) -> int:
        return shapes.padded_vocab_size(self.vocab_size, self.vocab_multiple)

    @property
    def mlp_hidden(self) -> int:
        return shapes.swiglu_hidden(self.d_model, self.mlp_ratio, self.mlp_hidden_size)

    @property
    def expert_hidden(self) -> int:
        """`ModelConfig.expert_hidden`: the base size split by granularity (rounded)."""
        base = shapes.swiglu_hidden(
            self.d_model, self.moe_expert_mlp_ratio, self.moe_expert_hidden_size
        )
        return shapes.split_hidden(base, self.moe_granularity, self.moe_granularity_round)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and shapes.is_moe_layer(layer_idx, self.moe_layer_frequency)

    @classmethod
    def from_model_config(
        cls, cfg: ModelConfig, ep_size: int = 1, moe_runtime: str = "deepspeed"
    ) -> MoelabLMConfig:
        fields: dict[str, Any] = {
            f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "moe"
        }
        for f in dataclasses.fields(cfg.moe):
            fields[_flat(f.name)] = getattr(cfg.moe, f.name)
        if moe_runtime not in MOE_RUNTIMES:
            raise ValueError(f"moe_runtime={moe_runtime!r} is not one of {MOE_RUNTIMES}.")
        return cls(**fields, ep_size=ep_size, moe_runtime=moe_runtime)

    def to_model_config(self) -> ModelConfig:
        moe = MoEConfig(
            **{f.name: getattr(self, _flat(f.name)) for f in dataclasses.fields(MoEConfig)}
        )
        names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "moe"]
        return ModelConfig(**{n: getattr(self, n) for n in names}, moe=moe)
