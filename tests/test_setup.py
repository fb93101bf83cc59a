"""`make install` / `demo` on CPU and GPU hosts, checked with `make -n` (prints, runs nothing).

The Makefile and pyproject.toml are copied to a temporary folder, so no venv exists there and
`make -n install` prints the whole set-up. A GPU host is faked by an `nvidia-smi` script on
PATH that answers like the real one (`-L` and `--query-gpu=driver_version,compute_cap`); a host
without a GPU driver by one that fails like the real one does there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What `make install` runs on a CPU host (as before GPU support, but for DeepSpeed's
# shared-memory all-reduce op, built at install instead of by the first run's ranks).
CPU_INSTALL = [
    "test -x .venv/bin/python || python3 -m venv .venv",
    ".venv/bin/python -m pip install -q --upgrade pip setuptools wheel",
    ".venv/bin/python -m pip install -q torch==2.13.0",
    "DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 .venv/bin/python -m pip install -q "
    "--no-cache-dir --no-build-isolation deepspeed==0.19.8",
    ".venv/bin/python -m pip install -q -e '.[dev]'",
    "touch .venv/.moelab-installed",
]
CPU_DEMO = ".venv/bin/moelab-launch -m experiment=demo"

# Variables that steer the Makefile: the test's outer environment must not leak them in.
STEERING = (
    "DEVICE",
    "TORCH_CUDA",
    "TORCH_INDEX_URL",
    "TORCH_VERSION",
    "DEEPSPEED_VERSION",
    "DS_ACCELERATOR",
    "DEMO_ARGS",
    "NVIDIA_SMI",
    "PYTHON",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
)

H200_LIST = """\
GPU 0: NVIDIA H200 (UUID: GPU-5f0f0a5e-2d9c-7b41-9a8e-0c6d3c1b2a90)
GPU 1: NVIDIA H200 (UUID: GPU-8a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9)
"""
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


def fake_nvidia_smi(bin_dir: Path, *, driver: str = "580.95.05", cap: str = "9.0") -> None:
    """An `nvidia-smi` for a 2-GPU host: `-L` lists the GPUs, --query-gpu answers per GPU."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"  *-L*) cat <<'EOF'\n{H200_LIST}EOF\n  ;;\n"
        "  *--query-gpu=driver_version,compute_cap*)\n"
        f"    echo '{driver}, {cap}'; echo '{driver}, {cap}' ;;\n"
        "  *) echo 'unexpected arguments' >&2; exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)


def broken_nvidia_smi(bin_dir: Path) -> None:
    """`nvidia-smi` on a host without a working driver: exit 9 and a message, no GPU."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "{NO_DRIVER}"\nexit 9\n')
    script.chmod(0o755)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "moelab"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    return root


def env_with(bin_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STEERING}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def dry_run(project: Path, env: dict[str, str], *args: str) -> list[str]:
    """`make -n` in `project`: the commands it would run, continuation lines joined."""
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(project), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def exported(project: Path, env: dict[str, str], name: str, *args: str) -> str:
    """The value the Makefile exports to its recipes (and so to every rank) for `name`."""
    proc = subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-C",
            str(project),
            f'--eval=moelab-show-var: ; @echo "$${name}"',
            "moelab-show-var",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def squash(cmd: str) -> str:
    return " ".join(cmd.split())


def demo_line(lines: list[str]) -> str:
    (line,) = [c for c in lines if "moelab-launch" in c]
    return line


@pytest.fixture(params=["no nvidia-smi", "nvidia-smi without driver", "DEVICE=cpu on a GPU host"])
def cpu_host(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """(environment, extra make arguments) of a host that must get today's CPU set-up."""
    bin_dir = tmp_path / "bin"
    if request.param == "no nvidia-smi":
        if shutil.which("nvidia-smi"):
            pytest.skip("this machine has an nvidia-smi; the other cases cover a CPU host")
        return env_with(None), []
    if request.param == "nvidia-smi without driver":
        broken_nvidia_smi(bin_dir)
        return env_with(bin_dir), []
    fake_nvidia_smi(bin_dir)
    return env_with(bin_dir), ["DEVICE=cpu"]


def test_cpu_host_gets_todays_cpu_setup(
    project: Path, cpu_host: tuple[dict[str, str], list[str]]
) -> None:
    env, args = cpu_host
    assert dry_run(project, env, "install", *args) == CPU_INSTALL
    assert exported(project, env, "DS_ACCELERATOR", *args) == "cpu"
    assert demo_line(dry_run(project, env, "demo", *args)) == CPU_DEMO


@pytest.mark.parametrize("how", ["nvidia-smi lists GPUs", "DEVICE=cuda"])
def test_gpu_host_gets_cuda_torch_cuda_deepspeed_nvml_and_a_gpu_demo(
    project: Path, tmp_path: Path, how: str
) -> None:
    bin_dir = tmp_path / "bin"
    if how == "DEVICE=cuda":
        broken_nvidia_smi(bin_dir)  # forced: no GPU needs to be visible (e.g. a build host)
        args = ["DEVICE=cuda"]
    else:
        fake_nvidia_smi(bin_dir, driver="580.95.05", cap="9.0")
        args = []
    env = env_with(bin_dir)
    lines = [squash(c) for c in dry_run(project, env, "install", *args)]
    pip = [c for c in lines if " -m pip install " in c]
    torch = [c for c in pip if "torch==" in c]
    assert torch == [
        ".venv/bin/python -m pip install -q 'torch==2.13.0+cu130' "
        "--index-url 'https://download.pytorch.org/whl/cu130'"
    ]
    (deepspeed,) = [c for c in pip if "deepspeed==" in c]
    assert deepspeed.startswith("DS_BUILD_OPS=0 ") and "--no-build-isolation" in deepspeed
    assert deepspeed.endswith("deepspeed==0.19.8")
    assert any("nvidia-ml-py" in c for c in pip), "MLflow's GPU system metrics need pynvml"
    assert any("-e '.[dev]'" in c for c in pip)
    # torch, then DeepSpeed built against it, then the project
    assert pip.index(torch[0]) < pip.index(deepspeed) < len(pip) - 1
    assert lines[-1] == "touch .venv/.moelab-installed-cuda"
    assert exported(project, env, "DS_ACCELERATOR", *args) == "cuda"
    demo = dry_run(project, env, "demo", *args)
    assert demo_line(demo) == f"{CPU_DEMO} train.precision=bf16 train.allow_tf32=true"


@pytest.mark.parametrize(
    ("driver", "cap", "args", "wheel"),
    [
        ("580.95.05", "9.0", [], "cu130"),  # H100/H200 on a CUDA 13 driver
        ("575.57.08", "9.0", [], "cu126"),  # a CUDA 12.9 driver cannot run cu130
        ("580.95.05", "7.0", [], "cu126"),  # V100: cu130 has no sm_70 kernels
        ("580.95.05", "9.0", ["TORCH_CUDA=cu126"], "cu126"),  # forced
    ],
)
def test_torch_wheel_follows_driver_and_gpu(
    project: Path, tmp_path: Path, driver: str, cap: str, args: list[str], wheel: str
) -> None:
    fake_nvidia_smi(tmp_path / "bin", driver=driver, cap=cap)
    lines = dry_run(project, env_with(tmp_path / "bin"), "install", *args)
    (torch,) = [c for c in lines if "torch==" in c]
    assert f"'torch==2.13.0+{wheel}'" in torch
    assert f"--index-url 'https://download.pytorch.org/whl/{wheel}'" in torch


def test_torch_index_url_is_overridable(project: Path, tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin")
    mirror = "https://mirror.example.internal/pytorch/whl/cu130"
    lines = dry_run(project, env_with(tmp_path / "bin"), "install", f"TORCH_INDEX_URL={mirror}")
    (torch,) = [c for c in lines if "torch==" in c]
    assert f"--index-url '{mirror}'" in torch


def test_demo_args_are_overridable_on_any_host(project: Path, tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin")
    env = env_with(tmp_path / "bin")
    assert demo_line(dry_run(project, env, "demo", "DEMO_ARGS=")) == CPU_DEMO
    cpu = demo_line(dry_run(project, env, "demo", "DEVICE=cpu", "DEMO_ARGS=train.lr=0.001"))
    assert cpu == f"{CPU_DEMO} train.lr=0.001"
