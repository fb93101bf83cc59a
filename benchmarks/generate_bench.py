"""Greedy `generate()` tokens/s with and without the KV cache, batch 1 and 16.

Models are built from the Hydra presets with the exported model's runtime (pure-torch MoE,
dropless), random init; prompt 32 tokens, 32 new ones, best of 3 after a warm-up. Prints a
table with the cached / uncached ratio (both measured in this run) and appends one record
per row to `benchmarks/results/generate.jsonl`.

    python benchmarks/generate_bench.py [--models tiny_moe_top2,seed_cpu_moe] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from benchlib import RESULTS_DIR, append_jsonl, format_table, machine, record

from moelab.inference import Throughput, generate_throughput
from moelab.models import MoelabForCausalLM, MoelabLMConfig

BATCHES = (1, 16)


def build(preset: str, device: str) -> MoelabForCausalLM:
    from launcher.compose import compose_config, to_schema

    cfg = to_schema(compose_config([f"model={preset}"])).model
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, drop_tokens=False))
    torch.manual_seed(0)
    config = MoelabLMConfig.from_model_config(cfg, moe_runtime="torch")
    model = MoelabForCausalLM(config).to(device).eval()
    with torch.no_grad():  # the fused dropless experts have no initialiser of their own
        for n, p in model.named_parameters():
            if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, config.init_std)
    return model


def measure(preset: str, device: str) -> list[tuple[Throughput, Throughput]]:
    model = build(preset, device)
    cached = generate_throughput(model, BATCHES, use_cache=True)
    uncached = generate_throughput(model, BATCHES, use_cache=False)
    return list(zip(cached, uncached, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_moe_top2,seed_cpu_moe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    env = machine(args.device) | {"torch": torch.__version__}
    rows = []
    for preset in args.models.split(","):
        for c, u in measure(preset, args.device):
            ratio = c.tokens_per_s / u.tokens_per_s
            rows.append([preset, c.batch_size, f"{c.tokens_per_s:.1f}", f"{u.tokens_per_s:.1f}",
                         f"{ratio:.2f}"])  # fmt: skip
            result = {
                "model": preset, "batch": c.batch_size, "prompt": c.prompt_len,
                "new_tokens": c.new_tokens, "cached_tokens_per_s": round(c.tokens_per_s, 2),
                "uncached_tokens_per_s": round(u.tokens_per_s, 2), "ratio": round(ratio, 3),
            }  # fmt: skip
            append_jsonl(RESULTS_DIR / "generate.jsonl", record("generate", result, env))
    headers = ["model", "batch", "tok/s cache", "tok/s no cache", "ratio"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
