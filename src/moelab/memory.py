"""Memory, all-to-all traffic and serving arithmetic for moelab-plan (no torch import).

Training memory per device, for ZeRO stage `s`, `world` ranks and expert-parallel size `ep`.
DeepSpeed gives the expert parameters their own optimizer groups: a rank holds
`num_experts/ep` experts of each MoE layer, and ZeRO partitions those over the
expert-data-parallel group (`world/ep` ranks, the ranks holding the same experts), while
non-expert parameters are partitioned over all `world` data-parallel ranks. With `w` bytes
per weight (2 for bf16/fp16, 4 for fp32), per parameter of a rank:

  weights     w                         (ZeRO-3: / dp; only `model.moe.impl: autoep` runs
                                        MoE models at ZeRO-3)
  gradients   w                         (ZeRO-2 and 3: / dp)
  optimizer   mixed precision: 16 = fp32 master 4 + Adam m 4 + v 4 + fp32 gradient 4
              fp32 with ZeRO-1/2: 16 = DeepSpeed's fp32 partition copy 4 + m 4 + v 4 + grad 4
              fp32 with ZeRO-0: 8 = m + v (the optimizer steps the weights themselves)
              (ZeRO >= 1: / dp; offload_optimizer=cpu: 0 on the device; bf16 at ZeRO-0 runs
              DeepSpeed's BF16_Optimizer, which partitions these like ZeRO-1: counted whole
              here, an upper bound)
  buffers     ZeRO-2 with contiguous_gradients: reduce_bucket_size * w, twice with overlap_comm

where `dp` is `world` for non-expert and `world/ep` for expert parameters.

Activations kept for backward, per micro-batch of `B` sequences of `T` tokens, in units of
`B*T` activation elements of `w` bytes (no activation checkpointing; SDPA keeps q, k, v and
its output, not the T x T scores):

  attention block   7*D + 2*D*kv_heads/n_heads   (norm in/out, q, o-proj input, output,
                                                  residual, next norm output; k and v)
  SwiGLU of size H  4*H                          (gate+up output 2H, silu(gate) H, product H)
  MoE FFN           2*D + c*(2*D + 4*H_e)        (c = expert rows per token: dispatched
                                                  input, combined output, each expert's SwiGLU)

where c is, per MoE layer (k and E after granularity: `active_experts`, `total_experts`):

  classic   capacity_factor * k   the (E, capacity, D) dispatch tensor, padded to capacity
  autoep    k                     dropless: AutoEP's `_forward` keeps, per routed row, the
                                  expert-grouped input its grouped GEMMs read (the gather
                                  `permute_by_local_expert` makes) and the (tokens*k, D)
                                  scatter `combine_from_routed` weights; plus, per MoE layer
                                  and micro-batch, 8 alignment rows per local expert
                                  (TOKEN_GROUP_ALIGN_SIZE_M) through the grouped input and
                                  the SwiGLU: (E/ep) * 8 * (D + 4*H_e) elements. The other
                                  copies of the routed rows (the gather by token, both
                                  all-to-all outputs, the unpermuted output, the fp32 product
                                  of the combine) are freed within the layer, before the
                                  LM head's peak, and are not counted.
  LM head, fp32     4*V                          (logits, PyTorch's fp32 log-softmax kept for
                                                  backward, its gradient, the logits' gradient)
  LM head, bf16/fp16  2*V + chunk               (logits and their gradient; the loss upcasts
                                                  one chunk of LOSS_CHUNK_ELEMENTS logits at a
                                                  time (`shifted_cross_entropy`), whose fp32
                                                  copy, log-softmax and gradient are a constant
                                                  12 * min(chunk, B*T*V) bytes, not per token)

All-to-all: each MoE layer sends its dispatched tokens to the other ranks of its EP group and
the results back, forward and backward: 4 all-to-alls per layer per micro-step, of which a
rank sends (ep-1)/ep of the tensor (uniform routing). The tensor is the classic layer's
(E x capacity x D), capacity from E and k after granularity, or AutoEP's routed rows
(tokens x k x D, no padding).

Serving (bf16 weights): bytes read per decoded token at batch 1 are the weights a token
touches (attention, dense FFN, top_k experts, router, LM head; one embedding row) plus its
KV cache. A decode step at batch `b` runs `2 * active_matmul_params * b` FLOPs and reads the
weights once; for MoE it reads the experts the batch touches, `E * (1 - (1 - k/E)^b)` per
layer with uniform routing. It turns compute-bound at the smallest `b` whose FLOPs per byte
reach the device's peak FLOP/s over its memory bandwidth (KV reads excluded: at long context
GQA attention stays memory-bound at any batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from moelab.config import ModelConfig, MoelabConfig
from moelab.devices import DeviceSpec
from moelab.flops import active_matmul_params, flops_per_token
from moelab.shapes import LOSS_CHUNK_ELEMENTS, expert_capacity

GIB = 1024**3
SERVE_BYTES = 2  # bf16 weights and KV cache for serving
LOGIT_COPIES = {4: 4, 2: 2}  # by logit bytes: fp32 4 (module docstring), bf16/fp16 2
LOSS_CHUNK_FP32_BYTES = 12  # per logit of the loss chunk: fp32 upcast, log-softmax, gradient
AUTOEP_ALIGN_ROWS = 8  # deepspeed.moe.ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M


@dataclass(frozen=True)
class Sizes:
    """Parameter counts the arithmetic needs (from the meta model's named parameters)."""

    total: int
    active: int
    experts: int
    embedding: int
    lm_head: int

    @property
    def nonexpert(self) -> int:
        return self.total - self.experts


@dataclass(frozen=True)
class TrainSetup:
    """The knobs that decide memory per device (what a fix may change)."""

    world: int
    ep_size: int
    stage: int
    micro_batch_size: int
    precision: str
    offload_optimizer: str = "none"
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    grad_accum: int = 1

    @classmethod
    def from_config(cls, cfg: MoelabConfig) -> TrainSetup:
        z, t = cfg.zero, cfg.train
        return cls(
            world=cfg.world_size,
            ep_size=cfg.ep_size,
            stage=z.stage,
            micro_batch_size=t.micro_batch_size,
            precision=t.precision,
            offload_optimizer=z.offload_optimizer,
            overlap_comm=z.overlap_comm,
            contiguous_gradients=z.contiguous_gradients,
            reduce_bucket_size=z.reduce_bucket_size,
            grad_accum=t.grad_accum,
        )

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def expert_dp(self) -> int:
        """Ranks of an expert-data-parallel group (they hold the same experts)."""
        return self.world // self.ep_size


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device by part; `total` sums them."""

    params_nonexpert: float
    params_expert_shard: float
    grads: float
    optimizer: float
    buffers: float
    activations: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _optimizer_bytes_per_param(s: TrainSetup) -> int:
    if s.offload_optimizer != "none":
        return 0
    if s.precision == "fp32" and s.stage == 0:
        return 8
    return 16


def model_state_bytes(sizes: Sizes, s: TrainSetup) -> dict[str, float]:
    """Weights, gradients, optimizer states and ZeRO buffers on one rank."""
    w, ne, ex = s.weight_bytes, sizes.nonexpert, sizes.experts / s.ep_size
    sharded = ne / s.world + ex / s.expert_dp  # this rank's ZeRO partition
    full = ne + ex
    buckets = 2 if s.overlap_comm else 1
    return {
        "params_nonexpert": w * (ne / s.world if s.stage == 3 else ne),
        "params_expert_shard": w * (ex / s.expert_dp if s.stage == 3 else ex),
        "grads": w * (sharded if s.stage >= 2 else full),
        "optimizer": _optimizer_bytes_per_param(s) * (sharded if s.stage >= 1 else full),
        "buffers": buckets * s.reduce_bucket_size * w
        if s.stage == 2 and s.contiguous_gradients
        else 0.0,
    }


def expert_rows_per_token(m: ModelConfig) -> float:
    """c of the MoE FFN's activations: rows each token occupies in an MoE layer's experts
    (capacity-padded slots on the classic layer, routes on the dropless AutoEP layer)."""
    if m.moe.impl == "autoep":
        return m.moe.active_experts
    return m.moe.capacity_factor * m.moe.active_experts


def activation_elements_per_token(m: ModelConfig, weight_bytes: int) -> float:
    """Activation elements kept for backward per token (formula in the module docstring)."""
    d = m.d_model
    attn = 7 * d + 2 * d * m.kv_heads / m.n_heads
    total = 0.0
    for i in range(m.n_layers):
        total += attn
        if not m.is_moe_layer(i) or m.ffn in ("arctic", "pr_moe"):
            hidden = m.expert_hidden if m.ffn == "pr_moe" and m.is_moe_layer(i) else m.mlp_hidden
            total += 4 * hidden
        if m.is_moe_layer(i):
            total += 2 * d + expert_rows_per_token(m) * (2 * d + 4 * m.expert_hidden)
    return total + m.padded_vocab_size * LOGIT_COPIES[min(weight_bytes, 4)]


def loss_chunk_bytes(m: ModelConfig, tokens: int, weight_bytes: int) -> float:
    """The fp32 scratch of the chunked loss over bf16/fp16 logits (0 for fp32 logits)."""
    if weight_bytes >= 4:
        return 0.0
    return LOSS_CHUNK_FP32_BYTES * min(LOSS_CHUNK_ELEMENTS, tokens * m.padded_vocab_size)


def alignment_elements(m: ModelConfig, ep_size: int) -> float:
    """AutoEP's alignment rows of one micro-batch, all MoE layers (module docstring)."""
    if not m.is_moe or m.moe.impl != "autoep":
        return 0.0
    rows = m.moe.total_experts // ep_size * AUTOEP_ALIGN_ROWS
    return len(m.moe_layer_indices()) * rows * (m.d_model + 4 * m.expert_hidden)


def estimate_memory(m: ModelConfig, sizes: Sizes, s: TrainSetup, seq_len: int) -> MemoryEstimate:
    """Training memory per device for one micro-batch (module docstring has the formulas)."""
    tokens = s.micro_batch_size * seq_len
    elements = tokens * activation_elements_per_token(m, s.weight_bytes)
    act = (elements + alignment_elements(m, s.ep_size)) * s.weight_bytes
    act += loss_chunk_bytes(m, tokens, s.weight_bytes)
    return MemoryEstimate(**model_state_bytes(sizes, s), activations=act)


def dispatched_elements(m: ModelConfig, tokens: int) -> float:
    """Elements of the tensor one MoE layer's dispatch all-to-all carries (all ranks' share)."""
    e = m.moe
    if e.impl == "autoep":
        return tokens * e.active_experts * m.d_model
    cap = expert_capacity(
        tokens, e.total_experts, e.active_experts, e.capacity_factor, e.min_capacity
    )
    return e.total_experts * cap * m.d_model  # (E, C, D)


def all_to_all_bytes(m: ModelConfig, s: TrainSetup, seq_len: int) -> dict[str, float]:
    """Bytes one rank sends in all-to-alls per optimizer step (0 without EP)."""
    if not m.is_moe or s.ep_size == 1:
        return {"per_layer_per_micro_step": 0.0, "per_rank_per_step": 0.0, "world_per_step": 0.0}
    tensor = dispatched_elements(m, s.micro_batch_size * seq_len) * s.weight_bytes
    per_layer = 4 * tensor * (s.ep_size - 1) / s.ep_size  # 2 forward + 2 backward
    per_rank = per_layer * len(m.moe_layer_indices()) * s.grad_accum
    return {
        "per_layer_per_micro_step": per_layer,
        "per_rank_per_step": per_rank,
        "world_per_step": per_rank * s.world,
    }


Change = tuple[str, Callable[[TrainSetup], TrainSetup]]


def _valid_ep_sizes(m: ModelConfig, world: int) -> list[int]:
    if not m.is_moe:
        return [1]
    return [e for e in range(1, world + 1) if world % e == 0 and m.moe.num_experts % e == 0]


def _micro_batch(s: TrainSetup, mb: int) -> Change:
    accum = s.grad_accum * s.micro_batch_size // mb  # same tokens per optimizer step
    name = f"train.micro_batch_size={mb} train.grad_accum={accum}"
    return name, lambda x: replace(x, micro_batch_size=mb, grad_accum=accum)


def _set(name: str, **fields: Any) -> Change:
    return name, lambda x: replace(x, **fields)


def _halvings(n: int) -> list[int]:
    return [n >> i for i in range(1, n.bit_length())]


def _offload(s: TrainSetup) -> Change:
    stage = max(s.stage, 1)  # DeepSpeed offloads ZeRO partitions: stage 1 at least
    name = "zero.offload_optimizer=cpu" + (f" zero=stage{stage}" if stage != s.stage else "")
    return name, lambda x: replace(x, offload_optimizer="cpu", stage=max(x.stage, 1))


def _more_nodes(s: TrainSetup, factor: int, gpus_per_node: int) -> Change:
    nodes = s.world * factor // gpus_per_node
    return f"cluster.nodes={nodes}", lambda x: replace(x, world=x.world * factor)


def _knobs(m: ModelConfig, s: TrainSetup, gpus_per_node: int) -> dict[str, list[Change]]:
    """Each knob's changes, smallest first; knobs in order of how little they disturb a run."""
    max_stage = 2 if m.is_moe and m.moe.impl == "classic" else 3
    knobs: dict[str, list[Change]] = {
        "zero": [_set(f"zero=stage{st}", stage=st) for st in range(s.stage + 1, max_stage + 1)],
        "ep_size": [
            _set(f"parallel.ep_size={e}", ep_size=e)
            for e in _valid_ep_sizes(m, s.world)
            if e > s.ep_size
        ],
        "micro_batch": [_micro_batch(s, mb) for mb in _halvings(s.micro_batch_size)],
        "offload": [_offload(s)] if s.offload_optimizer == "none" else [],
        "precision": [_set("train.precision=bf16", precision="bf16")]
        if s.precision == "fp32"
        else [],
        "nodes": [_more_nodes(s, f, gpus_per_node) for f in (2, 4, 8)],
    }
    return {k: v for k, v in knobs.items() if v}


def fixes_that_fit(
    m: ModelConfig,
    sizes: Sizes,
    s: TrainSetup,
    seq_len: int,
    budget_bytes: float,
    gpus_per_node: int = 8,
) -> list[dict[str, Any]]:
    """The smallest change of each knob that fits `budget_bytes`; if no single knob does,
    the first fitting change of each pair of knobs (at most four)."""
    knobs = _knobs(m, s, gpus_per_node)

    def fits(changes: tuple[Change, ...]) -> dict[str, Any] | None:
        setup = s
        for _, apply in changes:
            setup = apply(setup)
        total = estimate_memory(m, sizes, setup, seq_len).total
        fix = " ".join(name for name, _ in changes)
        return {"fix": fix, "bytes_per_device": total} if total <= budget_bytes else None

    singles = [next(filter(None, (fits((c,)) for c in cs)), None) for cs in knobs.values()]
    found = [f for f in singles if f]
    if found:
        return found
    names = list(knobs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for ca in knobs[a]:
                hit = next(filter(None, (fits((ca, cb)) for cb in knobs[b])), None)
                if hit:
                    found.append(hit)
                    break
    return found[:4]


def kv_bytes_per_token(m: ModelConfig) -> int:
    """KV cache per token, all layers, bf16: K and V of the n_kv_heads heads (GQA)."""
    return 2 * m.n_layers * m.kv_heads * m.head_dim * SERVE_BYTES


def _weights_read_b1(m: ModelConfig, sizes: Sizes) -> int:
    """Parameters a decoded token reads: its active weights, one row of an untied embedding."""
    untied_embedding = sizes.embedding if sizes.lm_head else 0
    return sizes.active - untied_embedding + (m.d_model if untied_embedding else 0)


def compute_bound_batch(m: ModelConfig, sizes: Sizes, device: DeviceSpec) -> int:
    """Smallest decode batch whose FLOPs per weight byte reach the device's ridge point."""
    matmul = sum(active_matmul_params(m).values())
    e = m.moe
    touched_per_token = e.top_k / e.num_experts if m.is_moe else 0.0
    read_nonexpert = _weights_read_b1(m, sizes) - sizes.experts * touched_per_token

    def intensity(b: int) -> float:
        touched = 1 - (1 - touched_per_token) ** b if m.is_moe else 0.0
        return 2 * matmul * b / (SERVE_BYTES * (read_nonexpert + sizes.experts * touched))

    hi = 1
    while intensity(hi) < device.ridge_flops_per_byte:
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:  # intensity grows with b: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if intensity(mid) < device.ridge_flops_per_byte else (lo, mid)
    return hi


def inference_view(
    m: ModelConfig, sizes: Sizes, device: DeviceSpec, context: int, ep_size: int
) -> dict[str, Any]:
    """Serving figures in bf16 (module docstring has the definitions)."""
    weights_read = _weights_read_b1(m, sizes) * SERVE_BYTES
    kv = kv_bytes_per_token(m)
    return {
        "device": device.name,
        "peak_tflops": device.peak_tflops,
        "hbm_tb_s": device.hbm_tb_s,
        "weights_bytes": sizes.total * SERVE_BYTES,
        "weights_bytes_per_device": (sizes.nonexpert + sizes.experts / ep_size) * SERVE_BYTES,
        "kv_bytes_per_token": kv,
        "context": context,
        "bytes_per_decoded_token_weights": weights_read,
        "bytes_per_decoded_token": weights_read + context * kv,
        "decode_flops_per_token": flops_per_token(m, context).forward,
        "batch1_tokens_per_s_bound": device.hbm_tb_s * 1e12 / (weights_read + context * kv),
        "compute_bound_batch": compute_bound_batch(m, sizes, device),
    }
