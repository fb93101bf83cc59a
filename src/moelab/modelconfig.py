"""The model's schema: `ModelConfig` (a decoder-only transformer) and its `MoEConfig`.

Torch-free like the rest of `moelab.config`, which composes them into `MoelabConfig`; the
derived sizes come from `moelab.shapes`, which the exported model's config shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab import shapes


@dataclass
class MoEConfig:
    """Mixture-of-Experts knobs, used when `model.ffn` is moe, arctic or pr_moe."""

    num_experts: int = 8
    """Experts per MoE layer (global count, across all EP ranks)."""
    top_k: int = 2
    """Experts each token is routed to, before granularity (1 or 2)."""
    capacity_factor: float = 1.25
    """Expert capacity during training, as a multiple of tokens*top_k/num_experts."""
    eval_capacity_factor: float = 2.0
    """Expert capacity during evaluation."""
    min_capacity: int = 4
    """Smallest capacity of an expert, whatever the capacity factor."""
    drop_tokens: bool = True
    """Drop tokens over capacity (false = unbounded capacity, an extra all-reduce)."""
    use_rts: bool = True
    """Random token selection for top-1 (random drop priority instead of token order)."""
    noisy_gate_policy: str | None = None
    """Router noise in training: null, Jitter or RSample."""
    top2_2nd_expert_sampling: bool = True
    """Sample top-2's second expert with Gumbel noise (training only in moelab)."""
    moe_layer_frequency: int = 1
    """1 = every layer is MoE, 2 = every other layer (layers 1, 3, ...), and so on."""
    aux_loss_coeff: float = 0.01
    """Weight of the load-balancing loss summed over MoE layers."""
    expert_mlp_ratio: float = 8.0
    """Expert SwiGLU size: the fused gate+up projection is d_model -> ratio*d_model."""
    expert_hidden_size: int | None = None
    """Expert intermediate size per SwiGLU branch; overrides expert_mlp_ratio."""
    granularity: int = 1
    """Split every expert into G: hidden / G, num_experts x G, top_k x G (same expert params)."""
    granularity_round: int = 0
    """Round the split hidden size to a multiple of this (0 = G must divide the hidden size)."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of the logits, summed over layers)."""
    impl: str = "classic"
    """MoE layer: classic (deepspeed.moe, capacity, drops) or autoep (AutoEP, dropless)."""
    balance: str = "aux"
    """Load balancing: aux (aux_loss_coeff x load-balancing loss), bias (aux-loss-free) or none."""

    @property
    def total_experts(self) -> int:
        """Experts per MoE layer after granularity (what DeepSpeed's layer holds)."""
        return self.num_experts * self.granularity

    @property
    def active_experts(self) -> int:
        """Experts per token after granularity (DeepSpeed's k; k > 2 runs `topkgating`)."""
        return self.top_k * self.granularity

    @property
    def dropless(self) -> bool:
        """Whether no route is ever dropped (AutoEP, or the classic layer without capacity)."""
        return self.impl == "autoep" or not self.drop_tokens

    @property
    def aux_weight(self) -> float:
        """The load-balancing loss's weight in the training loss (0 unless balance=aux)."""
        return self.aux_loss_coeff if self.balance == "aux" else 0.0

    def capacity(self, tokens: int, training: bool = True) -> int:
        """Slots per expert of a layer's forward over `tokens` tokens when tokens are dropped."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return shapes.expert_capacity(
            tokens, self.total_experts, self.active_experts, factor, self.min_capacity
        )


@dataclass
class ModelConfig:
    """A decoder-only transformer in OLMo's conventions; the FFN variant is `ffn`."""

    name: str = "tiny_dense"
    """Preset name, used for run names and the `variant` tag."""
    ffn: str = "dense"
    """FFN variant: dense, moe, arctic (dense MLP + parallel residual MoE) or pr_moe."""
    d_model: int = 128
    """Hidden size."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (null = n_heads)."""
    mlp_ratio: float = 8.0
    """Dense SwiGLU size: the fused gate+up projection is d_model -> ratio*d_model."""
    mlp_hidden_size: int | None = None
    """Dense MLP intermediate size per SwiGLU branch; overrides mlp_ratio."""
    vocab_size: int = 50304
    """Embedding rows; padded up to a multiple of vocab_multiple."""
    vocab_multiple: int = 128
    """Pad the vocabulary to a multiple of this."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "layernorm"
    """Normalisation: layernorm or rmsnorm."""
    norm_affine: bool = False
    """Learnable norm scale (OLMo's default is parameter-free LayerNorm)."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    planning_only: bool = False
    """Too large to build here: only `moelab-plan` accepts it."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE knobs (ignored by the dense variant)."""

    @property
    def is_moe(self) -> bool:
        return shapes.is_moe_ffn(self.ffn)

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
        """Dense SwiGLU intermediate size per branch."""
        return shapes.swiglu_hidden(self.d_model, self.mlp_ratio, self.mlp_hidden_size)

    @property
    def base_expert_hidden(self) -> int:
        """Expert SwiGLU intermediate size per branch before the granularity split."""
        return shapes.swiglu_hidden(
            self.d_model, self.moe.expert_mlp_ratio, self.moe.expert_hidden_size
        )

    @property
    def expert_hidden(self) -> int:
        """Expert SwiGLU intermediate size per branch: the base size / granularity (rounded)."""
        moe = self.moe
        return shapes.split_hidden(self.base_expert_hidden, moe.granularity, moe.granularity_round)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (0-based) carries an MoE FFN."""
        return self.is_moe and shapes.is_moe_layer(layer_idx, self.moe.moe_layer_frequency)

    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]
