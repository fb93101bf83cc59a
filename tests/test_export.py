"""moelab-export: pure-torch MoE == DeepSpeed's MoE in eval; a real ep2 checkpoint round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.export import main as export_main
from moelab.config import ModelConfig, MoEConfig
from moelab.export import gather_state_dict, resolve_source
from moelab.models import build_model
from moelab.models.moe_torch import TopKRouter
from trained_moe import TrainedMoE, subprocess_env, trained_moe  # noqa: F401

LOAD_SCRIPT = """
import sys, torch
sys.modules["moelab"] = None  # the folder must load without moelab and DeepSpeed
sys.modules["deepspeed"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
out, io = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
ids = torch.load(io + "/ids.pt")
with torch.no_grad():
    logits = model(ids).logits
prompt = tok("To be, or not to be", return_tensors="pt").input_ids
gen = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "dist": torch.distributed.is_initialized(),
            "new": gen[0, prompt.shape[1]:], "text": tok.decode(gen[0, prompt.shape[1]:])},
           io + "/out.pt")
"""


def _tiny(ffn: str, top_k: int, drop: bool) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=top_k, eval_capacity_factor=0.5, min_capacity=1)
    moe.drop_tokens = drop
    return ModelConfig(ffn=ffn, d_model=32, n_layers=2, n_heads=4, vocab_size=256, moe=moe)


@pytest.mark.parametrize(
    ("ffn", "top_k", "drop"),
    [
        ("moe", 1, True),
        ("moe", 2, True),
        ("moe", 2, False),
        ("pr_moe", 1, False),
        ("arctic", 2, True),
    ],
)
def test_torch_moe_matches_deepspeed_moe_in_eval(ffn: str, top_k: int, drop: bool) -> None:
    cfg = _tiny(ffn, top_k, drop)
    ds = build_model(cfg, seed=3).eval()
    pt = build_model(cfg, seed=4, moe_impl="torch").eval()
    pt.load_state_dict(ds.state_dict())
    dropped: list[bool] = []
    for m in pt.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(lambda _m, _a, out: dropped.append(bool((out[1] < 0).any())))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ds(ids), pt(ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=0)
    for a, b in zip(got.exp_counts, want.exp_counts, strict=True):
        assert torch.equal(a, b)
    # capacity 0.5 drops routes when drop_tokens is on, never when it is off
    assert any(dropped) == drop


def test_export_refuses_a_directory_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.yaml"):
        resolve_source(tmp_path)
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2


@pytest.mark.slow
def test_export_round_trip_from_ep2_checkpoint(trained_moe: TrainedMoE, tmp_path: Path) -> None:  # noqa: F811
    out = trained_moe.hf_dir
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.MoelabForCausalLM"
    assert config["moe_impl"] == "torch" and config["ep_size"] == 1
    for name in ("model.safetensors", "tokenizer.json", "modeling.py", "moe_torch.py"):
        assert (out / name).exists(), name
    info = json.loads((out / "moelab_export.json").read_text())
    assert info["tag"] == "global_step4" and info["mlflow"]["run_id"]

    # The training model (DeepSpeed's MoE layer) on every expert the two EP ranks wrote.
    source = resolve_source(trained_moe.run_dir)
    reference = build_model(source.cfg.model, ep_size=1).eval()
    reference.load_state_dict(gather_state_dict(source))
    ids = torch.randint(0, 4000, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = reference(ids).logits

    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out), str(tmp_path)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "out.pt")
    assert res["dist"] is False
    torch.testing.assert_close(res["logits"], want, atol=1e-5, rtol=0)
    assert res["new"].numel() == 12 and isinstance(res["text"], str) and res["text"]
