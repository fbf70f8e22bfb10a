#!/usr/bin/env bash
# Container health for the s2v-batch worker image (Docker HEALTHCHECK).
# Healthy when this container runs no Ray node (a flow run or a one-off command: its own exit
# code tells), or when the local raylet answers Ray's health endpoint on the dashboard agent.
set -uo pipefail

if ! pgrep -x raylet >/dev/null 2>&1; then
  exit 0
fi
# 52365: the dashboard agent's default port (ray start --dashboard-agent-listen-port).
wget -q -T 4 -O- "http://127.0.0.1:52365/api/local_raylet_healthz" | grep -q success
