#!/usr/bin/env bash
# The browser tests drive Debian's Chromium (packages chromium) through Playwright. Install it when it is missing;
# without root or apt-get, say exactly what is needed instead of letting the tests skip.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Chromium (Debian package chromium) for the browser tests" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "Chromium is missing: install Debian's chromium package (sudo apt-get install chromium); the browser" \
       "tests in tests/browser need it" >&2
  exit 1
fi
