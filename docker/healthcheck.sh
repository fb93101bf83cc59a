#!/usr/bin/env bash
# Container health: moelab imports, and sshd answers on its port when this node runs one.
set -euo pipefail
STATE="${MOELAB_SSHD_STATE:-$HOME/.moelab-sshd}"
if [[ -f "$STATE/sshd_config" ]]; then
  nc -z -w 3 127.0.0.1 "${MOELAB_SSH_PORT:-2222}"
fi
python -c "import moelab, launcher" >/dev/null
