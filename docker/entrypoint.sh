#!/usr/bin/env bash
# moelab container entrypoint.
#   entrypoint.sh worker      run sshd in the foreground (a node that pdsh reaches; the head
#                             node runs it too and you `docker compose exec` the launch there)
#   entrypoint.sh CMD [ARGS]  start sshd in the background when keys are mounted, then exec CMD
#
# ssh keys are mounted, never baked in (docker/ssh/README.md). From $MOELAB_SSH_DIR
# (default /run/moelab-ssh, read-only):
#   authorized_keys   public keys allowed to log in here (enables sshd)
#   id_ed25519        private key this node uses to reach the others (the head node's pdsh)
# sshd host keys are generated on first start under $MOELAB_SSHD_STATE (per container).
set -euo pipefail

SSH_DIR_IN="${MOELAB_SSH_DIR:-/run/moelab-ssh}"
PORT="${MOELAB_SSH_PORT:-2222}"
STATE="${MOELAB_SSHD_STATE:-$HOME/.moelab-sshd}"
SSHD="${MOELAB_SSHD_BIN:-/usr/sbin/sshd}"
ME="$(id -un)"

setup_client() {
  install -d -m 0700 "$HOME/.ssh"
  if [[ -f "$SSH_DIR_IN/id_ed25519" ]]; then
    install -m 0600 "$SSH_DIR_IN/id_ed25519" "$HOME/.ssh/id_ed25519"
    [[ -f "$SSH_DIR_IN/id_ed25519.pub" ]] && install -m 0644 "$SSH_DIR_IN/id_ed25519.pub" "$HOME/.ssh/"
  fi
  [[ -f "$SSH_DIR_IN/known_hosts" ]] && install -m 0644 "$SSH_DIR_IN/known_hosts" "$HOME/.ssh/known_hosts"
  # pdsh and DeepSpeed's ssh check read this: every node's sshd listens on $PORT.
  cat > "$HOME/.ssh/config" <<CFG
Host *
  Port $PORT
  IdentityFile $HOME/.ssh/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking accept-new
  UserKnownHostsFile $HOME/.ssh/known_hosts
  BatchMode yes
CFG
  chmod 0600 "$HOME/.ssh/config"
}

setup_sshd() {
  install -d -m 0700 "$STATE"
  # Copied, not used in place: sshd's StrictModes refuses files owned by another uid or
  # group-writable, which bind mounts from the host often are.
  install -m 0600 "$SSH_DIR_IN/authorized_keys" "$HOME/.ssh/authorized_keys"
  [[ -f "$STATE/ssh_host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh_host_ed25519_key"
  # pdsh's remote shell is non-interactive and starts from sshd's default environment: hand
  # it the container's (CUDA, NCCL, venv PATH, MOELAB_*), read via PermitUserEnvironment.
  env | grep -E '^(PATH|LD_LIBRARY_PATH|VIRTUAL_ENV|CUDA_[A-Z_]*|NVIDIA_[A-Z_]*|NCCL_[A-Z_]*|GLOO_[A-Z_]*|MOELAB_[A-Z_]*|MLFLOW_TRACKING_URI|HF_[A-Z_]*|TORCH_[A-Z_]*|PDSH_[A-Z_]*)=' \
    > "$HOME/.ssh/environment" || true
  chmod 0600 "$HOME/.ssh/environment"
  local root_login=no
  [[ "$(id -u)" == 0 ]] && root_login=prohibit-password
  cat > "$STATE/sshd_config" <<CFG
Port $PORT
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd.pid
AuthorizedKeysFile $HOME/.ssh/authorized_keys
AllowUsers $ME
PermitRootLogin $root_login
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserEnvironment yes
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
CFG
  "$SSHD" -t -f "$STATE/sshd_config"
}

setup_client
sshd_on=0
if [[ "${MOELAB_SSHD:-auto}" != 0 && -f "$SSH_DIR_IN/authorized_keys" ]]; then
  setup_sshd
  sshd_on=1
elif [[ "${MOELAB_SSHD:-auto}" == 1 ]]; then
  echo "entrypoint: MOELAB_SSHD=1 but no $SSH_DIR_IN/authorized_keys is mounted" >&2
  exit 2
fi

if [[ "${1:-}" == worker ]]; then
  if [[ "$sshd_on" != 1 ]]; then
    echo "entrypoint: 'worker' needs $SSH_DIR_IN/authorized_keys (docker/ssh/README.md)" >&2
    exit 2
  fi
  echo "entrypoint: sshd for $ME on port $PORT"
  exec "$SSHD" -D -e -f "$STATE/sshd_config"
fi
if [[ "$sshd_on" == 1 ]]; then
  "$SSHD" -f "$STATE/sshd_config"
fi
exec "$@"
