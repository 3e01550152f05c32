#!/usr/bin/env bash
# Sets up with the test tools (scripts/setup.sh --test) and runs the whole suite.
# Extra arguments go to pytest. Two workers (pytest-xdist; tests/conftest.py says
# which tests go together).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -n 2 "$@"
