# syntax=docker/dockerfile:1
# moelab trainer image: CUDA devel base (nvcc + ninja, so DeepSpeed can still JIT any op it was
# not built with), torch for that CUDA, DeepSpeed with the ops moelab uses prebuilt, moelab,
# pdsh and an sshd on port 2222 for multi-node launches. Build (from the repo root):
#   docker build -t moelab:latest .
#   docker build --build-arg CUDA_VERSION=12.6.3 --build-arg TORCH_CUDA=cu126 -t moelab:cu126 .
# Keep CUDA_VERSION and TORCH_CUDA in step: TORCH_CUDA picks the PyTorch wheel index
# (https://download.pytorch.org/whl/<TORCH_CUDA>) whose CUDA matches the base image's nvcc,
# which DeepSpeed checks when it compiles ops (major.minor must match exactly on CUDA 13).
# torch 2.13 has cu130 and cu126 wheels and no cu128 ones (docs/deploy.md, "What was checked");
# cu130 needs a host driver >= 580 and compute capability >= 7.5, cu126 covers older ones.
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
# pynvml, for MLflow's GPU system metrics (utilisation, memory per GPU)
ARG NVIDIA_ML_PY_VERSION=13.615.71
# Compute capabilities the prebuilt ops are compiled for (A100, L40S/4090, H100/H200).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG MOELAB_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DS_ACCELERATOR=cuda \
    TORCH_EXTENSIONS_DIR=/home/moelab/.cache/torch_extensions \
    PDSH_RCMD_TYPE=ssh \
    MOELAB_SSH_PORT=2222 \
    MOELAB_REPO=/opt/moelab

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Layer 1: system packages and the non-root user. ninja-build for DeepSpeed's op builds;
# pdsh + openssh-client for the head node's launcher, openssh-server for workers; libaio-dev
# only because DeepSpeed's op report probes it; curl/netcat for health checks.
# The base image tag fixes the Ubuntu release; the Ubuntu archive keeps only the latest patch
# of each package, so exact apt pins would break every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev \
      ninja-build git ca-certificates curl netcat-openbsd \
      pdsh openssh-client openssh-server libaio-dev \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel -r ubuntu 2>/dev/null || true) \
 && groupadd --gid "${MOELAB_UID}" moelab \
 && useradd --create-home --uid "${MOELAB_UID}" --gid "${MOELAB_UID}" --shell /bin/bash moelab \
 && mkdir -p /workspace /opt/venv /opt/moelab /run/sshd \
 && chown moelab:moelab /workspace /opt/venv /opt/moelab

USER ${MOELAB_UID}:${MOELAB_UID}
WORKDIR /opt/moelab

# Layer 2: the dependencies, cached until pyproject.toml changes (the source comes later).
# torch from the wheel index of the matching CUDA; then DeepSpeed built against it
# (--no-build-isolation) with prebuilt ops, which DeepSpeed recommends for images that many
# nodes start at once (no per-node JIT compile, no race on the extension cache).
# DS_ACCELERATOR=cuda: `docker build` sees no GPU, and without it DeepSpeed would pick its CPU
# accelerator and build the CPU variants of the ops (which it then ignores on a GPU node).
#   DS_BUILD_CPU_ADAM    DeepSpeedCPUAdam, moelab's optimizer with zero.offload_optimizer=cpu
#                        (ZeRO-Offload); without the op moelab falls back to torch's AdamW;
#   DS_BUILD_UTILS       DeepSpeed's flatten/unflatten op (its checkpoint writer and inference
#                        code; ZeRO in 0.19.8 flattens with torch's own functions);
#   DS_BUILD_FUSED_ADAM  DeepSpeed's FusedAdam, for DeepSpeed configs that ask for it. moelab
#                        does not use it: on a GPU its optimizer is torch's fused AdamW
#                        (torch.optim.AdamW(fused=True), DeepSpeed's "torch_adam" path, no op).
# DeepSpeed-MoE's gating and all-to-all are plain torch/NCCL and need no compiled op; any other
# op is still JIT-built on first use thanks to nvcc + ninja. moelab's own dependencies come
# from pyproject.toml's [project.dependencies] (all pinned there, DeepSpeed's version included),
# plus nvidia-ml-py.
COPY --chown=moelab:moelab pyproject.toml ./
RUN python3 -m venv /opt/venv \
 && pip install --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1 \
 && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
 && DEEPSPEED_VERSION="$(sed -n 's/^ *"deepspeed==\([^"]*\)".*/\1/p' pyproject.toml)" \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_UTILS=1 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
      "nvidia-ml-py==${NVIDIA_ML_PY_VERSION}" \
 && rm /tmp/requirements.txt \
 && ds_report

# Layer 3: the source (see .dockerignore), installed editable so hydra_conf/ resolves from the
# repo path, which is the same on every node.
COPY --chown=moelab:moelab . /opt/moelab
RUN pip install --no-deps -e /opt/moelab \
 && chmod 0755 /opt/moelab/docker/entrypoint.sh /opt/moelab/docker/healthcheck.sh

# Runs, the data cache and the local MLflow store land on /workspace: mount the same shared
# volume at the same path on every node (pdsh does `cd <launch dir>` there on each host).
WORKDIR /workspace
ENV MOELAB_CACHE=/workspace/.cache/moelab
# sshd for pdsh from the head node; not 22, so it never clashes with the host's sshd under
# host networking. It runs as moelab (no root needed on a port above 1024); keys are mounted.
EXPOSE 2222
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/opt/moelab/docker/healthcheck.sh"]
ENTRYPOINT ["/opt/moelab/docker/entrypoint.sh"]
CMD ["bash"]
