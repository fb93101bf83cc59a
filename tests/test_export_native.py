"""Native export: Llama / Mixtral / OLMo folders load with no remote code in a process that
never imports moelab and give the moelab model's logits; other variants stay remote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from moelab.export import EXPORT_INFO, choose_format, inference_config, write_folder
from moelab.models import MoelabForCausalLM, MoelabLMConfig

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300}
BASE |= {"vocab_multiple": 128, "max_seq_len": 64, "rope_theta": 5000.0, "init_std": 0.2}
BASE |= {"moe_runtime": "torch", "moe_drop_tokens": False, "moe_num_experts": 4}

NATIVE = {
    "llama": ({"ffn": "dense", "norm": "rmsnorm", "norm_affine": True}, "LlamaForCausalLM"),
    "llama_no_affine": ({"ffn": "dense", "norm": "rmsnorm"}, "LlamaForCausalLM"),
    "olmo": ({"ffn": "dense", "norm": "layernorm"}, "OlmoForCausalLM"),
    "mixtral": ({"ffn": "moe", "norm": "rmsnorm", "moe_top_k": 2}, "MixtralForCausalLM"),
    "mixtral_g2": (
        {"ffn": "moe", "norm": "rmsnorm", "moe_top_k": 1, "moe_granularity": 2},
        "MixtralForCausalLM",
    ),
    "mixtral_autoep": (
        {"ffn": "moe", "norm": "rmsnorm", "moe_top_k": 2, "moe_impl": "autoep"},
        "MixtralForCausalLM",
    ),
}
REMOTE = {
    "top1": {"ffn": "moe", "norm": "rmsnorm", "moe_top_k": 1},
    "arctic": {"ffn": "arctic", "norm": "rmsnorm"},
    "pr_moe": {"ffn": "pr_moe", "norm": "rmsnorm"},
    "layernorm_moe": {"ffn": "moe", "norm": "layernorm"},
    "layernorm_affine": {"ffn": "dense", "norm": "layernorm", "norm_affine": True},
    "every_other_moe": {"ffn": "moe", "norm": "rmsnorm", "moe_layer_frequency": 2},
}

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(ids).logits, out)
    print(folder, type(model).__name__)
assert not any(m.split(".")[0] == "moelab" for m in sys.modules), "moelab was imported"
"""
"""Loads each folder with transformers' own classes in turn (one clean process for all)."""


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(300)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")))
    tok.eos_token = tok.pad_token = "t1"
    return tok


def random_model(fields: dict[str, object]) -> MoelabForCausalLM:
    torch.manual_seed(0)
    model = MoelabForCausalLM(MoelabLMConfig(**(BASE | fields))).eval()
    with torch.no_grad():  # norms and fused experts start at ones/empty: make every weight count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Loaded:
    """What the clean process printed and where it saved each folder's logits."""

    work: Path
    ids: torch.Tensor
    classes: dict[str, str]  # name -> the class transformers loaded


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """Every NATIVE variant written with a random model, then loaded by ONE process that never
    imports moelab (one interpreter start instead of one per variant)."""
    work = tmp_path_factory.mktemp("native")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(ids, work / "ids.pt")
    for name, (fields, _) in NATIVE.items():
        assert write_folder(random_model(fields), tokenizer(), work / name)[0] == "native"
    pairs = [str(work / p) for name in NATIVE for p in (name, f"{name}.pt")]
    run = subprocess.run(
        [sys.executable, "-c", LOAD, str(work / "ids.pt"), *pairs],
        cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    printed = dict(line.split() for line in run.stdout.splitlines())
    return Loaded(work, ids, {name: printed[str(work / name)] for name in NATIVE})


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_logits_in_clean_process(name: str, loaded: Loaded) -> None:
    fields, arch = NATIVE[name]
    out = loaded.work / name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and "auto_map" not in config
    assert not list(out.glob("*.py"))
    assert json.loads((out / EXPORT_INFO).read_text())["architecture"] == arch
    assert loaded.classes[name] == arch
    with torch.no_grad():
        ours = random_model(fields)(loaded.ids).logits
    torch.testing.assert_close(torch.load(out.with_suffix(".pt")), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(REMOTE))
def test_auto_keeps_remote_and_native_refuses(name: str) -> None:
    config = MoelabLMConfig(**(BASE | REMOTE[name]))
    fmt, arch, reason = choose_format(config, "auto")
    assert (fmt, arch) == ("remote", None) and reason.endswith(".")
    with pytest.raises(ValueError, match=r"^--format native: .*; use --format remote\.$"):
        choose_format(config, "native")


def test_inference_config_is_dropless() -> None:
    from moelab.config import ModelConfig
    from moelab.export import Source

    source = Source(Path("."), "global_step1", 1, type("C", (), {"model": ModelConfig()})())  # type: ignore[arg-type]
    assert inference_config(source).moe_drop_tokens is False
