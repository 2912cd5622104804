#!/usr/bin/env bash
# The prepared GPU run of bench/many_sets.py: ViT-B-16 (random weights, the real geometry), K = 1 and 1,000
# coefficient sets, 16 clients of 16 images. Prepare .whl/ and .redis/ as bench/device_serving.sh says.
# Run (device tool): command `bash bench/device_many_sets.sh`, carry [".whl", ".redis"], timeout_s 540.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -x .redis/redis-server ]; then
  LD_LIBRARY_PATH=$PWD/.redis .redis/redis-server --port 6379 --bind 127.0.0.1 --save "" --daemonize yes
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RESIDUAL_REDIS_URL=redis://127.0.0.1:6379/0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 bench/many_sets.py --model ViT-B-16 --device cuda --sets 1,1000 --images 16 --clients 16 --seconds 20 \
  --rounds 2 --json "$OUT/many_sets_gpu.json" 2>&1 | tee "$OUT/many_sets_gpu.log"
