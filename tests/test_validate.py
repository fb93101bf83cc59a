"""Invalid configurations are rejected before any process starts, with one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_launcher
from launcher.compose import compose_config, to_schema
from launcher.validate import ConfigError, validate

BAD = [
    (["model=tiny_moe_top2", "zero=stage3"], "zero=stage3 does not work with model.ffn=moe"),
    (["model=tiny_arctic", "zero=stage3"], "zero=stage3 does not work with model.ffn=arctic"),
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
    (["zero.stage=4"], "zero.stage=4 is not valid"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_rejected(overrides: list[str], message: str) -> None:
    cfg = to_schema(compose_config(overrides))
    with pytest.raises(ConfigError, match=None) as err:
        validate(cfg)
    text = str(err.value)
    assert message in text
    assert text.count(". ") == 0 and text.endswith("."), f"not one sentence: {text}"


def test_planning_preset_allowed_for_plan() -> None:
    validate(to_schema(compose_config(["model=arctic_480b"])), planning=True)


def test_dense_with_zero3_is_fine() -> None:
    validate(to_schema(compose_config(["model=tiny_dense", "zero=stage3"])))


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
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for a rejected config"
