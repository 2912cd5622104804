#!/usr/bin/env bash
# Create .venv in the repo root and install the project with its service and dev extras, and the Python client.
# torch comes first, pinned to the wheels that lie on this disk. pip runs only when .venv is missing or stale: the
# stamp .venv/.residual-setup holds a hash of everything that decides the installation (both pyproject files and
# this script), so a second run with nothing changed returns at once (scripts/serve.sh calls this on every start).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.residual-setup
want=$(cat pyproject.toml clients/python/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (pip; a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
rm -f "$stamp"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch, torchvision" 2>/dev/null \
  || .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -e ".[service,dev]"
.venv/bin/pip install -q -e "clients/python[images,progress]"  # the torch-free client, tested against the service
echo "$want" > "$stamp"
