"""moelab-export: pure-torch MoE == DeepSpeed's MoE in eval; real ep2 checkpoint round trips of
the classic layer and of AutoEP (`model.moe.impl=autoep`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from trained_autoep import autoep_runs, trained_autoep  # noqa: F401

from launcher.export_cmd import main as export_main
from moelab.checkpoint import read_meta
from moelab.config import ModelConfig, MoEConfig, load_config
from moelab.datakeys import blocks_dir
from moelab.export import resolve_source
from moelab.models import build_model
from moelab.models.moe_torch import TopKRouter
from trained_moe import TrainedMoE, subprocess_env, trained_moe  # noqa: F401

LOAD_SCRIPT = r"""
import json, sys
sys.modules["moelab"] = sys.modules["deepspeed"] = None  # as where neither is installed
import torch
import torch.nn.functional as F
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

out, blocks, run_dir, io = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
train = json.load(open(io + "/train.json"))
world = json.load(open(run_dir + "/checkpoints/meta.json"))["world_size"]

# The run's eval batches: each rank takes every world-th block of the validation split
# (unshuffled, the tail that does not fill a round dropped), full micro-batches only, the
# first eval_batches of them.
ids = torch.tensor(load_from_disk(blocks)["validation"]["input_ids"], dtype=torch.long)
per_rank = len(ids) // world
size, count = train["micro_batch_size"], train["eval_batches"]
rank_means, counts = [], []
for rank in range(world):
    mine = ids[rank : per_rank * world : world]
    batches = [mine[i : i + size] for i in range(0, len(mine) - size + 1, size)][:count]
    losses = []
    with torch.no_grad():
        for batch in batches:  # one forward per rank's micro-batch: MoE capacity is per batch
            logits = model(batch).logits.float()
            target = batch[:, 1:].reshape(-1)
            losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target))
    rank_means.append(torch.stack(losses).mean())
    counts.append(len(batches))
prompt = tok("To be, or not to be", return_tensors="pt").input_ids
gen = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
loaded = sorted(m for m, mod in sys.modules.items()
                if mod is not None and m.split(".")[0] in ("moelab", "deepspeed"))
torch.save({"loss": float(torch.stack(rank_means).mean()), "batches": counts,
            "dist": torch.distributed.is_initialized(), "loaded": loaded,
            "new": gen[0, prompt.shape[1]:], "text": tok.decode(gen[0, prompt.shape[1]:])},
           io + "/out.pt")
"""
"""A clean process (no moelab, no DeepSpeed) on the exported folder: the mean LM loss on the
run's own eval batches, rebuilt from the data cache without moelab's loaders, and a greedy
generation."""


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
    pt = build_model(cfg, seed=4, moe_runtime="torch").eval()
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
@pytest.mark.parametrize("impl", ["classic", "autoep"])
def test_export_round_trip_from_ep2_checkpoint(impl: str, request: Any, tmp_path: Path) -> None:
    """The exported folder, loaded in a clean process, gives the run's own logged `eval/loss`
    on the run's eval batches: every expert of both EP ranks is where training had it (for
    AutoEP: its w1/w3/w2 slices back in the fused gate_up_proj/down_proj layout)."""
    run: TrainedMoE = request.getfixturevalue(
        "trained_moe" if impl == "classic" else "trained_autoep"
    )
    out, run_dir = run.hf_dir, run.run_dir
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.MoelabForCausalLM"
    assert config["moe_runtime"] == "torch" and config["ep_size"] == 1
    assert config["moe_impl"] == impl
    for name in ("model.safetensors", "tokenizer.json", "modeling.py", "moe_torch.py"):
        assert (out / name).exists(), name
    assert (out / "moe_dropless.py").exists()  # imported relatively by blocks.py: copied
    info = json.loads((out / "moelab_export.json").read_text())
    meta = read_meta(run_dir)
    assert meta is not None and meta["ep_size"] == 2
    assert (info["tag"], info["step"]) == (meta["tag"], meta["step"])
    logged = logged_eval_loss(info["mlflow"], info["step"])

    cfg = load_config(run_dir / "config.yaml")
    train = {"micro_batch_size": cfg.train.micro_batch_size, "eval_batches": cfg.train.eval_batches}
    (tmp_path / "train.json").write_text(json.dumps(train))
    args = [str(out), str(blocks_dir(cfg.data)), str(run_dir), str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *args],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "out.pt")
    assert res["loaded"] == [] and res["dist"] is False
    assert res["batches"] == [cfg.train.eval_batches] * meta["world_size"]
    assert abs(res["loss"] - logged) <= 1e-4, f"exported {res['loss']:.6f}, run logged {logged:.6f}"
    assert res["new"].numel() == 12 and isinstance(res["text"], str) and res["text"]


def logged_eval_loss(ref: dict[str, str], step: int) -> float:
    """The `eval/loss` the run logged at `step` (the exported checkpoint's)."""
    client = MlflowClient(tracking_uri=ref["tracking_uri"])
    history = {m.step: m.value for m in client.get_metric_history(ref["run_id"], "eval/loss")}
    assert step in history, f"the run logged eval/loss at steps {sorted(history)}, not at {step}"
    return history[step]
