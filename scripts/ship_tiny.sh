#!/usr/bin/env bash
# Ship freshly trained residual-tiny weights: copy them next to the package, rebuild the reference basis, rerun the
# accuracy table and rewrite the model card (which records the weights' hashes that the tests check).
#
#   .venv/bin/python -m residual.tiny.train --out /tmp/tiny/residual-tiny.safetensors   # about 50 min on 2 cores
#   bash scripts/ship_tiny.sh /tmp/tiny/residual-tiny.safetensors                        # about 2 min
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: ship_tiny.sh PATH/residual-tiny.safetensors}
py=.venv/bin/python
cp "$src" residual/weights/residual-tiny.safetensors
cp "${src%.safetensors}.train.json" residual/weights/residual-tiny.train.json
$py -m residual.tiny.reference
$py bench/accuracy.py --json bench/out/accuracy.json --markdown bench/out/accuracy.md
$py -m residual.tiny.card --accuracy bench/out/accuracy.json
echo "shipped; now update bench/README.md from bench/out/accuracy.md and run bash scripts/test.sh"
