#!/usr/bin/env bash
# Write deploy/k8s/base/secrets.env (untracked, mode 600) with fresh random keys and a Redis password.
# kustomize's secretGenerator turns it into the Secret `residual-secrets`. Refuses to overwrite an existing file.
set -euo pipefail
out=${1:-"$(dirname "$0")/k8s/base/secrets.env"}
if [ -e "$out" ]; then
  echo "$out exists; delete it first to rotate the keys" >&2
  exit 1
fi
rand() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }
pw=$(rand)
umask 077
cat > "$out" <<ENV
REDIS_PASSWORD=$pw
RESIDUAL_API_KEY=$(rand)
RESIDUAL_ADMIN_API_KEY=$(rand)
RESIDUAL_REDIS_URL=redis://:$pw@residual-redis-cache:6379/0
RESIDUAL_QUEUE_REDIS_URL=redis://:$pw@residual-redis-queue:6379/0
ENV
echo "wrote $out (keep it out of git; share the API keys with clients through your secret manager)"
