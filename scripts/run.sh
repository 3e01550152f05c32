#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and starts the Label Studio ML backend on $PORT
# (9090) with the embedded defaults: models under $MODEL_DIR (./models),
# training in-process. Settings come from the environment (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m backend
