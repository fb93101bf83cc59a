"""Plain DeepSpeed training, hand-written: the reference moelab's overhead is measured against.

Same model (moelab's architecture code, built from a model-config JSON), same data (the packed
blocks moelab cached, read with `datasets.load_from_disk`), same ds_config values as
moelab's defaults; no Hydra, no MLflow, no telemetry, no checkpoints, no eval. Rank 0 prints
`BENCH_MARK {"step": N, "ts": <unix time>}` every `--log-every` steps.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank benchmarks/baseline/train_plain.py \
        --model-json model.json --blocks <cache>/blocks/<key> --ep-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import deepspeed
import torch
import torch.distributed as dist
from datasets import load_from_disk
from torch.utils.data import DataLoader, DistributedSampler

from moelab.config import ModelConfig, MoEConfig
from moelab.models import build_model
from moelab.shapes import threads_per_rank


def ds_config(args: argparse.Namespace, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch_size * world,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 1e-3,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.1,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": args.steps,
                "warmup_num_steps": 2,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": 0},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-json", required=True)
    p.add_argument("--blocks", required=True)
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--log-every", type=int, default=4)
    args = p.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads_per_rank(os.cpu_count(), local))

    with open(args.model_json) as f:
        spec = json.load(f)
    cfg = ModelConfig(**{**spec, "moe": MoEConfig(**spec["moe"])})
    model = build_model(cfg, args.ep_size, rank % args.ep_size, seed=42)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(args, world)
    )

    blocks = load_from_disk(args.blocks)["train"].with_format("torch", columns=["input_ids"])
    sampler = DistributedSampler(blocks, num_replicas=world, rank=rank, shuffle=True, seed=42)
    loader = DataLoader(blocks, batch_size=args.micro_batch_size, sampler=sampler, drop_last=True)
    batches = iter(loader)
    for step in range(1, args.steps + 1):
        ids = next(batches)["input_ids"]
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        if step % args.log_every == 0 and rank == 0:
            loss = float(out.loss.detach())
            print(
                "BENCH_MARK " + json.dumps({"step": step, "ts": time.time(), "loss": loss}),
                flush=True,
            )


if __name__ == "__main__":
    main()
