#!/usr/bin/env bash
# The prepared GPU run of the serving issue: the CUDA pipeline tests and bench/serving.py on ViT-B-16 (random
# weights, 224-px JPEGs; multipart and base64 JSON at 32 and 128 clients). About 5 minutes; results in $OUT.
#
# Prepare here (CPU), once:
#   echo /.whl/ >> .git/info/exclude; echo /.redis/ >> .git/info/exclude
#   wheels for cp312 manylinux into .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12
#     --platform manylinux2014_x86_64): open_clip_torch, ftfy, wcwidth, schedulefree, fastapi, opentelemetry-api,
#     starlette, pydantic, pydantic_core, annotated-types, annotated-doc, typing-inspection, pydantic-settings,
#     python-dotenv, uvicorn, redis, rq, croniter, python-multipart, pillow, httptools, pytest, pluggy, iniconfig,
#     packaging and pytest-timeout (torch, torchvision, numpy and httpx are on the device already)
#   mkdir -p .redis && cp /usr/bin/redis-server /lib/x86_64-linux-gnu/liblzf.so.1 \
#     /lib/x86_64-linux-gnu/libjemalloc.so.2 .redis/
# Run (device tool): command `bash bench/device_serving.sh`, carry [".whl", ".redis"], timeout_s 540.
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
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
python3 bench/serving.py --device cuda --model ViT-B-16 --weights random --format jpeg --size 224 \
  --clients 32,128 --transport multipart,json --load-procs 6 --duration 20 --json "$OUT/serving-gpu.json" \
  2>&1 | tee "$OUT/serving-gpu.log"
