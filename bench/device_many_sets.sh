#!/usr/bin/env bash
# The prepared GPU run of bench/many_sets.py: ViT-B-16 (random weights, the real geometry), K = 1 and 1,000
# coefficient sets, 16 clients of 16 images. Prepare .whl/ and .redis/ as bench/device_serving.sh says.
# Run (device tool): command `bash bench/device_many_sets.sh`, carry [".whl", ".redis"], timeout_s 540.
set -uo pipefail
. bench/device_env.sh  # the carried wheels and redis-server, offline settings, the GPU in $OUT
python3 bench/many_sets.py --model ViT-B-16 --device cuda --sets 1,1000 --images 16 --clients 16 --seconds 20 \
  --rounds 2 --json "$OUT/many_sets_gpu.json" 2>&1 | tee "$OUT/many_sets_gpu.log"
