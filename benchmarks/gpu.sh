#!/usr/bin/env bash
# Items 1 and 2 of the benchmarks at the seed report's real sizes, bf16, on one GPU (ep_size 1):
#   1. seed_600m_{dense,moe,hybrid} (+ moe top-1, moe_layer_frequency 2) through moelab-launch,
#      seq 2048: tokens/s, MFU (against the GPU's datasheet bf16 peak) and a2a fraction;
#   2. the MoE layer at the seed MoE's shape (d_model 1024, expert hidden 4096) against a
#      dense SwiGLU of the same active FLOPs: time and peak-memory ratios.
# Results go to benchmarks/results/variants_gpu.jsonl and moe_layer_gpu.jsonl.
#
#   bash benchmarks/gpu.sh            # from the repo root, with .venv holding a CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: gpu.sh needs one GPU")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. variant throughput (seed_600m presets, bf16, 1 GPU) =="
"$PY" benchmarks/launch_bench.py --gpu --rounds "${ROUNDS:-2}" --steps "${STEPS:-30}" \
  --log-every 5 --micro-batch-size "${MICRO_BATCH:-8}"

echo "== 2. MoE layer cost (d_model 1024, expert hidden 4096, bf16) =="
"$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --d-model 1024 --expert-hidden 4096 \
  --reps "${REPS:-10}"
