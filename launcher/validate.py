"""Cross-field rules checked before any process starts.

Each rule raises ConfigError with one sentence naming the key and the fix. Torch-free.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse

from moelab.config import (
    CLUSTER_BACKENDS,
    DATA_SOURCES,
    FFN_KINDS,
    NOISY_GATE_POLICIES,
    NORM_KINDS,
    PLAN_DEVICES,
    PLAN_FORMATS,
    PRECISIONS,
    RESUME_MODES,
    ModelConfig,
    MoelabConfig,
    TrainConfig,
)

IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

MAX_RANKS_PER_HOST = 1024
"""Ranks (processes) one host may start: hostfile slots, cluster.nproc_per_node."""
MAX_HOSTS = 10_000
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
    "cluster.master_port",
)
"""Whole-number keys whose own rule bounds them from above (a set, a range or another key)."""


class ConfigError(ValueError):
    """A user error in the composed configuration."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: object, allowed: tuple[object, ...]) -> None:
    names = ", ".join(str(a) for a in allowed)
    _require(value in allowed, f"{key}={value!r} is not valid; use one of: {names}.")


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"{key}={value} must be positive.")


def _at_least(key: str, value: float, low: float) -> None:
    _require(value >= low, f"{key}={value} must be at least {low}.")


def validate_counts(cfg: MoelabConfig) -> None:
    """Every key of COUNT_LIMITS is at most its limit."""
    for key, limit in COUNT_LIMITS.items():
        node: Any = cfg
        for name in key.split("."):
            node = getattr(node, name)
        value: int | None = node
        _require(
            value is None or value <= limit,
            f"{key}={value} is above the limit of {limit}; lower it.",
        )


def validate_model(m: ModelConfig) -> None:
    _one_of("model.ffn", m.ffn, FFN_KINDS)
    _one_of("model.norm", m.norm, NORM_KINDS)
    for key in ("d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _require(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "choose heads that divide the hidden size.",
    )
    _require(
        m.n_heads % m.kv_heads == 0,
        f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.kv_heads}; "
        "grouped-query attention needs a whole number of query heads per KV head.",
    )
    _require(
        m.head_dim % 2 == 0,
        f"model.d_model/model.n_heads={m.head_dim} is odd; RoPE needs an even head size.",
    )
    _positive("model.vocab_multiple", m.vocab_multiple)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.init_std", m.init_std)
    _positive("model.mlp_ratio", m.mlp_ratio)
    if m.n_kv_heads is not None:
        _positive("model.n_kv_heads", m.n_kv_heads)
    if m.mlp_hidden_size is not None:
        _positive("model.mlp_hidden_size", m.mlp_hidden_size)
    _require(m.mlp_hidden > 0, "model.mlp_ratio gives an empty MLP; raise it.")
    if m.is_moe:
        validate_moe(m)


def validate_moe(m: ModelConfig) -> None:
    e = m.moe
    _require(e.num_experts >= 1, f"model.moe.num_experts={e.num_experts} must be at least 1.")
    _one_of("model.moe.top_k", e.top_k, (1, 2))
    _require(
        e.top_k <= e.num_experts,
        f"model.moe.top_k={e.top_k} exceeds model.moe.num_experts={e.num_experts}; "
        "route to at most as many experts as there are.",
    )
    if e.noisy_gate_policy is not None:
        _one_of("model.moe.noisy_gate_policy", e.noisy_gate_policy, NOISY_GATE_POLICIES)
    _positive("model.moe.capacity_factor", e.capacity_factor)
    _positive("model.moe.eval_capacity_factor", e.eval_capacity_factor)
    _require(e.aux_loss_coeff >= 0, "model.moe.aux_loss_coeff must be 0 or more.")
    _at_least("model.moe.min_capacity", e.min_capacity, 0)
    _positive("model.moe.expert_mlp_ratio", e.expert_mlp_ratio)
    if e.expert_hidden_size is not None:
        _positive("model.moe.expert_hidden_size", e.expert_hidden_size)
    _require(
        1 <= e.moe_layer_frequency <= m.n_layers,
        f"model.moe.moe_layer_frequency={e.moe_layer_frequency} must be between 1 and "
        f"model.n_layers={m.n_layers}.",
    )
    _require(m.expert_hidden > 0, "model.moe.expert_mlp_ratio gives empty experts; raise it.")
    _require(e.z_loss_coeff >= 0, f"model.moe.z_loss_coeff={e.z_loss_coeff} must be 0 or more.")
    validate_granularity(m)


def validate_granularity(m: ModelConfig) -> None:
    e = m.moe
    g, base = e.granularity, m.base_expert_hidden
    _at_least("model.moe.granularity", g, 1)
    _at_least("model.moe.granularity_round", e.granularity_round, 0)
    _require(
        g == 1 or m.ffn != "pr_moe",
        f"model.moe.granularity={g} does not work with model.ffn=pr_moe (DeepSpeed's residual "
        "MLP is a copy of one expert and would shrink too); use model.ffn=moe or arctic.",
    )
    _require(
        base % g == 0 or e.granularity_round > 0,
        f"model.moe.granularity={g} does not divide the expert hidden size {base}; set "
        f"model.moe.granularity_round=128 (or another multiple) to round {base / g:.1f}, or "
        "pick a granularity that divides it.",
    )


def validate_parallel(cfg: MoelabConfig) -> None:
    m, ep, world = cfg.model, cfg.parallel.ep_size, cfg.world_size
    _require(ep >= 1, f"parallel.ep_size={ep} must be at least 1.")
    _one_of("zero.stage", cfg.zero.stage, (0, 1, 2, 3))
    _one_of("zero.offload_optimizer", cfg.zero.offload_optimizer, ("none", "cpu"))
    _positive("zero.reduce_bucket_size", cfg.zero.reduce_bucket_size)
    if not m.is_moe:
        return
    _require(
        cfg.zero.stage != 3,
        f"zero=stage3 does not work with model.ffn={m.ffn}: DeepSpeed's native MoE "
        "supports ZeRO stages 0-2; use zero=stage2.",
    )
    g, total = m.moe.granularity, m.moe.total_experts
    split = f" x model.moe.granularity={g} = {total}" if g > 1 else ""
    _require(
        total % ep == 0,
        f"parallel.ep_size={ep} does not divide model.moe.num_experts={m.moe.num_experts}{split}; "
        "pick an ep_size that divides the expert count.",
    )
    _require(
        world % ep == 0,
        f"parallel.ep_size={ep} does not divide the world size {world} "
        f"(cluster.nodes x cluster.nproc_per_node); pick an ep_size that divides it.",
    )


def validate_train(cfg: MoelabConfig) -> None:
    t = cfg.train
    for key in ("steps", "micro_batch_size", "grad_accum", "lr", "log_every", "eval_batches"):
        _positive(f"train.{key}", getattr(t, key))
    _require(
        1 <= t.warmup_steps <= t.steps,
        f"train.warmup_steps={t.warmup_steps} must be between 1 and train.steps={t.steps}.",
    )
    _require(t.eval_every >= 0, "train.eval_every must be 0 (end only) or a step count.")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be between 0 and 1.")
    _require(
        len(t.betas) == 2, f"train.betas={list(t.betas)} must hold two numbers such as [0.9, 0.95]."
    )
    for i, beta in enumerate(t.betas):
        _require(0 < beta < 1, f"train.betas[{i}]={beta} must be in (0, 1).")
    _at_least("train.weight_decay", t.weight_decay, 0)
    _positive("train.eps", t.eps)
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be 0 (off) or positive.")
    _at_least("train.threads_per_rank", t.threads_per_rank, 0)
    _at_least("train.seed", t.seed, 0)
    _one_of("train.precision", t.precision, PRECISIONS)
    _require(
        0 <= t.fp16_initial_scale_power <= 64,
        f"train.fp16_initial_scale_power={t.fp16_initial_scale_power} must be between 0 and 64.",
    )
    # DeepSpeed 0.19.8 scales the loss only through its ZeRO optimizers: at ZeRO 0 its fp16
    # optimizer unscales gradients that were never scaled (updates shrink by the loss scale).
    _require(
        t.precision != "fp16" or cfg.zero.stage >= 1,
        "train.precision=fp16 needs zero.stage 1 or 2 (DeepSpeed's ZeRO-0 fp16 path never "
        "scales the loss); use zero=stage1, or train.precision=bf16.",
    )
    validate_reliability(t)
    validate_hang(cfg)


def validate_hang(cfg: MoelabConfig) -> None:
    """The hang watchdog and its fault injection."""
    t, world = cfg.train, cfg.world_size
    _require(
        t.hang_timeout_s == 0 or t.hang_timeout_s >= 1,
        f"train.hang_timeout_s={t.hang_timeout_s:g} must be 0 (off) or at least 1 second.",
    )
    _at_least("train.inject_hang_step", t.inject_hang_step, 0)
    if t.inject_hang_step == 0:
        return
    _require(
        t.hang_timeout_s > 0,
        f"train.inject_hang_step={t.inject_hang_step} with train.hang_timeout_s=0 would hang "
        "forever; set train.hang_timeout_s to a few seconds.",
    )
    _require(
        0 <= t.inject_hang_rank < world,
        f"train.inject_hang_rank={t.inject_hang_rank} is not a rank of this {world}-rank run; "
        f"use 0 to {world - 1}.",
    )


def validate_reliability(t: TrainConfig) -> None:
    """Checkpointing, resume and fault-handling keys."""
    for key in ("checkpoint_every", "stop_after", "inject_nonfinite_step"):
        _at_least(f"train.{key}", getattr(t, key), 0)
    _at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    _one_of("train.resume", t.resume, RESUME_MODES)
    _require(
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
    _require(
        spec.mode == "all" or m.is_moe,
        f"train.trainable={t.trainable} needs an MoE model (model.ffn={m.ffn}); use all.",
    )
    rank = finetune.zero_refusal(spec, m.moe.total_experts, cfg.ep_size) if m.is_moe else None
    _require(
        cfg.zero.stage == 0 or rank is None,
        f"train.trainable={t.trainable} leaves EP rank {rank} without a trainable expert while "
        f"other EP ranks train theirs, which DeepSpeed's ZeRO stage {cfg.zero.stage} MoE "
        "optimizer cannot run; name at least one expert per EP rank, or use zero=stage0.",
    )
    mismatch = finetune.shape_mismatch(source, m) if source is not None else None
    _require(
        mismatch is None,
        f"train.init_from={t.init_from} was trained with another model shape ({mismatch}); "
        "fine-tune with the same model preset and shape.",
    )


def validate_data(cfg: MoelabConfig) -> None:
    d, m = cfg.data, cfg.model
    _one_of("data.source", d.source, DATA_SOURCES)
    _require(d.source != "hub" or bool(d.path), "data.source=hub needs data.path=<dataset>.")
    _require(
        d.source not in ("text", "json", "parquet") or bool(d.data_files),
        f"data.source={d.source} needs data.data_files=[...] listing the files.",
    )
    _require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1.")
    _positive("data.tokenizer_vocab_size", d.tokenizer_vocab_size)
    _at_least("data.num_proc", d.num_proc, 1)
    _at_least("data.seed", d.seed, 0)
    _require(bool(d.text_column), "data.text_column is empty; name the column holding the text.")
    if d.source in ("text", "json", "parquet"):
        for pattern in d.data_files:
            _require(
                bool(glob.glob(os.path.expanduser(pattern), recursive=True)),
                f"data.data_files entry {pattern!r} matches no file; fix the path or glob.",
            )
    _require(
        0 < d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}.",
    )
    _require(
        d.tokenizer != "bpe" or d.tokenizer_vocab_size <= m.padded_vocab_size,
        f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds the model's vocabulary "
        f"({m.padded_vocab_size}); lower it or raise model.vocab_size.",
    )


def validate_cluster(cfg: MoelabConfig, planning: bool = False) -> None:
    """Cluster keys; `planning` describes a cluster instead of launching on this one."""
    c = cfg.cluster
    _one_of("cluster.backend", c.backend, CLUSTER_BACKENDS)
    _require(
        c.gpus_per_node is None or c.gpus_per_node >= 1,
        f"cluster.gpus_per_node={c.gpus_per_node} must be at least 1 (or null).",
    )
    _require(c.nproc_per_node >= 1, "cluster.nproc_per_node must be at least 1.")
    _require(
        c.device_memory_gb > 0,
        f"cluster.device_memory_gb={c.device_memory_gb} must be positive (GiB per device).",
    )
    _require(c.nodes >= 1, "cluster.nodes must be at least 1.")
    _require(
        planning or c.backend != "local" or c.nodes == 1,
        "cluster=local runs on one node; set nodes=1.",
    )
    port = c.master_port
    _require(port is None or 1024 <= port <= 65535, "cluster.master_port must be 1024-65535.")
    _require(
        c.master_addr is None or _plain_host(c.master_addr),
        f"cluster.master_addr={c.master_addr!r} is not a plain host name or IP address.",
    )
    _require(
        c.socket_ifname is None or IFNAME.match(c.socket_ifname) is not None,
        f"cluster.socket_ifname={c.socket_ifname!r} is not a network interface name.",
    )
    _require(
        c.timeout_minutes > 0,
        f"cluster.timeout_minutes={c.timeout_minutes} must be positive (minutes a collective "
        "may wait on a peer before the run fails).",
    )
    _require(
        planning or c.backend != "local" or c.world_size in (0, c.nproc_per_node),
        f"cluster.world_size={c.world_size} is not the {c.nproc_per_node} ranks of cluster=local; "
        "drop cluster.world_size.",
    )
    _require("\n" not in c.ssh_args, "cluster.ssh_args must be one line.")
    for key, value in c.env.items():
        _require(
            ENV_KEY.match(key) is not None and "\n" not in str(value),
            f"cluster.env.{key} must be a NAME=one-line-value pair.",
        )
        _require(
            str(value) == str(value).strip(),
            f"cluster.env.{key} must not start or end with whitespace; DeepSpeed's runner "
            "strips it, so remove it.",
        )
    if c.backend == "local" and not planning:
        validate_local_gpus(c.nproc_per_node)
    validate_slurm(cfg)


def validate_local_gpus(ranks: int) -> None:
    """On a GPU host the local ranks get the visible GPUs, one each, by physical index."""
    from launcher import gpus

    count, ids = gpus.gpu_count(), gpus.local_gpus()
    if count == 0 or not ids:
        return  # no GPU (or CUDA_VISIBLE_DEVICES hides them all): the ranks are CPU processes
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    bad = gpus.not_indices(ids, count)
    _require(
        not bad,
        f"CUDA_VISIBLE_DEVICES={shown} names {','.join(bad)}, which is not the index of one of "
        f"this host's {count} GPUs (0-{count - 1}); list GPU indices such as 0,1 there.",
    )
    where = f"CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "this host"
    _require(
        ranks <= len(ids),
        f"cluster.nproc_per_node={ranks} exceeds the {len(ids)} GPUs of {where} (one rank per "
        "GPU); lower it, or leave it unset to start one rank per visible GPU.",
    )


def validate_slurm(cfg: MoelabConfig) -> None:
    from launcher.slurm import OWN_OPTIONS, minutes, option_name

    c = cfg.cluster
    _require(
        minutes(c.slurm_time) is not None,
        f"cluster.slurm_time={c.slurm_time!r} is not a Slurm time such as 90, 01:30:00 or "
        "2-00:00:00.",
    )
    if c.backend != "slurm":
        return
    _require(
        c.world_size in (0, c.nodes * c.nproc_per_node),
        f"cluster.world_size={c.world_size} is not cluster.nodes x ranks per node "
        f"({c.nodes} x {c.nproc_per_node}), the size the job starts; drop cluster.world_size.",
    )
    for line in c.slurm_extra:
        _require(
            line.startswith("-") and "\n" not in line,
            f"cluster.slurm_extra entry {line!r} is not an sbatch option such as --qos=high.",
        )
        _require(
            option_name(line) not in OWN_OPTIONS,
            f"cluster.slurm_extra entry {line!r} sets what moelab renders itself; use "
            "cluster.nodes, cluster.nproc_per_node, cluster.slurm_time/partition/account.",
        )


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "databricks")
SQL_SCHEMES = ("postgresql", "mysql", "mssql")


def validate_tracking(cfg: MoelabConfig) -> None:
    uri = cfg.tracking.uri
    if uri is None:
        return
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        ok = bool(parsed.hostname) and _port_ok(parsed)
    elif scheme == "sqlite":
        ok = uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")
    elif scheme in SQL_SCHEMES:
        ok = bool(parsed.netloc)
    else:
        ok = scheme in ("file", "databricks") or uri == "databricks"
    _require(
        ok,
        f"tracking.uri={uri!r} is not a valid tracking URI; use http(s)://host:port, "
        "sqlite:///path/to/mlflow.db or postgresql://user@host/db.",
    )
    _require(bool(cfg.tracking.experiment), "tracking.experiment is empty; name an experiment.")


def _port_ok(parsed: ParseResult) -> bool:
    try:
        _ = parsed.port
    except ValueError:
        return False
    return True


def validate_telemetry(cfg: MoelabConfig) -> None:
    t = cfg.telemetry
    _at_least("telemetry.heatmap_every", t.heatmap_every, 0)
    _positive("telemetry.system_metrics_interval", t.system_metrics_interval)
    _at_least("telemetry.moe_timing_every", t.moe_timing_every, 0)
    if t.peak_tflops is not None:
        _positive("telemetry.peak_tflops", t.peak_tflops)


def validate_runs_root(cfg: MoelabConfig) -> None:
    """launch.runs_root and its experiment folder (where Hydra puts the run dir) must be
    creatable and writable (checked before launching only)."""
    root = Path(cfg.launch.runs_root).expanduser().absolute()
    existing = root / cfg.tracking.experiment
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = "is not a directory" if not existing.is_dir() else _write_probe(existing)
    _require(
        not why,
        f"launch.runs_root={cfg.launch.runs_root} is not writable ({existing} {why}); "
        "choose a writable directory.",
    )


def _write_probe(folder: Path) -> str:
    """'' if a file can be created in `folder` (root ignores permission bits), else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as err:
        return f"refuses new files: {err.strerror or err}"


def _plain_host(name: str) -> bool:
    from launcher.hostfile import is_plain_host

    return is_plain_host(name)


def validate(cfg: MoelabConfig, *, planning: bool = False) -> None:
    """Every rule; `planning` allows planning-only presets (e.g. arctic_480b)."""
    validate_counts(cfg)
    validate_model(cfg.model)
    _require(
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
    _one_of("plan.format", cfg.plan.format, PLAN_FORMATS)
    _one_of("plan.device", cfg.plan.device, PLAN_DEVICES)
    if not planning:
        validate_runs_root(cfg)
