#!/usr/bin/env bash
# Items 1 and 2 of the benchmarks at the seed report's real sizes, bf16, on one GPU (ep_size 1):
#   1. seed_600m_{dense,moe,hybrid} through moelab-launch, seq 2048: tokens/s, MFU (against the
#      GPU's datasheet bf16 peak) and a2a fraction, with the MoE/dense and hybrid/dense ratios;
#      CASES=dense,moe,hybrid,moe_top1,moe_freq2 adds top-1 and moe_layer_frequency 2;
#   2. the MoE layer at the seed MoE's shape (d_model 1024, expert hidden 4096) against a
#      dense SwiGLU of the same active FLOPs: time and peak-memory ratios.
# Both for each MoE implementation named by the first argument (or IMPLS): classic
# (deepspeed.moe), autoep (DeepSpeed AutoEP, dropless), or both, comma-separated (default):
# item 1 adds the moe_autoep and hybrid_autoep launches, item 2 the AutoEP layer's cells.
# Results go to benchmarks/results/variants_gpu.jsonl and moe_layer_gpu.jsonl.
#
# Sized for 10 minutes on one H200 with IMPLS=classic: 2 rounds x 3 launches (each ~15-30 s
# of start-up, 30 steps), then 10 MoE-layer cells (4k and 16k tokens, 8 and 32 experts;
# --quick keeps 16k at top-2 with drops); both implementations add 2 x 2 launches and 6
# cells (about 15 minutes). The set-up (benchmarks/gpu_setup.sh: the offline wheels of
# .whl/py312/, or .venv when it holds a CUDA torch) runs first; PY=... skips it.
#
#   bash benchmarks/gpu.sh                  # from the repo root, on a machine with one CUDA GPU
#   bash benchmarks/gpu.sh autoep           # AutoEP only (the dense baseline still runs)
set -euo pipefail
IMPLS=${1:-${IMPLS:-classic,autoep}}
DEFAULT_CASES=dense
for impl in ${IMPLS//,/ }; do
  case $impl in
    classic) DEFAULT_CASES+=",moe,hybrid" ;;
    autoep) DEFAULT_CASES+=",moe_autoep,hybrid_autoep" ;;
    *) echo "gpu.sh: unknown implementation '$impl' (classic, autoep)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  PY_FILE=$(mktemp)
  trap 'rm -f "$PY_FILE"' EXIT
  GPU_PY_FILE=$PY_FILE bash benchmarks/gpu_setup.sh
  PY=$(cat "$PY_FILE")
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: gpu.sh needs one GPU")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. variant throughput (seed_600m presets, bf16, 1 GPU) =="
"$PY" benchmarks/launch_bench.py --gpu --rounds "${ROUNDS:-2}" --steps "${STEPS:-30}" \
  --log-every 5 --micro-batch-size "${MICRO_BATCH:-8}" --cases "${CASES:-$DEFAULT_CASES}"

echo "== 2. MoE layer cost (d_model 1024, expert hidden 4096, bf16) =="
"$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --d-model 1024 --expert-hidden 4096 \
  --tokens "${MOE_TOKENS:-4096,16384}" --experts "${MOE_EXPERTS:-8,32}" --quick \
  --impls "$IMPLS" --reps "${REPS:-10}"
