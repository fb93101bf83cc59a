#!/usr/bin/env bash
# The GPU smoke test in one command (what `make gpu-smoke` runs): set up the Python environment
# (benchmarks/gpu_setup.sh: offline, from the wheels in .whl/py312/), then run
# benchmarks/gpu_smoke.py, which writes benchmarks/results/gpu_smoke.json and prints a summary.
# The set-up time counts towards the smoke's 8-minute budget. Arguments go to gpu_smoke.py:
#
#   bash benchmarks/gpu_smoke.sh                      # one CUDA GPU
#   bash benchmarks/gpu_smoke.sh --device cpu --out /tmp/smoke.json   # the CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s.%N)
SETUP=()
case " $* " in *" --device cpu "* | *" --device=cpu "*) SETUP=(--allow-cpu) ;; esac
PY_FILE=$(mktemp)
trap 'rm -f "$PY_FILE"' EXIT
GPU_PY_FILE=$PY_FILE bash benchmarks/gpu_setup.sh "${SETUP[@]}"
PY=$(cat "$PY_FILE")
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/gpu_smoke.py --t0 "$T0" "$@"
