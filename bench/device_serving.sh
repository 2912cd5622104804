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
. bench/device_env.sh  # the carried wheels and redis-server, offline settings, the GPU in $OUT
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
python3 bench/serving.py --device cuda --model ViT-B-16 --weights random --format jpeg --size 224 \
  --clients 32,128 --transport multipart,json --load-procs 6 --duration 20 --json "$OUT/serving-gpu.json" \
  2>&1 | tee "$OUT/serving-gpu.log"
