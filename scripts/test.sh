#!/usr/bin/env bash
# The test command: set up .venv if needed, make sure Chromium is there for the browser tests, then run the default
# test tiers (everything not gpu/slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-chromium.sh  # the playground test drives a real headless Chromium (the service never needs it)
export HF_HUB_OFFLINE=1
.venv/bin/ruff check residual service tests bench scripts clients
.venv/bin/lint-imports --no-cache --no-logo  # the layer contracts of pyproject.toml: fails on a broken one
exec .venv/bin/python -m pytest -m "not gpu and not slow" "$@"
