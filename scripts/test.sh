#!/usr/bin/env bash
# README test command: set up .venv, then run the test suite (offline, CPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo's browser test needs Debian's chromium; install it when we can (root + apt), as CI does.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the browser test will explain how" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DIFFBIR_CACHE="${DIFFBIR_CACHE:-$(pwd)/.venv/diffbir-cache}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
