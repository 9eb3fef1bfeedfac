#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the pinned requirements-dev.txt (= requirements.txt, the runtime
# set the Space installs, + test tools). Idempotent: a second run only re-checks the pins (a hash of both
# files). Used by both README commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.requirements.sha
WANT=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  .venv/bin/python -m pip install --quiet --upgrade "pip<26.2"
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$WANT" > "$STAMP"
fi
