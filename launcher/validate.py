"""Cross-field rules checked before any process starts.

Each rule raises ConfigError (`launcher.errors`) with one sentence naming the key and the fix.
Model rules live in `launcher.validate_model`, cluster and tracking rules in
`launcher.validate_cluster` (and each backend's own in `launcher.backends`). Torch-free.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from launcher.errors import ConfigError
from launcher.hostfile import MAX_HOSTS, MAX_RANKS_PER_HOST
from launcher.rules import at_least, one_of, positive, require
from launcher.validate_cluster import validate_cluster, validate_runs_root, validate_tracking
from launcher.validate_model import validate_model, validate_parallel
from moelab.config import (
    DATA_SOURCES,
    PLAN_DEVICES,
    PLAN_FORMATS,
    PRECISIONS,
    RESUME_MODES,
    MoelabConfig,
    TrainConfig,
)

MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1  # numpy's seed range

COUNT_LIMITS: dict[str, int] = {
    "model.d_model": 2**16,
    "model.n_layers": 4096,
    "model.n_heads": 4096,
    "model.n_kv_heads": 4096,
    "model.mlp_hidden_size": 2**20,
    "model.vocab_size": 2**24,
    "model.vocab_multiple": 2**16,
    "model.max_seq_len": 2**22,
    "model.moe.num_experts": 2**16,
    "model.moe.min_capacity": 2**24,
    "model.moe.expert_hidden_size": 2**20,
    "model.moe.granularity": 1024,
    "model.moe.granularity_round": 2**16,
    "zero.reduce_bucket_size": 2**34,
    "parallel.ep_size": 2**16,
    "data.tokenizer_vocab_size": 2**24,
    "data.num_proc": 1024,
    "data.seed": MAX_SEED,
    "train.steps": MAX_STEPS,
    "train.micro_batch_size": 2**16,
    "train.grad_accum": 2**16,
    "train.log_every": MAX_STEPS,
    "train.eval_every": MAX_STEPS,
    "train.eval_batches": 2**20,
    "train.seed": MAX_SEED,
    "train.threads_per_rank": 1024,
    "train.checkpoint_every": MAX_STEPS,
    "train.keep_checkpoints": 2**20,
    "train.inject_nonfinite_step": MAX_STEPS,
    "train.inject_hang_step": MAX_STEPS,
    "cluster.nodes": MAX_HOSTS,
    "cluster.gpus_per_node": MAX_RANKS_PER_HOST,  # sets nproc_per_node: named first
    "cluster.nproc_per_node": MAX_RANKS_PER_HOST,
    "cluster.world_size": MAX_HOSTS * MAX_RANKS_PER_HOST,
    "cluster.num_nodes": MAX_HOSTS,
    "cluster.timeout_minutes": 7 * 24 * 60,
    "telemetry.heatmap_every": MAX_STEPS,
    "telemetry.moe_timing_every": MAX_STEPS,
}
"""Upper bound of each whole-number key: checked before any other rule uses the number (a
count sizes processes, lists or buffers)."""

BOUNDED_BY_RULE = (
    "model.moe.top_k",
    "model.moe.moe_layer_frequency",
    "zero.stage",
    "data.seq_len",
    "train.warmup_steps",
    "train.stop_after",
    "train.fp16_initial_scale_power",
    "train.inject_hang_rank",
    "train.inject_slow_rank",
    "cluster.master_port",
    "cluster.slurm_signal_seconds",
)
"""Whole-number keys whose own rule bounds them from above (a set, a range or another key)."""


def validate_counts(cfg: MoelabConfig) -> None:
    """Every key of COUNT_LIMITS is at most its limit."""
    for key, limit in COUNT_LIMITS.items():
        node: Any = cfg
        for name in key.split("."):
            node = getattr(node, name)
        value: int | None = node
        require(
            value is None or value <= limit,
            f"{key}={value} is above the limit of {limit}; lower it.",
        )


def validate_train(cfg: MoelabConfig) -> None:
    t = cfg.train
    for key in ("steps", "micro_batch_size", "grad_accum", "lr", "log_every", "eval_batches"):
        positive(f"train.{key}", getattr(t, key))
    require(
        1 <= t.warmup_steps <= t.steps,
        f"train.warmup_steps={t.warmup_steps} must be between 1 and train.steps={t.steps}.",
    )
    require(t.eval_every >= 0, "train.eval_every must be 0 (end only) or a step count.")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be between 0 and 1.")
    require(
        len(t.betas) == 2, f"train.betas={list(t.betas)} must hold two numbers such as [0.9, 0.95]."
    )
    for i, beta in enumerate(t.betas):
        require(0 < beta < 1, f"train.betas[{i}]={beta} must be in (0, 1).")
    at_least("train.weight_decay", t.weight_decay, 0)
    positive("train.eps", t.eps)
    require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be 0 (off) or positive.")
    at_least("train.threads_per_rank", t.threads_per_rank, 0)
    at_least("train.seed", t.seed, 0)
    one_of("train.precision", t.precision, PRECISIONS)
    require(
        0 <= t.fp16_initial_scale_power <= 64,
        f"train.fp16_initial_scale_power={t.fp16_initial_scale_power} must be between 0 and 64.",
    )
    # DeepSpeed 0.19.8 scales the loss only through its ZeRO optimizers: at ZeRO 0 its fp16
    # optimizer unscales gradients that were never scaled (updates shrink by the loss scale).
    require(
        t.precision != "fp16" or cfg.zero.stage >= 1,
        "train.precision=fp16 needs zero.stage 1 or 2 (DeepSpeed's ZeRO-0 fp16 path never "
        "scales the loss); use zero=stage1, or train.precision=bf16.",
    )
    validate_reliability(t)
    validate_hang(cfg)
    validate_slow_rank(cfg)


def validate_hang(cfg: MoelabConfig) -> None:
    """The hang watchdog and its fault injection."""
    t, world = cfg.train, cfg.world_size
    require(
        t.hang_timeout_s == 0 or t.hang_timeout_s >= 1,
        f"train.hang_timeout_s={t.hang_timeout_s:g} must be 0 (off) or at least 1 second.",
    )
    at_least("train.inject_hang_step", t.inject_hang_step, 0)
    if t.inject_hang_step == 0:
        return
    require(
        t.hang_timeout_s > 0,
        f"train.inject_hang_step={t.inject_hang_step} with train.hang_timeout_s=0 would hang "
        "forever; set train.hang_timeout_s to a few seconds.",
    )
    require(
        0 <= t.inject_hang_rank < world,
        f"train.inject_hang_rank={t.inject_hang_rank} is not a rank of this {world}-rank run; "
        f"use 0 to {world - 1}.",
    )


def validate_slow_rank(cfg: MoelabConfig) -> None:
    """The straggler fault injection: a rank of this run, a delay that is not negative."""
    t, world = cfg.train, cfg.world_size
    require(
        -1 <= t.inject_slow_rank < world,
        f"train.inject_slow_rank={t.inject_slow_rank} is not a rank of this {world}-rank run; "
        f"use 0 to {world - 1}, or -1 for off.",
    )
    require(
        t.inject_slow_ms >= 0,
        f"train.inject_slow_ms={t.inject_slow_ms:g} is negative; use 0 or more milliseconds.",
    )


def validate_reliability(t: TrainConfig) -> None:
    """Checkpointing, resume and fault-handling keys."""
    for key in ("checkpoint_every", "stop_after", "inject_nonfinite_step"):
        at_least(f"train.{key}", getattr(t, key), 0)
    at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    one_of("train.resume", t.resume, RESUME_MODES)
    require(
        t.stop_after <= t.steps,
        f"train.stop_after={t.stop_after} is past train.steps={t.steps}; use 0 or a step in range.",
    )


def validate_finetune(cfg: MoelabConfig) -> None:
    """train.trainable and train.init_from (checkpoint present, same model shape)."""
    from moelab import finetune

    t, m = cfg.train, cfg.model
    try:
        spec = finetune.parse_trainable(t.trainable, m.moe.total_experts if m.is_moe else None)
        source = finetune.source_model(t.init_from) if t.init_from else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    require(
        spec.mode == "all" or m.is_moe,
        f"train.trainable={t.trainable} needs an MoE model (model.ffn={m.ffn}); use all.",
    )
    some = m.is_moe and len({spec.expert(e) for e in range(m.moe.total_experts)}) > 1
    require(
        not (some and m.moe.impl == "autoep"),
        f"train.trainable={t.trainable} trains some experts of a layer, but "
        "model.moe.impl=autoep fuses a layer's experts into tensors that train or freeze whole; "
        "name every expert or none (router, dense_only), or use model.moe.impl=classic.",
    )
    rank = finetune.zero_refusal(spec, m.moe.total_experts, cfg.ep_size) if m.is_moe else None
    require(
        cfg.zero.stage == 0 or rank is None,
        f"train.trainable={t.trainable} leaves EP rank {rank} without a trainable expert while "
        f"other EP ranks train theirs, which DeepSpeed's ZeRO stage {cfg.zero.stage} MoE "
        "optimizer cannot run; name at least one expert per EP rank, or use zero=stage0.",
    )
    mismatch = finetune.shape_mismatch(source, m) if source is not None else None
    require(
        mismatch is None,
        f"train.init_from={t.init_from} was trained with another model shape ({mismatch}); "
        "fine-tune with the same model preset and shape.",
    )


def validate_data(cfg: MoelabConfig) -> None:
    d, m = cfg.data, cfg.model
    one_of("data.source", d.source, DATA_SOURCES)
    require(d.source != "hub" or bool(d.path), "data.source=hub needs data.path=<dataset>.")
    require(
        d.source not in ("text", "json", "parquet") or bool(d.data_files),
        f"data.source={d.source} needs data.data_files=[...] listing the files.",
    )
    require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1.")
    positive("data.tokenizer_vocab_size", d.tokenizer_vocab_size)
    at_least("data.num_proc", d.num_proc, 1)
    at_least("data.seed", d.seed, 0)
    require(bool(d.text_column), "data.text_column is empty; name the column holding the text.")
    if d.source in ("text", "json", "parquet"):
        for pattern in d.data_files:
            require(
                bool(glob.glob(os.path.expanduser(pattern), recursive=True)),
                f"data.data_files entry {pattern!r} matches no file; fix the path or glob.",
            )
    require(
        0 < d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}.",
    )
    require(
        d.tokenizer != "bpe" or d.tokenizer_vocab_size <= m.padded_vocab_size,
        f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds the model's vocabulary "
        f"({m.padded_vocab_size}); lower it or raise model.vocab_size.",
    )


def validate_telemetry(cfg: MoelabConfig) -> None:
    t = cfg.telemetry
    at_least("telemetry.heatmap_every", t.heatmap_every, 0)
    positive("telemetry.system_metrics_interval", t.system_metrics_interval)
    at_least("telemetry.moe_timing_every", t.moe_timing_every, 0)
    if t.peak_tflops is not None:
        positive("telemetry.peak_tflops", t.peak_tflops)


def validate(cfg: MoelabConfig, *, planning: bool = False) -> None:
    """Every rule; `planning` allows planning-only presets (e.g. arctic_480b)."""
    validate_counts(cfg)
    validate_model(cfg.model)
    require(
        planning or not cfg.model.planning_only,
        f"model={cfg.model.name} is for planning only; run moelab-plan with it, "
        "or train a smaller preset.",
    )
    validate_parallel(cfg)
    validate_train(cfg)
    validate_finetune(cfg)
    validate_data(cfg)
    validate_cluster(cfg, planning)
    validate_tracking(cfg)
    validate_telemetry(cfg)
    one_of("plan.format", cfg.plan.format, PLAN_FORMATS)
    one_of("plan.device", cfg.plan.device, PLAN_DEVICES)
    if not planning:
        validate_runs_root(cfg)
