#!/usr/bin/env bash
# Entry point of the s2v-batch worker image.
#   With a command: run it (KubeRay sets its own `ray start ...`, the Ray cluster launcher runs
#   `bash`, a Prefect Kubernetes Job runs the flow): the image stays out of their way.
#   Without one: join the Ray cluster at RAY_HEAD_ADDRESS (host:6379) as a worker node and stay
#   in the foreground; Ray detects the container's GPUs itself.
set -euo pipefail

if [[ $# -gt 0 ]]; then
  exec "$@"
fi

checkpoint="${S2V_CHECKPOINT:-}"
if [[ -n "$checkpoint" && "$checkpoint" != s3://* && ! -e "$checkpoint" ]]; then
  # Not fatal: a node can join before the volume is populated, but say what is wrong early.
  echo "entrypoint: S2V_CHECKPOINT=$checkpoint does not exist in this container;" \
       "mount the model volume at /models (docs/deploy.md, step 3)" >&2
fi

if [[ -z "${RAY_HEAD_ADDRESS:-}" ]]; then
  echo "entrypoint: no command given and RAY_HEAD_ADDRESS is not set;" \
       "set RAY_HEAD_ADDRESS=<head-host>:6379 to join a Ray cluster, or pass a command" >&2
  exit 2
fi
exec ray start --address="$RAY_HEAD_ADDRESS" --block
