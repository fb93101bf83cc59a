"""moelab-export: pure-torch MoE == DeepSpeed's MoE in eval; every variant's export gives the
training model's logits; real ep2 checkpoint round trips of the classic layer and of AutoEP
(`model.moe.impl=autoep`)."""

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

from helpers import REPO, one_rank_env, torch_twin_matches_deepspeed
from launcher.export_cmd import main as export_main
from moelab.checkpoint import read_meta
from moelab.config import ModelConfig, MoEConfig, load_config
from moelab.datakeys import blocks_dir
from moelab.export import resolve_source
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
    dropped = torch_twin_matches_deepspeed(_tiny(ffn, top_k, drop), 256)
    # capacity 0.5 drops routes when drop_tokens is on, never when it is off
    assert any(dropped) == drop


VARIANT_CHILD = r"""
import json, os, sys
from pathlib import Path
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM
from launcher.compose import compose_config, to_schema
from moelab import data, engine
from moelab.checkpoint import BatchStream, Checkpointer
from moelab.dsconfig import build_ds_config
from moelab.export import export
from moelab.models import build_model
from moelab.rundir import RunDir

engine.init_distributed(1)
root, steps = Path(sys.argv[1]), 3
for case in sys.argv[2:]:
    name, *overrides = case.split(" ")
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = to_schema(compose_config([
        *overrides, "model.n_layers=2", "cluster.nproc_per_node=1", "zero=stage2",
        "train=smoke", f"train.steps={steps}", "train.warmup_steps=1", f"run_dir={run_dir}",
    ]))
    OmegaConf.save(OmegaConf.structured(cfg), RunDir(run_dir).config)
    data.prepare_data(cfg.data)
    dsets, _ = data.load_prepared(cfg.data)
    t = cfg.train
    ds = engine.initialize(build_model(cfg.model, 1, 0, t.seed), build_ds_config(cfg))
    stream = BatchStream(data.build_loader(dsets["train"], t.micro_batch_size, 0, 1, t.seed, True))
    for _ in range(steps):
        ids = next(stream)["input_ids"]
        ds.backward(ds(ids, labels=ids).loss)
        ds.step()
    Checkpointer(cfg, 1, 1, 0).save(ds, steps, stream)
    out = export(run_dir, root / f"{name}-hf")
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ds.eval()
    if cfg.model.is_moe and cfg.model.moe.impl == "autoep":
        reference = ds.module  # AutoEP's own layer (dropless) after deepspeed.initialize
    else:  # DeepSpeed's MoE layer in eval, the engine's weights, drop_tokens off
        cfg.model.moe.drop_tokens = False
        reference = build_model(cfg.model, 1, 0, t.seed).eval()
        reference.load_state_dict(ds.module.state_dict())
    val = data.build_loader(dsets["validation"], t.micro_batch_size, 0, 1, t.seed, False)
    diffs = []
    with torch.no_grad():
        for i, batch in enumerate(val):  # the run's eval batches (train.evaluate's loader)
            if i >= t.eval_batches:
                break
            ids = batch["input_ids"]
            diffs.append(float((reference(ids).logits - exported(ids).logits).abs().max()))
    info = json.loads((out / "moelab_export.json").read_text())
    print(json.dumps({"case": name, "diffs": diffs, "arch": info["architecture"],
                      "k": cfg.model.moe.active_experts if cfg.model.is_moe else 0}), flush=True)
"""
"""One gloo rank (one process): per variant, a DeepSpeed engine takes 3 steps and saves a
checkpoint with moelab's Checkpointer; `export()` writes its folder, which is loaded with
`from_pretrained` and compared with the training model on the run's eval batches."""

VARIANTS = {  # case -> overrides (2 layers each)
    "top1": "model=tiny_moe_top1",
    "top2": "model=tiny_moe_top2",
    "granular": "model=tiny_moe_top2 model.moe.granularity=2",  # 8 experts, top-4
    "pr_moe": "model=tiny_pr_moe",
    "arctic": "model=tiny_arctic",
    "autoep": "model=tiny_moe_top2 model.moe.impl=autoep",
    "mixtral": "model=tiny_moe_top2 model.norm=rmsnorm",  # written as transformers' Mixtral
}


@pytest.mark.slow
def test_every_variant_exports_the_training_models_logits(
    tmp_path: Path, shared_cache: Path
) -> None:
    env = one_rank_env() | {"MOELAB_CACHE": str(shared_cache), "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    cases = [f"{name} {overrides}" for name, overrides in VARIANTS.items()]
    proc = subprocess.run(
        [sys.executable, "-c", VARIANT_CHILD, str(tmp_path), *cases],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    got = {r["case"]: r for r in map(json.loads, lines)}
    assert sorted(got) == sorted(VARIANTS)
    for name, r in got.items():
        assert len(r["diffs"]) == 2 and max(r["diffs"]) <= 1e-5, (name, r["diffs"])
    assert got["granular"]["k"] == 4  # top-k > 2: the pure-torch top-k routing
    assert got["mixtral"]["arch"] == "MixtralForCausalLM"
    assert got["top2"]["arch"] == "MoelabForCausalLM"
    native, remote = ((tmp_path / f"{n}-hf" / "README.md").read_text() for n in ("mixtral", "top2"))
    assert "from_pretrained(path)\n" in native and "## Format\n\n`native`" in native
    assert "from_pretrained(path, trust_remote_code=True)" in remote
    assert "- Final eval loss: not recorded" in remote  # these runs have no MLflow run


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
    assert info["card"]["eval_loss"] == {"value": logged, "step": info["step"], "from": "MLflow"}
    assert info["card"]["mlflow_run_id"] == info["mlflow"]["run_id"]
    cfg = load_config(run_dir / "config.yaml")
    # The export routes dropless; the run's eval/loss is its own only where its eval dropped
    # nothing: AutoEP never drops, and the classic run's eval capacity covers every token.
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    assert cfg.model.moe.dropless or cfg.model.moe.capacity(tokens, training=False) >= tokens

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
