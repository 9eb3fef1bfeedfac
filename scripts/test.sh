#!/usr/bin/env bash
# README test command: set up .venv, then run the test suite (offline, CPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DIFFBIR_CACHE="${DIFFBIR_CACHE:-$(pwd)/.venv/diffbir-cache}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
