#!/usr/bin/env bash
# Create .venv in the repo root and install the project with its service and dev extras.
# torch comes first, pinned to the wheels that lie on this disk (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch, torchvision" 2>/dev/null \
  || .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -e ".[service,dev]"
.venv/bin/pip install -q -e "clients/python[images,progress]"  # the torch-free client, tested against the service
bash scripts/ensure-chromium.sh  # the playground test drives a real headless Chromium
