#!/usr/bin/env bash
# Run the service on the embedded default model: Redis (the one at RESIDUAL_REDIS_URL when it answers, else a
# private redis-server), one alignment worker, and the API on http://${HOST:-127.0.0.1}:${PORT:-8000} (/docs).
# The first run installs .venv (scripts/setup.sh); later runs skip that unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RESIDUAL_REDIS_URL=${RESIDUAL_REDIS_URL:-redis://127.0.0.1:6379/0}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export RESIDUAL_WORKER_METRICS_HOST=${RESIDUAL_WORKER_METRICS_HOST:-127.0.0.1}  # the worker's metrics: loopback only
if ! .venv/bin/python -c "import os, redis; redis.Redis.from_url(os.environ['RESIDUAL_REDIS_URL'], socket_connect_timeout=1).ping()" 2>/dev/null; then
  command -v redis-server >/dev/null || { echo "no Redis answers at $RESIDUAL_REDIS_URL and redis-server is not installed" >&2; exit 1; }
  port=${REDIS_PORT:-6390}
  mkdir -p artifacts/redis
  redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/artifacts/redis" --appendonly yes --daemonize yes \
    --maxmemory-policy noeviction --pidfile "$PWD/artifacts/redis/redis.pid" --logfile "$PWD/artifacts/redis/redis.log"
  export RESIDUAL_REDIS_URL="redis://127.0.0.1:$port/0"
  echo "started redis-server on port $port (stop: kill \$(cat artifacts/redis/redis.pid))"
fi
.venv/bin/residual-worker &
worker=$!
trap 'kill $worker 2>/dev/null || true' EXIT INT TERM
.venv/bin/residual-serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
